"""Translation with a trained encoder-decoder run:

    python -m llm_jax.translate --workdir runs/mt --input test.en [--output test.de] [--beam_size 4]
        [--length_penalty 0.6] [--reference test.de.ref] [--batch_size 64]

A mistake in the input is one line, `translate: error: ...` (`--debug` shows the traceback).

Writes one detokenized translation per input line, in order (an empty input line gives an empty
output line; `.gz` inputs are read as such), to --output (default: stdout), and prints corpus BLEU
(sacrebleu: detokenized, cased, its default 13a tokenization) on stderr when --reference is given.

Python API (the trainer's BLEU evaluation uses it too):

    run = load_run("runs/mt")
    with run.use_mesh():
        outputs = translate(run, ["A man is riding a bike."], beam_size=4)

Decoding is `llm_jax.beam_search` over the family's decoding step: the source is encoded once,
the cross-attention keys/values are computed once per sentence. Sentences are sorted by length
and batched; source widths go up in steps of 8 tokens and each batch decodes at most
`max_len_a * width + max_len_b` tokens (capped by the model's max_len), so few shapes compile.
A source longer than the model's max_len is cut to it, with a warning naming the line.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import sacrebleu

from llm_jax import beam_search as beam_lib
from llm_jax import decode as decode_lib
from llm_jax.errors import BadValue


class Translator(NamedTuple):
    """What `translate` needs of a run (a `llm_jax.run.Run` has these too)."""

    model: object
    params: object
    tokenizer: object


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of detokenized text (sacrebleu's defaults: 13a tokenization, cased)."""
    if len(hypotheses) != len(references):
        raise BadValue(f"{len(hypotheses)} translations but {len(references)} references: they must align by line")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def _width(n: int, max_len: int) -> int:
    """Source widths in steps of 8: few shapes to compile."""
    return min(max_len, 8 * math.ceil(max(n, 1) / 8))


def translate(
    run, sentences: Sequence[str], beam_size: int = 4, length_penalty: float = 0.6, max_len_a: float = 1.5,
    max_len_b: int = 10, batch_size: int = 64, warn: Callable[[str], None] | None = None,
) -> list[str]:  # fmt: skip
    """Translations of `sentences` (detokenized), in order; call inside `run.use_mesh()`.

    `run`: a `llm_jax.run.Run` of the encoder-decoder family (or anything with `model`, `params`,
    `tokenizer`). beam_size=1 with length_penalty=0 is greedy decoding.
    """
    model, params, tok = run.model, run.params, run.tokenizer
    max_len = model.cfg.max_len
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    encoded = {}
    for i, s in enumerate(sentences):
        if s.strip():
            ids = tok.encode(s)
            if len(ids) > max_len:
                warn(f"translate: line {i + 1} has {len(ids)} tokens; cut to the model's max_len={max_len}")
                ids = ids[:max_len]
            encoded[i] = ids
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    out = [""] * len(sentences)
    mesh = decode_lib.params_mesh(params)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = _width(max(len(encoded[i]) for i in rows), max_len)
        source = np.zeros((batch_size, width), np.int32)  # full batches: one shape per width
        for r, i in enumerate(rows):
            source[r, : len(encoded[i])] = encoded[i]
        steps = min(max_len, int(max_len_a * width + max_len_b))
        beams = beam_lib.beam_search(
            model, params, batch_size, beam_size=beam_size, max_new_tokens=steps, bos_id=tok.bos_id,
            eos_id=tok.eos_id, length_penalty=length_penalty, mesh=mesh, source=source,
        )  # fmt: skip
        tokens, lengths = np.asarray(beams.tokens), np.asarray(beams.lengths)
        for r, i in enumerate(rows):
            ids = [int(t) for t in tokens[r, : lengths[r]] if int(t) != tok.eos_id]
            out[i] = tok.decode(ids)
    return out


def define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory of an encoder-decoder run (llm_jax.main).")
    flags.DEFINE_string("input", None, "Source sentences, one per line (plain or .gz).")
    flags.DEFINE_string("output", None, "Where to write the translations (default: stdout).")
    flags.DEFINE_string("reference", None, "Reference translations, one per line: prints corpus BLEU.")
    flags.DEFINE_integer("beam_size", 4, "Beam size (1 with --length_penalty=0: greedy).")
    flags.DEFINE_float("length_penalty", 0.6, "GNMT length penalty alpha (0: none).")
    flags.DEFINE_float("max_len_a", 1.5, "At most max_len_a * source tokens + max_len_b tokens per translation.")
    flags.DEFINE_integer("max_len_b", 10, "See --max_len_a.")
    flags.DEFINE_integer("batch_size", 64, "Sentences decoded together.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.mark_flags_as_required(["workdir", "input"])


def main(argv):
    import time

    from absl import app, flags, logging

    from llm_jax.run import load_run
    from llm_jax.seq2seq import read_lines

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    sources = read_lines(f.input)
    references = read_lines(f.reference) if f.reference else None
    if references is not None and len(references) != len(sources):
        raise BadValue(f"--reference={f.reference} has {len(references)} lines but --input has {len(sources)}")
    run = load_run(f.workdir, f.step)
    if run.model.cfg.family != "encdec":
        raise BadValue(f"{f.workdir} is a {run.model.cfg.family!r} run; translate needs an encoder-decoder")
    t0 = time.time()
    with run.use_mesh():
        outputs = translate(run, sources, f.beam_size, f.length_penalty, f.max_len_a, f.max_len_b, f.batch_size)
    text = "".join(o + "\n" for o in outputs)
    if f.output:
        with open(f.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    took = time.time() - t0
    print(
        f"translate: {len(sources)} lines, beam {f.beam_size}, {took:.1f}s ({run.workdir} step {run.step})",
        file=sys.stderr,
    )
    if references is not None:
        print(f"BLEU = {bleu(outputs, references):.2f} (sacrebleu, detokenized, cased, 13a)", file=sys.stderr)


if __name__ == "__main__":
    from llm_jax import cli

    define_flags()
    cli.run(main, "translate")

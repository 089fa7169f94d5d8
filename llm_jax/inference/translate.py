"""Translation with an encoder-decoder: sentences in, detokenized translations out, and BLEU.

    run = load_run("runs/mt")              # llm_jax.training.saved_run
    with run.use_mesh():
        outputs = translate(run, ["A man is riding a bike."], beam_size=4)

The command line over it is `python -m llm_jax.translate` (llm_jax/translate.py); the trainer's
BLEU evaluation is `validation_bleu`.

Decoding is `llm_jax.inference.beam_search` over the family's decoding step: the source is encoded once,
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

from llm_jax.inference import beam_search as beam_lib
from llm_jax.inference import decode as decode_lib
from llm_jax.runtime.errors import BadValue


class Translator(NamedTuple):
    """What `translate` needs of a run (a `llm_jax.training.saved_run.Run` has these too)."""

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

    `run`: a `llm_jax.training.saved_run.Run` of the encoder-decoder family (or anything with `model`, `params`,
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


def validation_bleu(model, params, data, config) -> dict[str, float]:
    """{'eval/bleu': BLEU} of beam-search translations of the first `config.train.decode_eval_examples`
    validation sources (0: all) of parallel `data`, with the `config.decode` settings. The trainer's
    decoding evaluation of the encoder-decoder family; call inside the run's mesh context."""
    n = config.train.decode_eval_examples or len(data.val.raw_source)
    d = config.decode
    hyps = translate(
        Translator(model, params, data.tokenizer), data.val.raw_source[:n], d.beam_size, d.length_penalty,
        d.max_len_a, d.max_len_b, d.batch_size,
    )  # fmt: skip
    return {"eval/bleu": bleu(hyps, data.val.raw_target[:n])}


# Validation metrics that need decoding, by model family (`config.train.decode_eval_every`). They live
# here, apart from the models they measure, and reach them only through the family interface.
DECODE_METRICS = {"encdec": validation_bleu}

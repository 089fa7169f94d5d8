"""Translation with a trained encoder-decoder run:

    python -m llm_jax.translate --workdir runs/mt --input test.en [--output test.de] [--beam_size 4]
        [--length_penalty 0.6] [--reference test.de.ref] [--batch_size 64] [--quant int8|int4]

Writes one detokenized translation per input line, in order (an empty input line gives an empty
output line; `.gz` inputs are read as such), to --output (default: stdout), and prints corpus BLEU
(sacrebleu: detokenized, cased, its default 13a tokenization) on stderr when --reference is given.
A mistake in the input is one line, `translate: error: ...` (`--debug` shows the traceback).
The decoding itself: llm_jax/inference/translate.py.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import sys
import time

from absl import app, flags, logging

from llm_jax.data.parallel import read_lines
from llm_jax.inference import translate as translate_lib
from llm_jax.runtime.errors import BadValue
from llm_jax.training.saved_run import check_quant, load_run, quantized


def define_flags():
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
    flags.DEFINE_string("quant", "none", "Weight-only quantized kernels: none, int8 or int4 (per-channel scales).")
    flags.mark_flags_as_required(["workdir", "input"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    check_quant(f.quant)
    sources = read_lines(f.input)
    references = read_lines(f.reference) if f.reference else None
    if references is not None and len(references) != len(sources):
        raise BadValue(f"--reference={f.reference} has {len(references)} lines but --input has {len(sources)}")
    run = load_run(f.workdir, f.step)
    if run.model.cfg.family != "encdec":
        raise BadValue(f"{f.workdir} is a {run.model.cfg.family!r} run; translate needs an encoder-decoder")
    run = quantized(run, f.quant)
    t0 = time.time()
    with run.use_mesh():
        outputs = translate_lib.translate(
            run, sources, f.beam_size, f.length_penalty, f.max_len_a, f.max_len_b, f.batch_size
        )
    text = "".join(o + "\n" for o in outputs)
    if f.output:
        with open(f.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    took = time.time() - t0
    print(
        f"translate: {len(sources)} lines, beam {f.beam_size}, {took:.1f}s ({run.workdir} step {run.step})"
        + (f", {f.quant} weights" if f.quant != "none" else ""),
        file=sys.stderr,
    )
    if references is not None:
        bleu = translate_lib.bleu(outputs, references)
        print(f"BLEU = {bleu:.2f} (sacrebleu, detokenized, cased, 13a)", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "translate")

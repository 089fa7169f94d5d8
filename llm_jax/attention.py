"""Attention maps of a trained run, drawn per layer and head:

    python -m llm_jax.attention --workdir runs/default --text "def add(a, b):" --output attention.png
    python -m llm_jax.attention --workdir runs/mt --source "A man rides a bike." \
        [--target "Ein Mann fährt Fahrrad."] --output alignment.png

What is drawn and the Python API: llm_jax/tools/attention_maps.py. matplotlib comes with the
`notebook` extra.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
from absl import app, flags, logging

from llm_jax.runtime.errors import BadValue
from llm_jax.tools import attention_maps as maps_lib
from llm_jax.training.saved_run import load_run


def _parse_indices(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise BadValue(f"--{flag}={text}: give comma-separated indices, e.g. --{flag}=0,2") from None


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; put the text in --text (quoted)")
    logging.set_verbosity(logging.ERROR)  # orbax reports every read
    layers, heads = _parse_indices(f.layers, "layers"), _parse_indices(f.heads, "heads")
    run = load_run(f.workdir, f.step)
    maps = maps_lib.attention_maps(run, f.text, f.source, f.target, f.max_tokens)
    maps = maps_lib.select(maps, layers, heads)
    h = max(s.weights.shape[1] for s in maps.sections)
    if heads is None and 0 < f.max_heads < h:
        maps = maps_lib.select(maps, None, list(range(f.max_heads)))
        maps.caption += f"; heads 0..{f.max_heads - 1} of {h} shown (--heads, --max_heads)"
    fig = maps_lib.draw(maps)
    fig.savefig(f.output, dpi=f.dpi)
    shapes = ", ".join(f"{s.title.split(' (')[0]} {s.weights.shape[0]}x{s.weights.shape[1]}" for s in maps.sections)
    print(f"attention: wrote {f.output} ({shapes} layers x heads)")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory of llm_jax.main (config.json, tokenizer/, checkpoints/).")
    flags.DEFINE_string("text", None, "Decoder-only run: the text whose attention is drawn.")
    flags.DEFINE_string("source", None, "Encoder-decoder run: the source sentence.")
    flags.DEFINE_string("target", None, "Encoder-decoder run: its translation (default: the model's own).")
    flags.DEFINE_string("output", None, "PNG (or any matplotlib format) to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_integer("max_tokens", 48, "Texts are cut to this many tokens (and to the trained context).")
    flags.DEFINE_string("layers", None, "Comma-separated layer indices to draw (default: all).")
    flags.DEFINE_string("heads", None, "Comma-separated head indices to draw (default: all, up to --max_heads).")
    flags.DEFINE_integer("max_heads", 8, "Without --heads, draw at most this many heads (0: all).")
    flags.DEFINE_integer("dpi", 100, "Resolution of the image.")
    flags.mark_flags_as_required(["workdir", "output"])


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    define_flags()
    cli.run(main, "attention")

"""Training curves of one or several runs, from their `metrics.jsonl`:

    python -m llm_jax.plot --workdir runs/a [--workdir runs/b ...] [--output curves.png] [--label A --label B]

The panels: llm_jax/tools/plot.py (`figure` returns the matplotlib Figure in a notebook).
matplotlib comes with the `notebook` extra.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import os

from absl import app, flags

from llm_jax.tools import plot


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; give runs with --workdir DIR (repeatable)")
    fig = plot.figure(f.workdir, f.label)
    output = f.output or os.path.join(f.workdir[0], "curves.png")
    fig.savefig(output, dpi=f.dpi)
    print(f"plot: wrote {output} ({len(f.workdir)} run{'s' if len(f.workdir) > 1 else ''})")


def define_flags() -> None:
    flags.DEFINE_multi_string("workdir", None, "Run directory with metrics.jsonl; repeat to overlay runs.")
    flags.DEFINE_multi_string("label", None, "Legend label of each --workdir, in order (default: directory names).")
    flags.DEFINE_string(
        "output", None, "Image file (PNG, SVG, PDF: by its extension); default WORKDIR/curves.png (the first run)."
    )
    flags.DEFINE_integer("dpi", 100, "Resolution of the image.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    define_flags()
    cli.run(main, "plot")

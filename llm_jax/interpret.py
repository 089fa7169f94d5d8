"""Looking inside a trained run: logit lens, attributions, activation patching, head ablation.

    python -m llm_jax.interpret --workdir runs/default lens --text "print(len(x" --output out/lens
    python -m llm_jax.interpret --workdir runs/default attribute --text "..." [--target ")"] --output out/attr
    python -m llm_jax.interpret --workdir runs/shakespeare patch --text "ROMEO:" --corrupt "JULIET" --output out/patch
    python -m llm_jax.interpret --workdir runs/default ablate --text "..." --mode mean --output out/ablate
    python -m llm_jax.interpret --workdir runs/mt lens --source "A man rides a bike." --text "Ein Mann" --output out/mt

Each writes OUTPUT.json (the numbers) and OUTPUT.png (a heat map or bar chart). The scored output is
log p(target) at the last token of --text, the target being the model's own top next token unless
--target names one. What each instrument computes and the Python API:
llm_jax/tools/interpret_run.py; the captured sites (--site): llm_jax/tools/hooks.py. matplotlib comes
with the `notebook` extra.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
from absl import app, flags, logging

from llm_jax.runtime.errors import BadValue
from llm_jax.tools import interpret_run
from llm_jax.training.saved_run import load_run

COMMANDS = ("lens", "attribute", "patch", "ablate")


def _report(f, command: str, run) -> interpret_run.Report:
    common = {"target": f.target, "source": f.source, "max_tokens": f.max_tokens}
    if command == "lens":
        return interpret_run.lens(run, f.text, top_k=f.top_k, **common)
    if command == "attribute":
        return interpret_run.attribute(run, f.text, steps=f.steps, **common)
    if command == "patch":
        return interpret_run.patch(run, f.text, f.corrupt, site=f.site, corrupt_source=f.corrupt_source, **common)
    return interpret_run.ablate(run, f.text, mode=f.mode, site=f.site, **common)


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        given = " ".join(argv[1:]) or "nothing"
        raise app.UsageError(f"give one command, one of {', '.join(COMMANDS)} (got {given}); put texts in --text")
    if f.text is None:
        raise BadValue(f"{argv[1]} needs --text TEXT (the decoder's text for a translation run)")
    if argv[1] == "patch" and f.corrupt is None:
        raise BadValue("patch needs --corrupt TEXT: the prompt to patch into (as many tokens as --text)")
    logging.set_verbosity(logging.ERROR)  # orbax reports every read
    run = load_run(f.workdir, f.step)
    report = _report(f, argv[1], run)
    paths = report.save(f.output or argv[1], dpi=f.dpi)
    print(f"interpret: wrote {' and '.join(paths)}{_summary(report.data)}")


def _summary(d: dict) -> str:
    """What the numbers say in one clause: the score, and for attributions how complete they are."""
    if d["kind"] == "attribute":
        hint = " (over 1%: raise --steps)" if d["completeness_gap"] > 0.01 else ""
        return f"; log p({d['target']!r}) {d['score']:.3f}, completeness gap {d['completeness_gap']:.2%}{hint}"
    if d["kind"] == "patch":
        gap = d["clean_score"] - d["corrupt_score"]
        # The shares recovered are fractions of this gap: near zero, they are rounding noise.
        hint = " (the corruption barely changes the score: the shares are noise; corrupt a token that matters)"
        return (
            f"; log p({d['target']!r}) clean {d['clean_score']:.3f}, corrupted {d['corrupt_score']:.3f}"
            f"{hint if abs(gap) < 1e-2 else ''}"
        )
    if d["kind"] == "ablate":
        return f"; log p({d['target']!r}) {d['score']:.3f}"
    return f"; final prediction {d['goal'][-1]!r}"


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory of llm_jax.main (config.json, tokenizer/, checkpoints/).")
    flags.DEFINE_string("text", None, "The text (a translation run: the target so far); its last token is scored.")
    flags.DEFINE_string("target", None, "The token whose log-prob is scored (default: the model's top next token).")
    flags.DEFINE_string("source", None, "Encoder-decoder run: the source sentence.")
    flags.DEFINE_string("corrupt", None, "patch: the corrupted text, as many tokens as --text.")
    flags.DEFINE_string("corrupt_source", None, "patch, encoder-decoder: a corrupted source (default: --source).")
    flags.DEFINE_string(
        "site", None, "patch / ablate: the site (residual, attn, mlp, heads; decoder/... for translation)."
    )
    flags.DEFINE_enum("mode", "zero", ["zero", "mean"], "ablate: replace each head's output by zero or its mean.")
    flags.DEFINE_integer(
        "steps", 128, "attribute: integrated-gradients steps (more: attributions closer to complete).", lower_bound=1
    )
    flags.DEFINE_integer("top_k", 5, "lens: top tokens kept per layer and position.", lower_bound=1)
    flags.DEFINE_string("output", None, "Prefix of OUTPUT.json and OUTPUT.png (default: the command's name).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_integer(
        "max_tokens",
        48,
        "Texts are cut to this many tokens (and the trained context): the last ones, or a translation's first ones.",
    )
    flags.DEFINE_integer("dpi", 100, "Resolution of the image.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    define_flags()
    cli.run(main, "interpret")

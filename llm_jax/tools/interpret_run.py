"""The instruments on a trained run and a text: what `python -m llm_jax.interpret` writes (JSON and
a matplotlib figure), and the Python API for notebooks.

    run = load_run("runs/default")
    report = lens(run, "def f(x):\\n    return (x")     # a Report: .data (JSON-ready), .figure()
    report = attribute(run, "...", target=")")
    report = patch(run, clean="...", corrupt="...")
    report = ablate(run, "...", mode="mean")
    report.save("out/lens")                              # out/lens.json and out/lens.png

Every instrument scores one output: log p(target) at the last position of `text` (the decoder's
text for a translation run, teacher-forced after the source; `source=` gives the source). The
target is the model's own top next token unless `target=` names one. The arrays behind each
report: llm_jax/tools/interpret.py; the sites: llm_jax/tools/hooks.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue
from llm_jax.tools import interpret as interp
from llm_jax.tools.attention_maps import token_label


@dataclasses.dataclass(frozen=True)
class Report:
    """One instrument's result: `data` (JSON-ready dict, with `kind`) and how to draw it."""

    data: dict

    def figure(self):
        return _DRAW[self.data["kind"]](self.data)

    def save(self, prefix: str, dpi: int = 100) -> list[str]:
        """Writes `prefix`.json and `prefix`.png (atomically); returns the two paths."""
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        files.write_json(prefix + ".json", self.data, indent=1)
        fig = self.figure()
        with files.atomic_path(prefix + ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
        return [prefix + ".json", prefix + ".png"]


@dataclasses.dataclass(frozen=True)
class _Prompt:
    inputs: dict  # the family's keyword inputs, rows repeated over the mesh's data axis
    labels: list[str]  # a label per scored-sequence token
    source_labels: list[str] | None
    ids: list[int]


def _prompt(run, text: str, source: str | None, max_tokens: int) -> _Prompt:
    tok, cfg = run.tokenizer, run.model.cfg
    limit = max(2, min(max_tokens, run.context, cfg.max_len))
    if cfg.family == "encdec":
        if source is None:
            raise BadValue("this run is an encoder-decoder: give --source TEXT (and --text: the target so far)")
        src = tok.encode(source)[:limit]
        ids = ([tok.bos_id] + tok.encode(text))[:limit]
        inputs = {"source": interp.rows(src, run.mesh), "tokens": interp.rows(ids, run.mesh)}
        return _Prompt(inputs, [token_label(tok, i) for i in ids], [token_label(tok, i) for i in src], ids)
    if source is not None:
        raise BadValue(f"this run is family {cfg.family!r}: give --text only (--source is for translation runs)")
    ids = tok.encode(text)
    if not ids:
        raise BadValue("--text is empty: give at least one token of text")
    ids = ids[-limit:]  # the end of a long text: the scored position is its last token
    return _Prompt({"tokens": interp.rows(ids, run.mesh)}, [token_label(tok, i) for i in ids], None, ids)


def _target(run, target: str | None, own: np.ndarray) -> int:
    """The scored token: the first token of `target`'s encoding, or the model's top next token."""
    if target is None:
        return int(np.argmax(own))
    ids = run.tokenizer.encode(target)
    if not ids:
        raise BadValue(f"--target={target!r} encodes to no token: give a token's text, e.g. --target=')'")
    return ids[0]


def _header(run, kind: str, prompt: _Prompt, target: int, **extra) -> dict:
    return {
        "kind": kind,
        "workdir": run.workdir,
        "step": run.step,
        "tokens": prompt.labels,
        **({"source_tokens": prompt.source_labels} if prompt.source_labels else {}),
        "target": token_label(run.tokenizer, target),
        "target_id": target,
        **extra,
    }


def lens(run, text: str, target: str | None = None, source: str | None = None, top_k: int = 5,
         max_tokens: int = 48) -> Report:  # fmt: skip
    """Logit lens: each layer's residual stream decoded by the final norm and unembedding; per
    (layer, position) the top tokens, and the probability and rank of the model's own final
    prediction there (or of `target` at every position)."""
    prompt = _prompt(run, text, source, max_tokens)
    with run.use_mesh():
        per_layer, final = interp.logit_lens(run.model, run.params, prompt.inputs)
    t = final.shape[0]
    goal = np.full(t, _target(run, target, final[-1])) if target else final.argmax(-1)
    layers = np.concatenate([per_layer, final[None]])  # [L + 1, t, v]: the last row is the output
    top = np.argsort(-layers, -1)[..., :top_k]
    label = lambda i: token_label(run.tokenizer, int(i))  # noqa: E731
    goal_prob = np.exp(np.take_along_axis(layers, np.broadcast_to(goal[None, :, None], layers.shape[:2] + (1,)), -1))
    return Report(
        _header(
            run, "lens", prompt, int(goal[-1]),
            layers=[f"layer {i}" for i in range(per_layer.shape[0])] + ["output"],
            goal=[label(i) for i in goal],
            goal_prob=goal_prob[..., 0].round(5).tolist(),
            goal_rank=interp.ranks(layers, goal).tolist(),
            top=[[[label(i) for i in cell] for cell in row] for row in top],
            top_prob=np.exp(np.take_along_axis(layers, top, -1)).round(5).tolist(),
        )
    )  # fmt: skip


def attribute(run, text: str, target: str | None = None, source: str | None = None, steps: int = 128,
              max_tokens: int = 48) -> Report:  # fmt: skip
    """Integrated gradients and gradient x input of log p(target after `text`) to each input token."""
    prompt = _prompt(run, text, source, max_tokens)
    with run.use_mesh():
        _, final = interp.logit_lens(run.model, run.params, prompt.inputs)
        goal = _target(run, target, final[-1])
        ig = interp.integrated_gradients(run.model, run.params, prompt.inputs, -1, goal, steps=steps)
        gxi = interp.integrated_gradients(run.model, run.params, prompt.inputs, -1, goal, steps=0)
    return Report(
        _header(
            run, "attribute", prompt, goal, steps=steps, score=ig.score, baseline_score=ig.baseline_score,
            completeness_gap=ig.gap,
            integrated_gradients={k: v.round(6).tolist() for k, v in ig.tokens.items()},
            gradient_x_input={k: v.round(6).tolist() for k, v in gxi.tokens.items()},
        )
    )  # fmt: skip


def patch(run, clean: str, corrupt: str, target: str | None = None, site: str | None = None,
          source: str | None = None, corrupt_source: str | None = None, max_tokens: int = 48) -> Report:  # fmt: skip
    """Activation patching from the `clean` run into the `corrupt` one (texts of as many tokens),
    per (layer, position) of the residual stream (or another `site`; per head for 'heads')."""
    site = site or ("decoder/residual" if run.model.cfg.family == "encdec" else "residual")
    a = _prompt(run, clean, source, max_tokens)
    b = _prompt(run, corrupt, corrupt_source or source, max_tokens)
    if len(a.ids) != len(b.ids):
        raise BadValue(
            f"--text is {len(a.ids)} tokens and --corrupt {len(b.ids)}: patching needs prompts of the same "
            f"number of tokens (change a word for one of the same length)"
        )
    with run.use_mesh():
        _, final = interp.logit_lens(run.model, run.params, a.inputs)
        goal = _target(run, target, final[-1])
        grid = interp.patch(run.model, run.params, a.inputs, b.inputs, -1, goal, site=site)
    return Report(
        _header(
            run, "patch", a, goal, corrupt_tokens=b.labels, site=site, index=grid.index,
            clean_score=grid.reference, corrupt_score=grid.base,
            scores=grid.scores.round(6).tolist(), recovered=np.nan_to_num(grid.recovered).round(5).tolist(),
        )
    )  # fmt: skip


def ablate(run, text: str, target: str | None = None, mode: str = "zero", site: str | None = None,
           source: str | None = None, max_tokens: int = 48) -> Report:  # fmt: skip
    """Head ablation: each (layer, head) zeroed or mean-ablated; the change of log p(target)."""
    site = site or ("decoder/heads" if run.model.cfg.family == "encdec" else "heads")
    prompt = _prompt(run, text, source, max_tokens)
    with run.use_mesh():
        _, final = interp.logit_lens(run.model, run.params, prompt.inputs)
        goal = _target(run, target, final[-1])
        grid = interp.ablate_heads(run.model, run.params, prompt.inputs, -1, goal, mode=mode, site=site)
    return Report(
        _header(
            run, "ablate", prompt, goal, mode=mode, site=site, score=grid.base,
            scores=grid.scores.round(6).tolist(), effect=grid.effect.round(6).tolist(),
        )
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Pictures (matplotlib, the `notebook` extra)


def _caption(d: dict) -> str:
    return f"{d['workdir']} (step {d['step']}): target {d['target']!r}"


def _grid(d: dict, values: np.ndarray, title: str, cols: list[str], rows: list[str], cmap: str, center: bool,
          notes: list[list[str]] | None = None):  # fmt: skip
    """A heat map figure: rows x cols with labels, a colour bar, optional text in every cell."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    height, width = values.shape
    size = (float(np.clip(0.3 * width + 2.5, 4.0, 18.0)), float(np.clip(0.4 * height + 1.8, 2.5, 12.0)))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    lim = float(np.nanmax(np.abs(values))) or 1.0
    norm = TwoSlopeNorm(0.0, -lim, lim) if center else None
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(width), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(height), rows, fontsize=8)
    shade = image.norm(values)  # 0..1 along the colour map: dark text on its bright end
    for (i, j), text in np.ndenumerate(np.asarray(notes, dtype=object)) if notes else ():
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if shade[i, j] > 0.6 else "white")
    ax.set_title(f"{title}\n{_caption(d)}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def _draw_lens(d: dict):
    prob = np.asarray(d["goal_prob"])
    notes = [[cell[0] for cell in row] for row in d["top"]]
    title = (
        "logit lens: each layer's top next token (text) after each input token (column); colour: p(final prediction)"
    )
    return _grid(d, prob, title, d["tokens"], d["layers"], "viridis", False, notes)


def _draw_attribute(d: dict):
    from matplotlib.figure import Figure

    parts = list(d["integrated_gradients"])
    fig = Figure(figsize=(max(5.0, 0.35 * len(d["tokens"]) + 2), 2.6 * len(parts)), layout="constrained")
    for ax, part in zip(fig.subplots(len(parts), 1, squeeze=False)[:, 0], parts):
        labels = d["source_tokens"] if part == "source_embed" else d["tokens"]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, d["integrated_gradients"][part], 0.4, label="integrated gradients")
        ax.bar(x + 0.2, d["gradient_x_input"][part], 0.4, label="gradient x input")
        ax.set_xticks(x, labels, rotation=90, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"{'source' if part == 'source_embed' else 'input'} tokens -> log p(target)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{_caption(d)}; completeness gap {d['completeness_gap']:.2%}", fontsize=9)
    return fig


def _draw_patch(d: dict):
    values = np.asarray(d["recovered"])
    cols = d["tokens"] if d["index"] == "position" else [f"head {i}" for i in range(values.shape[1])]
    if d["index"] == "position":
        cols = [f"{a}/{b}" if a != b else a for a, b in zip(d["tokens"], d["corrupt_tokens"])]
    rows = [f"layer {i}" for i in range(values.shape[0])]
    title = f"activation patching ({d['site']}): share of the clean log-prob recovered"
    return _grid(d, values, title, cols, rows, "RdBu_r", True)


def _draw_ablate(d: dict):
    values = np.asarray(d["effect"])
    cols, rows = [f"head {i}" for i in range(values.shape[1])], [f"layer {i}" for i in range(values.shape[0])]
    return _grid(d, values, f"head ablation ({d['mode']}): change of log p(target)", cols, rows, "RdBu_r", True)


_DRAW: dict[str, Any] = {"lens": _draw_lens, "attribute": _draw_attribute, "patch": _draw_patch, "ablate": _draw_ablate}

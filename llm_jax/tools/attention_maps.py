"""Attention maps of a trained run: how much each token looks at every other, per layer and head.

    python -m llm_jax.attention --workdir runs/default --text "def add(a, b):" --output attention.png
    python -m llm_jax.attention --workdir runs/mt --source "A man rides a bike." \
        [--target "Ein Mann fährt Fahrrad."] --output alignment.png

A grid of heat maps, one row per layer and one column per head, queries down the side and keys
along the bottom, each row of a map summing to 1. For an encoder-decoder run (`--source`, and
`--target` or else the model's own beam-search translation) the figure has three parts: encoder
self-attention, decoder self-attention, and the cross-attention alignment of target to source
tokens. Texts longer than `--max_tokens` (or than the run's trained context) are cut, and the
figure says so.

Python (a notebook):

    run = load_run("runs/default")
    maps = attention_maps(run, text="def add(a, b):")
    fig = draw(maps)            # a matplotlib Figure

The weights come from the model itself: applied with the 'intermediates' collection mutable, each
attention module records its softmax weights (llm_jax/models/model.py `_attend`), on whatever mesh the
run's params are on. matplotlib is needed only to draw (the `notebook` extra).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue

TITLES = {
    ("", "attn"): "self-attention",
    ("encoder", "attn"): "encoder self-attention (source -> source)",
    ("decoder", "attn"): "decoder self-attention (target -> target)",
    ("decoder", "cross_attn"): "cross-attention alignment (target -> source)",
}


@dataclasses.dataclass
class Section:
    """One kind of attention: weights [layers, heads, queries, keys] and the tokens on both axes."""

    title: str
    weights: np.ndarray  # [L, H, t, s] float32, rows sum to 1
    queries: list[str]
    keys: list[str]
    layer_ids: list[int] | None = None  # the model's index of each of the L layers (None: 0..L-1)
    head_ids: list[int] | None = None  # and of each of the H heads


@dataclasses.dataclass
class Maps:
    """What `draw` shows: the sections in order, and a caption (run, step, text, truncation)."""

    sections: list[Section]
    caption: str


def token_label(tokenizer: tok_lib.Tokenizer, i: int, width: int = 10) -> str:
    """A short visible label of token `i`: whitespace spelled out (space as '␣', '\\n'), bytes that are
    not printable ASCII as '<e2>', SentencePiece and HF pieces as the vocabulary writes them."""
    i = int(i)
    if i == tokenizer.eos_id:
        return "<eos>"
    if i == tokenizer.bos_id:
        return "<s>"
    if isinstance(tokenizer, tok_lib.ByteTokenizer):
        text = chr(i) if 32 <= i < 127 or i in (9, 10) else f"<{i:02x}>"
    elif isinstance(tokenizer, tok_lib.SentencePieceTokenizer):
        text = tokenizer.sp.id_to_piece(i)
    elif isinstance(tokenizer, tok_lib.HFTokenizer):
        text = tokenizer.tok.id_to_token(i) or f"<{i}>"
    else:
        text = tokenizer.decode([i])
    text = text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(text: str, width: int = 80) -> str:
    """repr of `text`, its middle elided past `width` characters (for the caption)."""
    r = repr(text)
    return r if len(r) <= width else r[: width // 2 - 1] + "…" + r[-(width // 2) :]


def _cut(ids: list[int], limit: int, name: str, notes: list[str]) -> list[int]:
    """The first `limit` ids, noting in `notes` when some were cut."""
    if len(ids) > limit:
        notes.append(f"{name}: first {limit} of {len(ids)} tokens shown")
        return ids[:limit]
    return ids


def _rows(ids: list[int], mesh) -> np.ndarray:
    """[n] ids -> [B, n] int32, the row repeated over the mesh's data-parallel devices (batch
    activations are sharded over them; row 0 is read back)."""
    return np.tile(np.asarray(ids, np.int32)[None], (sharding.data_parallel_size(mesh), 1))


@functools.partial(jax.jit, static_argnames=("model",))
def _recorded(model, params, inputs: dict):
    """The model applied to `inputs` with its attention weights recorded: {path: [B, h, t, s] or
    [L, B, h, t, s] (scan_layers)} (flax's 'intermediates' collection)."""
    _, state = model.apply({"params": params}, **inputs, mutable=["intermediates"])
    return jax.tree.map(lambda x: x.astype(jnp.float32), state["intermediates"])


def _sections(intermediates, queries: dict, keys: dict) -> list[Section]:
    """Groups recorded weights by (stack, module) into [L, H, t, s] sections of row 0 of the batch.

    `queries` / `keys`: token labels by stack name ('' for the decoder-only LM; 'encoder',
    'decoder'); cross-attention's keys are the encoder's tokens.
    """
    groups: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    for path, value in flat:
        names = [str(getattr(k, "key", k)) for k in path if hasattr(k, "key")]
        layer_at = next(i for i, n in enumerate(names) if n.startswith("layers"))
        stack, module = "/".join(names[:layer_at]), names[layer_at + 1]
        value = np.asarray(jax.device_get(value))
        if names[layer_at] == "layers":  # scan_layers: [L, B, h, t, s]
            groups.setdefault((stack, module), []).extend(enumerate(value[:, 0]))
        else:
            groups.setdefault((stack, module), []).append((int(names[layer_at].split("_")[1]), value[0]))
    out = []
    for key in sorted(groups, key=lambda k: list(TITLES).index(k) if k in TITLES else len(TITLES)):
        stack, module = key
        weights = np.stack([w for _, w in sorted(groups[key], key=lambda x: x[0])])
        source = "encoder" if module == "cross_attn" else stack
        out.append(Section(TITLES.get(key, f"{stack}/{module}"), weights, queries[stack], keys[source]))
    return out


def attention_maps(run, text: str | None = None, source: str | None = None, target: str | None = None,
                   max_tokens: int = 48) -> Maps:  # fmt: skip
    """The attention weights of `run` (a `llm_jax.training.saved_run.Run`) on `text` (decoder-only LM) or on a
    `source` sentence and its `target` (encoder-decoder; the model's own translation when no
    target is given). Texts are cut to `max_tokens` tokens (and the trained context)."""
    tok, cfg, notes = run.tokenizer, run.model.cfg, []
    limit = max(1, min(max_tokens, run.context, cfg.max_len))
    if cfg.family == "encdec":
        if source is None or text is not None:
            raise BadValue("this run is an encoder-decoder: give --source TEXT (and optionally --target TEXT)")
        if target is None:
            from llm_jax.inference import translate

            with run.use_mesh():
                target = translate.translate(run, [source], beam_size=4)[0]
            notes.append("target: the model's own translation")
        src = _cut(tok.encode(source), limit, "source", notes)
        tgt = _cut([tok.bos_id] + tok.encode(target), limit, "target", notes)
        inputs = {"source": _rows(src, run.mesh), "tokens": _rows(tgt, run.mesh)}
        labels = {"encoder": src, "decoder": tgt}
        shown = f"{_short(source)} -> {_short(target)}"
    else:
        if text is None or source is not None or target is not None:
            raise BadValue(
                f"this run is family {cfg.family!r}: give --text TEXT (--source/--target are for translation)"
            )
        ids = _cut(tok.encode(text) or [tok.eos_id or 0], limit, "text", notes)
        inputs, labels, shown = {"tokens": _rows(ids, run.mesh)}, {"": ids}, _short(text)
    with run.use_mesh():
        recorded = _recorded(run.model, run.params, inputs)
    names = {k: [token_label(tok, i) for i in v] for k, v in labels.items()}
    caption = f"{run.workdir} (step {run.step}): {shown}" + "".join(f"; {n}" for n in notes)
    return Maps(_sections(recorded, names, names), caption)


def select(maps: Maps, layers: list[int] | None = None, heads: list[int] | None = None) -> Maps:
    """`maps` restricted to some layers and heads (indices; None: all); errors name the valid range."""
    out = []
    for s in maps.sections:
        w = s.weights
        for name, idx, size in (("layer", layers, w.shape[0]), ("head", heads, w.shape[1])):
            bad = [i for i in idx or () if not 0 <= i < size]
            if bad:
                raise BadValue(f"{name} {bad[0]} does not exist in {s.title}: use 0..{size - 1}")
        layer_ids, head_ids = s.layer_ids or list(range(w.shape[0])), s.head_ids or list(range(w.shape[1]))
        w = w if layers is None else w[layers]
        w = w if heads is None else w[:, heads]
        layer_ids = layer_ids if layers is None else [layer_ids[i] for i in layers]
        head_ids = head_ids if heads is None else [head_ids[i] for i in heads]
        out.append(dataclasses.replace(s, weights=w, layer_ids=layer_ids, head_ids=head_ids))
    return dataclasses.replace(maps, sections=out)


def draw(maps: Maps, cmap: str = "viridis"):
    """A matplotlib Figure: per section a grid of layers (rows) x heads (columns), tokens on the axes.

    One colour scale for every map, 0 to 1 with a square-root stretch, so small weights stay
    visible and maps compare with each other.
    """
    import textwrap

    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n = max(max(len(s.queries), len(s.keys)) for s in maps.sections)
    cell = float(np.clip(0.13 * n + 0.8, 2.0, 6.0))  # inches per map
    font = float(np.clip(0.8 * 72 * cell / n, 5.0, 10.0))  # label points that fit `n` labels in a cell
    cols = max(s.weights.shape[1] for s in maps.sections)
    heights = [s.weights.shape[0] * cell + 0.7 for s in maps.sections]
    width = cols * cell + 1.6
    fig = Figure(figsize=(width, sum(heights) + 0.9), layout="constrained")
    caption = textwrap.fill(maps.caption, width=int(width * 12))  # ~12 characters of 10 pt per inch
    fig.suptitle(caption + "\nrows: queries (each row sums to 1); columns: keys", fontsize=10)
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    subfigs = fig.subfigures(len(maps.sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, s in zip(subfigs, maps.sections):
        sub.suptitle(s.title, fontsize=11, fontweight="bold")
        axes = sub.subplots(s.weights.shape[0], cols, squeeze=False)
        for (layer, head), ax in np.ndenumerate(axes):
            if head >= s.weights.shape[1]:
                ax.set_axis_off()
                continue
            image = ax.imshow(s.weights[layer, head], cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            layer_id = s.layer_ids[layer] if s.layer_ids else layer  # the model's numbering, after `select`
            head_id = s.head_ids[head] if s.head_ids else head
            ax.set_title(f"layer {layer_id}, head {head_id}", fontsize=8)
            ax.set_yticks(range(len(s.queries)), s.queries if head == 0 else [], fontsize=font)
            last = layer == s.weights.shape[0] - 1
            ax.set_xticks(range(len(s.keys)), s.keys if last else [], fontsize=font, rotation=90)
        sub.colorbar(image, ax=axes, shrink=0.6, label="weight")
    return fig

"""The instruments over `hooks.forward`: logit lens, attributions, activation patching, head ablation.

Each takes a model (any family), its params and the family's keyword `inputs` (`tokens` [b, t]; and
`source` [b, s] for the encoder-decoder), and scores one output: the log-prob of token `target` at
query `position` of the (decoder's) output. The b rows of an input are the same text repeated (so
the batch shards over a mesh's data axis; `rows` makes them); results are read from row 0. Every
function jits its work, so it runs on whatever mesh the params are on (inside the run's
`use_mesh()`), and returns numpy arrays:

    run = load_run("runs/default")
    inputs = {"tokens": rows(run.tokenizer.encode("def f(x):"), run.mesh)}
    with run.use_mesh():
        lens = logit_lens(run.model, run.params, inputs)          # [L, t, v] log-probs
        attr = integrated_gradients(run.model, run.params, inputs, position=-1, target=tok)
        grid = patch(run.model, run.params, clean, corrupt, position=-1, target=tok)
        drop = ablate_heads(run.model, run.params, inputs, position=-1, target=tok)

Shapes: L = layers, t = (target) length, s = source length, h = heads, v = vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models.model import make_embed, make_head, make_norm, softcap
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.tools import hooks

# The decoder's residual stream and the norm before the output projection, by family.
_RESIDUAL = {"lm": "residual", "encdec": "decoder/residual"}
_FINAL_NORM = {"lm": "ln_f", "encdec": "decoder_norm"}
_EMBEDS = {"lm": ("embed",), "encdec": ("source_embed", "embed")}


def rows(ids: list[int], mesh=None) -> np.ndarray:
    """[n] ids -> [B, n] int32: the row repeated once per data-parallel device of `mesh` (1 without)."""
    copies = 1 if mesh is None else sharding.data_parallel_size(mesh)
    return np.tile(np.asarray(ids, np.int32)[None], (copies, 1))


def _family(model: nn.Module) -> str:
    name = model.cfg.family
    if name not in _RESIDUAL:
        raise BadValue(f"model family {name!r} has no interpretability sites; use one of {sorted(_RESIDUAL)}")
    return name


def unembed(model: nn.Module, params: Any, hidden: jax.Array) -> jax.Array:
    """The model's own output map applied to residual states [..., e]: its final norm, then the tied
    embedding or `lm_head`, soft-capped -> float32 logits [..., v] (the logit lens's decoder)."""
    cfg, name = model.cfg, _FINAL_NORM[_family(model)]
    normed = make_norm(cfg, name).apply({"params": params[name]}, hidden)
    head = make_head(cfg)
    if head is None:
        logits = make_embed(cfg).apply({"params": params["embed"]}, normed, method=nn.Embed.attend)
    else:
        logits = head.apply({"params": params["lm_head"]}, normed)
    return softcap(logits.astype(jnp.float32), cfg.final_softcap)


@functools.partial(jax.jit, static_argnames=("model",))
def _lens(model, params, inputs):
    logits, acts = hooks.forward(model, params, inputs, capture=True)
    resid = acts[_RESIDUAL[_family(model)]][:, 0]  # [L, t, e] of row 0
    return jax.nn.log_softmax(unembed(model, params, resid)), jax.nn.log_softmax(logits[0])


def logit_lens(model: nn.Module, params: Any, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(per-layer log-probs [L, t, v], the model's own log-probs [t, v]): each block's residual
    output decoded through the final norm and the unembedding, as if the model stopped there.
    The last layer's decoding is the model's own output."""
    per_layer, final = _lens(model, params, inputs)
    return np.asarray(per_layer), np.asarray(final)


def ranks(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (0 = top) of `targets` [t] in each row of `logprobs` [..., t, v] -> [..., t]."""
    chosen = np.take_along_axis(logprobs, np.broadcast_to(targets[:, None], logprobs.shape[:-1] + (1,)), -1)
    return (logprobs > chosen).sum(-1)


def _score(logits: jax.Array, position: int, target: int) -> jax.Array:
    """log p(target) at `position` of every row: [b]."""
    return jax.nn.log_softmax(logits[:, position].astype(jnp.float32))[:, target]


# ------------------------------------------------------------------------------------------------
# Attributions


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Per input token, the share of the score `f` = log p(target at position) it accounts for.

    `tokens`: {site: [n]} per embedded input ('embed' the (target) tokens; 'source_embed' the
    encoder-decoder's source); `total` = f(input) - f(baseline), what the attributions of integrated
    gradients sum to (completeness; `gap` how far they are from it, relative)."""

    tokens: dict[str, np.ndarray]
    score: float  # f(input)
    baseline_score: float  # f(baseline): every token embedded as the baseline (nan: gradient x input)
    method: str

    @property
    def total(self) -> float:
        return self.score - self.baseline_score

    @property
    def gap(self) -> float:
        summed = sum(float(a.sum()) for a in self.tokens.values())
        return abs(summed - self.total) / max(abs(self.total), 1e-9)


def _embed_score(model, inputs, position, target):
    """f(params, embeds) -> [b]: the score with each embedding site replaced by `embeds[site]`."""

    def f(params, embeds):
        edit = lambda site, layer, v: embeds[site].astype(v.dtype) if site in embeds else v  # noqa: E731
        return _score(hooks.forward(model, params, inputs, edit=edit)[0], position, target)

    return f


def _baselines(model: nn.Module, params: Any, x: dict, token: int | None) -> dict:
    """Per embedding site, the embedding the path starts from, [b, n, e]: the mean of the site's
    table (`token` None) or one token's row. Not zero: a model without additive positions sees the
    zero embedding only through its norms, and x / rms(x) jumps there, which no finite path
    integral can follow."""
    out = {}
    for site, value in x.items():
        table = params.get(site, params["embed"])["embedding"].astype(jnp.float32)  # [v, e]
        row = table.mean(0) if token is None else table[token]
        out[site] = jnp.broadcast_to(row, value.shape)
    return out


@functools.partial(jax.jit, static_argnames=("model", "position", "target", "steps", "token"))
def _integrated(model, params, inputs, position, target, steps, token):
    _, acts = hooks.forward(model, params, inputs, capture=True)
    x = {k: acts[k].astype(jnp.float32) for k in _EMBEDS[_family(model)]}
    x0 = _baselines(model, params, x, token)
    f = _embed_score(model, inputs, position, target)
    grad = jax.grad(lambda e: f(params, e).sum())  # rows are independent: each row's own gradient
    if steps == 0:  # gradient x input: the local slope times the input
        g, x0 = grad(x), jax.tree.map(jnp.zeros_like, x)
    else:  # midpoint rule over the straight path from the baseline to x
        alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
        path = lambda a: jax.tree.map(lambda v, v0: v0 + a * (v - v0), x, x0)  # noqa: E731
        g = jax.tree.map(lambda v: v.mean(0), jax.lax.map(lambda a: grad(path(a)), alphas))
    attributions = {k: (g[k] * (x[k] - x0[k])).sum(-1)[0] for k in x}  # [n] of row 0
    return attributions, f(params, x)[0], f(params, x0)[0]


def integrated_gradients(model: nn.Module, params: Any, inputs: dict, position: int, target: int,
                         steps: int = 64, baseline_token: int | None = None) -> Attribution:  # fmt: skip
    """Integrated gradients (Sundararajan et al. 2017) of log p(target at position) to each input
    token's embedding, along the straight path from the baseline (every token embedded as the mean
    embedding, or as `baseline_token`) with `steps` midpoint steps; `steps=0` gives gradient x
    input instead. Per token: the path-averaged gradient dotted with (embedding - baseline)."""
    if steps < 0:
        raise BadValue(f"steps={steps}: use 0 (gradient x input) or a positive number of steps")
    vocab = model.cfg.vocab_size
    if baseline_token is not None and not 0 <= baseline_token < vocab:
        raise BadValue(f"baseline token {baseline_token} is not in the vocabulary: use 0..{vocab - 1} or None (mean)")
    attr, score, base = _integrated(model, params, inputs, position, target, steps, baseline_token)
    tokens = {k: np.asarray(v) for k, v in attr.items()}
    method = "integrated gradients" if steps else "gradient x input"
    return Attribution(tokens, float(score), float(base) if steps else float("nan"), method)


# ------------------------------------------------------------------------------------------------
# Activation patching and head ablation


@dataclasses.dataclass(frozen=True)
class Grid:
    """Scores of one intervention per (layer, index): `scores` [L, n] log p(target at position) with
    that cell intervened on; `index` is 'position' (n = t) or 'head' (n = h)."""

    scores: np.ndarray
    base: float  # the score of the run intervened on, untouched (corrupted / unablated)
    reference: float  # patching: the clean run's score; ablation: the same as `base`
    site: str
    index: str

    @property
    def recovered(self) -> np.ndarray:
        """(scores - base) / (reference - base): 1 = the clean run's score recovered, 0 = no change."""
        span = self.reference - self.base
        return (self.scores - self.base) / (span if abs(span) > 1e-9 else np.nan)

    @property
    def effect(self) -> np.ndarray:
        """scores - base: the log-prob change each intervention caused."""
        return self.scores - self.base


def _sweep_mask(site: str, shape: tuple, j: jax.Array) -> jax.Array:
    """Where the cell j is, broadcast against one layer's value: a position (t of [b, t, ...]) or
    a head (h of the heads sites [b, t, h, d])."""
    if site.endswith("heads"):
        return (jnp.arange(shape[2]) == j)[:, None]  # [h, 1]
    return (jnp.arange(shape[1]) == j).reshape((-1,) + (1,) * (len(shape) - 2))  # [t, 1, ...]


@functools.partial(jax.jit, static_argnames=("model", "site", "position", "target"))
def _sweep(model, params, inputs, source, site, position, target):
    """Scores [L, n] of `inputs` with `site` replaced by `source` [L, b, ...] at each (layer, cell)."""
    num_layers, shape = source.shape[0], source.shape[1:]
    n = shape[2] if site.endswith("heads") else shape[1]

    def one(cell):
        layer, j = cell // n, cell % n
        edit = hooks.patch_edit(site, source, layer, _sweep_mask(site, shape, j))
        return _score(hooks.forward(model, params, inputs, edit=edit)[0], position, target)[0]

    return jax.lax.map(one, jnp.arange(num_layers * n)).reshape(num_layers, n)


@functools.partial(jax.jit, static_argnames=("model", "position", "target"))
def _captured(model, params, inputs, position, target):
    logits, acts = hooks.forward(model, params, inputs, capture=True)
    return _score(logits, position, target)[0], acts


def _check_site(model: nn.Module, acts: dict, site: str) -> None:
    layered = sorted(k for k in acts if k.rsplit("/", 1)[-1] in hooks.LAYER_SITES)
    if site not in layered:
        raise BadValue(f"site {site!r} is not one of this {model.cfg.family!r} model's sites: use one of {layered}")


def patch(model: nn.Module, params: Any, clean: dict, corrupt: dict, position: int, target: int,
          site: str = "residual") -> Grid:  # fmt: skip
    """Activation patching: the `corrupt` inputs run with `site` at one (layer, position), or one
    (layer, head) for the heads sites, taken from the `clean` run (inputs of the same shapes);
    each cell scored by log p(target at position). `Grid.recovered` is the share of the clean
    score each patch restores."""
    for key in clean:
        if np.shape(clean[key]) != np.shape(corrupt[key]):
            raise BadValue(
                f"clean and corrupted {key} differ in shape {np.shape(clean[key])} vs {np.shape(corrupt[key])}: "
                "patching needs prompts of the same number of tokens"
            )
    clean_score, acts = _captured(model, params, clean, position, target)
    _check_site(model, acts, site)
    corrupt_score, _ = _captured(model, params, corrupt, position, target)
    scores = _sweep(model, params, corrupt, acts[site], site, position, target)
    index = "head" if site.endswith("heads") else "position"
    return Grid(np.asarray(scores), float(corrupt_score), float(clean_score), site, index)


def ablate_heads(model: nn.Module, params: Any, inputs: dict, position: int, target: int,
                 mode: str = "zero", site: str = "heads") -> Grid:  # fmt: skip
    """Head ablation: each (layer, head)'s output replaced at every position by zero (`mode='zero'`)
    or by its mean over the positions of this input (`'mean'`), scored by log p(target at position);
    `Grid.effect` is the log-prob change."""
    if mode not in ("zero", "mean"):
        raise BadValue(f"ablation mode {mode!r}: use 'zero' or 'mean'")
    if not site.endswith("heads"):
        raise BadValue(f"site {site!r}: head ablation works on a heads site ('heads', 'decoder/cross_heads')")
    base, acts = _captured(model, params, inputs, position, target)
    _check_site(model, acts, site)
    heads = acts[site]  # [L, b, t, h, d]
    fill = jnp.zeros_like(heads) if mode == "zero" else jnp.broadcast_to(heads.mean(2, keepdims=True), heads.shape)
    scores = _sweep(model, params, inputs, fill, site, position, target)
    return Grid(np.asarray(scores), float(base), float(base), site, "head")

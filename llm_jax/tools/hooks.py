"""Capture and intervene: read or replace a model's named activations, without changing the model.

Every family is built from the shared `Block` (llm_jax/models/model.py), so the same sites exist in
each: flax's method interception (`nn.intercept_methods`) wraps the blocks' calls while `forward`
runs and nowhere else. Training and decoding never enter it, so their compiled programs are those of
the plain model (tests/test_interpret.py compares the lowered training step).

Sites (keys of `forward`'s captured dict and the `site` an edit sees), per stack of blocks (`''` for
the decoder-only LM; `'encoder/'`, `'decoder/'` prefixed for the encoder-decoder):

| site | shape | what |
| --- | --- | --- |
| `embed` | [b, t, e] | the token embeddings (before positions and `embed_scale`); `source_embed` the encoder's |
| `residual` | [L, b, t, e] | the residual stream after each block |
| `attn` | [L, b, t, e] | the self-attention sublayer's output (before post-norm and the residual add) |
| `heads` | [L, b, t, h, d] | self-attention per head (the input of the output projection) |
| `cross_heads` | [L, b, t, h, d] | cross-attention per head (encoder-decoder's decoder) |
| `mlp` | [L, b, t, e] | the MLP's output |
| `attention_weights` | [L, b, h, t, s] | softmax weights (read only; `cross_weights` for cross-attention) |

An edit is a function `edit(site, layer, value) -> value` called while the model is traced; `layer`
is a Python int for unrolled layers and a traced int32 under `scan_layers`, so an edit selects its
layer with `jnp.where(layer == l, ...)` or indexes a stacked source with `jnp.take(src, layer, 0)`
(`patch_edit` does both). Return `value` itself to leave a site alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention import Attention, CrossAttention
from llm_jax.models.layers import Mlp
from llm_jax.models.model import Block

Array = jax.Array
Edit = Callable[[str, Any, Array], Array]
LAYER_SITES = ("residual", "attn", "heads", "cross_heads", "mlp")
_COLLECTION = "intermediates"
_SOWN = {"residual": "site_residual", "attn": "site_attn", "heads": "site_heads", "cross_heads": "site_cross_heads",
         "mlp": "site_mlp", "embed": "site_embed", "source_embed": "site_source_embed"}  # fmt: skip
_UNSOWN = {v: k for k, v in _SOWN.items()}


@dataclasses.dataclass
class _Hooks:
    """The interceptor: knows the block being traced (its stack and layer) so inner sites can be named."""

    edit: Edit | None
    capture: bool
    blocks: list = dataclasses.field(default_factory=list)  # (stack prefix, layer, block, (b, t))
    embeds: int = 0  # Embed calls seen so far (the encoder-decoder embeds its source first)

    def site(self, name: str, value: Array, owner: nn.Module | None = None, layer: Any = None) -> Array:
        if self.edit is not None:
            value = self.edit(name, layer, value)
        if self.capture and owner is not None:
            owner.sow(_COLLECTION, _SOWN[name.rsplit("/", 1)[-1]], value)
        return value

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, Block):
            if args[-1]:  # `fill`: the decoding set-up of cross-attention, no activations
                return next_fun(*args, **kwargs)
            stack = "/".join(str(p) for p in module.path[:-1])
            prefix = stack + "/" if stack else ""
            self.blocks.append((prefix, args[1], module, args[0].shape[:2]))
            try:
                x, out = next_fun(*args, **kwargs)
            finally:
                self.blocks.pop()
            return self.site(prefix + "residual", x, module, args[1]), out
        if isinstance(module, nn.Embed) and not self.blocks:
            # The encoder-decoder embeds the source first (shared table or its own `source_embed`).
            name = "source_embed" if self._is_source(module) else "embed"
            self.embeds += 1
            return self.site(name, next_fun(*args, **kwargs), module)
        if not self.blocks:
            return next_fun(*args, **kwargs)
        prefix, layer, block, (b, t) = self.blocks[-1]
        if isinstance(module, Mlp):
            return self.site(prefix + "mlp", next_fun(*args, **kwargs), block, layer)
        if isinstance(module, Attention):
            return self.site(prefix + "attn", next_fun(*args, **kwargs), block, layer)
        parent = module.parent
        if module.name == "out" and isinstance(parent, (Attention, CrossAttention)):
            name = "heads" if isinstance(parent, Attention) else "cross_heads"
            rows = args[0]  # [b * t, h, d]: `layers.dense` merges batch and length for the matmul
            heads = self.site(prefix + name, rows.reshape(b, t, *rows.shape[1:]), block, layer)
            return next_fun(heads.reshape(rows.shape), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    def _is_source(self, module: nn.Module) -> bool:
        parent = module.parent
        if getattr(getattr(parent, "cfg", None), "family", "lm") != "encdec":
            return False
        return module.name == "source_embed" or (parent.cfg.share_embeddings and self.embeds == 0)


def forward(model: nn.Module, params: Any, inputs: dict, edit: Edit | None = None, capture: bool = False,
            **kwargs) -> tuple[Array, dict[str, Array]]:  # fmt: skip
    """(logits, captured): `model` applied to `inputs` (its family's keyword inputs: `tokens` [b, t];
    and `source` [b, s] for the encoder-decoder) with `edit` applied at every site and, when
    `capture`, every site's value (after the edit) as {site: array} (shapes in the module docstring).

    Pure and traceable: jit it (or take its gradient) like any function of `params` and `inputs`.
    With neither edit nor capture it is `model.apply` itself.
    """
    variables = {"params": params}
    if edit is None and not capture:
        return model.apply(variables, **inputs, **kwargs), {}
    hooks = _Hooks(edit, capture)
    with nn.intercept_methods(hooks):  # flax keeps interceptors per thread: other threads see none
        if not capture:
            return model.apply(variables, **inputs, **kwargs), {}
        logits, state = model.apply(variables, **inputs, mutable=[_COLLECTION], **kwargs)
    return logits, collect(state[_COLLECTION])


def collect(intermediates: Any) -> dict[str, Array]:
    """flax's 'intermediates' tree -> {site: array}, layers stacked first ([L, ...]) whether the
    model scanned its layers (one stacked leaf) or unrolled them (`layers_0`, `layers_1`, ...)."""
    found: dict[str, list[tuple[int, Array]]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        names = [str(k.key) for k in path if hasattr(k, "key")]
        leaf = names[-1]
        site = _UNSOWN.get(leaf) or ("cross_weights" if "cross_attn" in names else leaf)
        at = next((i for i, n in enumerate(names) if n == "layers" or n.startswith("layers_")), None)
        if at is None:  # an embedding
            found.setdefault(site, []).append((0, value))
            continue
        key = "/".join(names[:at] + [site])
        if names[at] == "layers":  # scanned: already [L, ...]
            found.setdefault(key, []).extend(enumerate(value))
        else:
            found.setdefault(key, []).append((int(names[at].split("_")[1]), value))
    out = {}
    for key, items in found.items():
        values = [v for _, v in sorted(items, key=lambda x: x[0])]
        out[key] = values[0] if key.endswith("embed") else jnp.stack(values)
    return out


def patch_edit(site: str, source: Array, layer: int | Array, where: Array) -> Edit:
    """An edit that replaces `site` at `layer` by `source` ([L, b, t, ...] captured from another run)
    where the mask `where` (broadcast against one layer's value, e.g. [t, 1] for positions or
    [1, h, 1] for heads) is True. `layer` may be traced (a sweep over layers)."""

    def edit(name: str, at: Any, value: Array) -> Array:
        if name != site:
            return value
        patched = jnp.where(where, jnp.take(source, at, axis=0).astype(value.dtype), value)
        return jnp.where(jnp.asarray(at) == layer, patched, value)

    return edit

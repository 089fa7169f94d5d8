"""The machinery of the Hugging Face tables: `Tensor` rows, `Spec`s, and config.json helpers.

One `Spec` per architecture (in hf_gpt2.py, hf_llama.py, hf_gemma.py; chosen in hf_specs.py) is
read by both import and export.

A spec holds
- the config.json <-> ModelConfig mapping: `from_hf(config.json) -> ModelConfig keyword arguments`
  (an HFError names any field whose value llm_jax cannot reproduce exactly, never a silent guess),
  `to_hf(cfg) -> config.json fields`, and `requires(cfg)`: the ModelConfig fields the architecture
  fixes, as {field: (value, wanted)}; export writes the first spec that `cfg` fits;
- one tensor table of `Tensor(HF name, our parameter path(s), layout)` entries. The layout is an
  einops-style rearrangement, 'HF axes -> our axes', e.g. '(h d) e -> e h d' for a q_proj weight
  [h*d, e] that is our query kernel [e, h, d]. Import reads it left to right (reshape, transpose:
  views into the memory-mapped file, nothing copied), export right to left. A fused HF tensor maps
  to several of ours along the letter `n` (GPT-2's c_attn: 'e (n h d) -> n e h d' is q, k, v).

Letters: e = embed_dim, h = num_heads, k = kv heads, d = head dim, m = mlp_dim, v = vocab_size,
x = num_experts, f = an expert's hidden size, n = how many of our parameters a fused tensor holds,
r = a LoRA rank (`Tensor.lora_rows`: PEFT's adapters of an nn.Linear row, derived from its layout).
Names with '{i}' repeat for every layer (or the layers `layers(cfg, i)` picks: MoE or dense ones), and
their paths are relative to the layer ('layers_{i}/...', or stacked on 'layers/...' when scanned).
Names with '{j}' repeat for every expert: expert j's tensor is row j of our stacked [experts, ...]
parameter (Mixtral saves 'experts.{j}.w1.weight' [f, e] for our wi_gate [x, e, f], layout 'f e -> e f').

A new architecture is one more `Spec` (its three config functions and its table) added to
`hf_specs.SPECS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from llm_jax.models.config import ModelConfig
from llm_jax.runtime.errors import BadValue


class HFError(BadValue):
    """A Hugging Face directory or config this codebase cannot convert exactly."""


def always(cfg: ModelConfig) -> bool:
    return True


def untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_embeddings


def attention_bias(cfg: ModelConfig) -> bool:
    return cfg.attention_use_bias


def mlp_bias(cfg: ModelConfig) -> bool:
    return cfg.mlp_use_bias


def out_bias(cfg: ModelConfig) -> bool:
    return cfg.attention_out_use_bias


def qk_norm(cfg: ModelConfig) -> bool:
    return cfg.qk_norm


def every_layer(cfg: ModelConfig, layer: int) -> bool:
    return True


def moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return bool(cfg.is_moe(layer))


def dense_layer(cfg: ModelConfig, layer: int) -> bool:
    return not cfg.is_moe(layer)


def sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each layout letter under `cfg`."""
    return {
        "e": cfg.embed_dim,
        "h": cfg.num_heads,
        "k": cfg.kv_heads,
        "d": cfg.dim_per_head,
        "m": cfg.mlp_dim,
        "v": cfg.vocab_size,
        "x": cfg.num_experts,
        "f": cfg.expert_dim,
    }


def _axes(side: str) -> tuple[str, ...]:
    """'e (n h d)' -> ('e', 'nhd'): the letters that make up each axis."""
    out, group = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = ""
        elif token == ")":
            out.append(group)
            group = None
        elif group is not None:
            group += token
        else:
            out.append(token)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One row of a tensor table: an HF tensor and the parameter(s) of ours it holds."""

    hf: str  # the name transformers saves it under; '{i}' is the layer index
    ours: str | tuple[str, ...]  # our parameter path 'attn/query/kernel', or several for a fused tensor
    layout: str | None = None  # 'HF axes -> our axes' (module docstring); None: the very same array
    when: Callable[[ModelConfig], bool] = always  # whether `cfg` has this tensor (biases, untied head)
    layers: Callable[[ModelConfig, int], bool] = every_layer  # which layers have it ('{i}' names)
    _src: tuple[str, ...] = dataclasses.field(init=False, repr=False)  # HF axes' letters: ('e', 'nhd')
    _dst: str = dataclasses.field(init=False, repr=False)  # our axes, a letter each: 'nehd'

    def __post_init__(self):
        ours = (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)
        src, dst = (_axes(side) for side in self.layout.split("->")) if self.layout else ((), ())
        # A typo in a table is a bug of llm_jax, not a user error: it fails when this module is imported.
        if self.layout and (sorted("".join(src)) != sorted(dst) or any(len(a) != 1 for a in dst)):
            raise ValueError(f"{self.hf}: layout {self.layout!r} must rearrange the same letters, one per our axis")
        if (len(ours) > 1) != ("n" in dst) or (len(ours) > 1 and dst[0] != "n"):
            raise ValueError(f"{self.hf}: {len(ours)} parameters need a layout whose leading axis of ours is n")
        object.__setattr__(self, "ours", ours)
        object.__setattr__(self, "_src", src)
        object.__setattr__(self, "_dst", "".join(dst))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf

    def paths(self) -> list[tuple[str, ...]]:
        """Our parameter path(s) as tuples of keys."""
        return [tuple(p.split("/")) for p in self.ours]

    def hf_shape(self, dims: dict[str, int]) -> tuple[int, ...] | None:
        """The HF tensor's shape under `dims` (None without a layout: then it is our parameter's)."""
        dims = {**dims, "n": len(self.ours)}
        return tuple(math.prod(dims[c] for c in axis) for axis in self._src) if self.layout else None

    def to_ours(self, x: np.ndarray, dims: dict[str, int]) -> list[np.ndarray]:
        """The HF tensor -> our parameter(s), as views of `x` (a memory map stays a memory map).

        E.g. '(h d) e -> e h d': x [h*d, e] -> [[e, h, d]]; 'e (n h d) -> n e h d': x [e, 3*h*d] ->
        three [e, h, d].
        """
        if not self.layout:
            return [x]
        letters = "".join(self._src)
        dims = {**dims, "n": len(self.ours)}
        y = x.reshape([dims[c] for c in letters]).transpose([letters.index(c) for c in self._dst])
        return list(y) if len(self.ours) > 1 else [y]

    def to_hf(self, arrays: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
        """Our parameter(s) -> the HF tensor: the inverse of `to_ours` (three [e, h, d] -> [e, 3*h*d])."""
        if not self.layout:
            return arrays[0]
        letters = "".join(self._src)
        x = np.stack(arrays) if len(self.ours) > 1 else arrays[0]
        return x.transpose([self._dst.index(c) for c in letters]).reshape(self.hf_shape(dims))

    def lora_rows(self, num_in: int) -> tuple[Tensor, Tensor] | None:
        """PEFT's two tensors for LoRA adapters on this row's nn.Linear weight [out, in]: lora_A
        [r, in] <-> our `lora_a` [*in, r] and lora_B [out, r] <-> our `lora_b` [r, *out] (`num_in`:
        how many of our kernel's leading axes are its input; letter r = the rank). Both derive from
        this row's layout, e.g. '(h d) e -> e h d' (q_proj) gives 'r e -> e r' and '(h d) r -> r h d'.
        None when the HF tensor is not an nn.Linear weight: GPT-2's Conv1D [in, out], a fused tensor."""
        if len(self.ours) != 1 or len(self._src) != 2 or not self.ours[0].endswith("/kernel"):
            return None
        ins, outs = self._dst[:num_in], self._dst[num_in:]
        src_out, src_in = self._src
        if sorted(src_in) != sorted(ins) or sorted(src_out) != sorted(outs):
            return None

        def group(letters: str) -> str:
            return letters if len(letters) == 1 else f"({' '.join(letters)})"

        module, where = self.hf.removesuffix(".weight"), self.ours[0].removesuffix("kernel")
        a = Tensor(f"{module}.lora_A.weight", where + "lora_a", f"r {group(src_in)} -> {' '.join(ins)} r", self.when)
        b = Tensor(f"{module}.lora_B.weight", where + "lora_b", f"{group(src_out)} r -> r {' '.join(outs)}", self.when)
        return a, b


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything llm_jax knows about one Hugging Face architecture (module docstring)."""

    architecture: str  # config.json 'architectures' entry, e.g. 'GPT2LMHeadModel'
    model_type: str  # config.json 'model_type'; also our preset name 'hf:<model_type>'
    from_hf: Callable[[dict], dict]  # config.json -> ModelConfig kwargs (function-defining fields)
    to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> config.json fields
    requires: Callable[[ModelConfig], dict]  # {ModelConfig field: (value, wanted)} this architecture fixes
    needs: str  # `requires` in words, for the export error
    backbone: str  # prefix of the backbone's tensor names; some old uploads save them without it
    table: tuple[Tensor, ...]
    buffers: tuple[str, ...] = ()  # suffixes of non-parameter tensors some checkpoints carry (masks, tables)
    tied_head: str = "lm_head.weight"  # a copy of the embedding some tied checkpoints save anyway

    def misfits(self, cfg: ModelConfig) -> list[str]:
        """ModelConfig fields of `cfg` this architecture cannot express ([] = exportable as this)."""
        return [k for k, (value, wanted) in self.requires(cfg).items() if value != wanted]

    def ignorable(self, name: str, cfg: ModelConfig) -> bool:
        """Whether a checkpoint tensor that the table does not read may be left out."""
        return name.endswith(self.buffers) or (cfg.tie_embeddings and name == self.tied_head)


# ----------------------------------------------------------------------------------------------
# config.json helpers


def get(hf_cfg: dict, key: str, default=None):
    """hf_cfg[key], with `default` also for an explicit null (transformers writes nulls)."""
    value = hf_cfg.get(key, default)
    return default if value is None else value


def require(hf_cfg: dict, key: str, ok: Callable[[Any], bool], default, why: str):
    value = get(hf_cfg, key, default)
    if not ok(value):
        raise HFError(f"config.json {key}={value!r} is not supported: {why}")
    return value


# The value each ModelConfig field below has in a classic (GPT-2 / Llama) decoder: an architecture
# that cannot express a field in its config.json needs the field at this value.
_PLAIN = dict(
    family="lm",
    layer_pattern="g",
    local_rope_theta=None,
    qk_norm=False,
    norm_plus_one=False,
    post_norms=False,
    embed_scale=False,
    query_scale=None,
    attn_softcap=None,
    final_softcap=None,
    num_experts=0,
)


def fixed(cfg: ModelConfig, free: tuple[str, ...] = (), **wanted) -> dict:
    """{field: (cfg's value, the value an architecture needs)}: the plain values of `_PLAIN` except
    the `free` fields (the architecture writes them to config.json), then `wanted`."""
    out = {k: (getattr(cfg, k), v) for k, v in _PLAIN.items() if k not in free}
    return {**out, **{k: (getattr(cfg, k), v) for k, v in wanted.items()}}


_KINDS = {"full_attention": "g", "sliding_attention": "l"}


def layer_pattern(types: list[str]) -> str:
    """config.json `layer_types` -> our `layer_pattern`: the shortest cycle of 'g'/'l' that repeats into it."""
    bad = sorted({t for t in types if t not in _KINDS})
    if bad:
        raise HFError(f"config.json layer_types {bad} are not supported: llm_jax has {sorted(_KINDS)}")
    full = "".join(_KINDS[t] for t in types)
    return next(full[:p] for p in range(1, len(full) + 1) if all(c == full[i % p] for i, c in enumerate(full)))


def layer_types(cfg: ModelConfig) -> list[str]:
    """Our `layer_pattern` -> config.json `layer_types`, one per layer."""
    return ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.num_layers)]


def window_fields(pattern: str, window) -> dict:
    """ModelConfig's layer_pattern and sliding_window (None when no layer is local, whatever config.json says)."""
    if "l" in pattern and not window:
        raise HFError("config.json has sliding-window layers but no sliding_window size")
    return {"layer_pattern": pattern, "sliding_window": int(window) if "l" in pattern else None}

"""The model-family interface: what training, checkpoints and decoding need from a kind of model.

A family (decoder-only LM in `llm_jax/models/lm.py`; a new one in a file of its own) subclasses
`ModelFamily` and implements five methods:

- `make_model(cfg)`: the `flax.linen` module for a `ModelConfig`;
- `init_inputs(cfg, batch, length)`: the keyword inputs `model.init` is traced with;
- `loss_sum(model, params, batch, rng, train)`: summed loss and token count of a
  batch (a dict of [b, t] arrays from the family's data, shaped as `batch_spec` says: next-token
  `inputs` / `targets` unless the family overrides it; `random_batch` makes one of random tokens).
  `train`: dropout (if any) and label smoothing apply; False is evaluation: the plain cross-entropy;
- `init_cache(model, params, batch, length, start, mesh, **inputs)`: a decoding `Cache` of `length`
  slots whose next position is `start` [b] (negative while a left-padded row is still on padding);
- `tokens_to_logits(model, params)`: the decoding step `(tokens [b, t], cache) -> (logits [b, v]
  of the last position, cache)`, built once per generation so per-call work stays out of the loop.

Optional: `train_loss(model, params, batch, rng)`, the objective the training step differentiates
when it is more than the loss (auxiliary losses, with their metrics); `score(model, params, tokens,
index, targets)`, the log-probabilities of chosen next tokens (what evaluators such as
llm_jax/evaluation/ measure, through this interface only).

Everything else is written once over these: `training/state.py` (state, steps), `training/loop.py`, `checkpoint.py`,
`decode.py` (samplers, sliding window, beam search). `register` adds a family under its `name`;
`get(name)` / `of(model)` find it. The two helpers below are the only places that call
`model.init`: `init_params` for training state and `empty_cache` for decoding caches.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models import flops
from llm_jax.runtime.errors import BadValue

# Families shipped with llm_jax, imported on first use (each module registers its family).
_BUILTIN = {"lm": "llm_jax.models.lm", "encdec": "llm_jax.models.encdec"}
_REGISTRY: dict[str, ModelFamily] = {}


@flax.struct.dataclass
class Cache:
    """Decoding state: the model's 'cache' collection, the next position of every row, its sharding."""

    layers: Any  # the model's 'cache' collection (keys/values [b, k, c, d], positions [b, c], ...)
    next_pos: jax.Array  # [b] int32: position of the next token fed; negative while on left padding
    specs: Any = flax.struct.field(pytree_node=False)  # FrozenDict of logical PartitionSpecs of `layers`
    mesh: Any = flax.struct.field(pytree_node=False, default=None)  # where `layers` is sharded (None: context)

    def constrain(self, layers: Any) -> Any:
        """`layers` constrained to the cache's logical sharding (a no-op outside a mesh)."""
        return nn.with_logical_constraint(layers, flax.core.unfreeze(self.specs), mesh=self.mesh)


class ModelFamily:
    """Base class of a model family; see the module docstring for the contract."""

    name: str = ""
    # Cache leaves whose empty value is not 0 (e.g. slot positions, -1 = empty).
    cache_fill: dict[str, int] = {}

    def make_model(self, cfg) -> nn.Module:
        raise NotImplementedError

    def init_inputs(self, cfg, batch: int, length: int) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss_sum(self, model, params, batch: dict, rng, train: bool) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def train_loss(self, model, params, batch: dict, rng) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
        """What the training step differentiates: (objective sum, (loss sum, token count, metrics)).

        By default the objective is `loss_sum(..., train=True)` itself and there are no metrics; a
        family with auxiliary losses (mixture of experts, llm_jax/models/lm.py) adds them to the
        objective (per token, times the count) and reports them as metrics (per-batch means).
        """
        total, count = self.loss_sum(model, params, batch, rng, True)
        return total, (total, count, {})

    def batch_spec(
        self, cfg, batch: int, length: int, *, weights: bool = False, packed: bool = False
    ) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a training batch of the family's data (what a step is compiled for).

        By default next-token data (llm_jax/data/lm_data.py): `inputs` / `targets` [batch, length]
        int32; `weights` [batch, length] float32 when the data weighs its targets; `segment_ids` /
        `positions` [batch, length] int32 when it packs documents (`packed`). Which of these a run's
        data yields: `lm_data.batch_options(config.data)`.
        """
        keys = {"inputs": jnp.int32, "targets": jnp.int32}
        keys.update({"weights": jnp.float32} if weights else {})
        keys.update({"segment_ids": jnp.int32, "positions": jnp.int32} if packed else {})
        return {k: jax.ShapeDtypeStruct((batch, length), dt) for k, dt in keys.items()}

    def random_batch(
        self, cfg, batch: int, length: int, seed: int, *, weights: bool = False, packed: bool = False
    ) -> dict[str, np.ndarray]:
        """A training batch of random tokens with the arrays of `batch_spec` (for benchmarks): next-token
        `inputs` / `targets` by default, every row one unpacked sequence (`filled`)."""
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length + 1), dtype=np.int32)
        spec = self.batch_spec(cfg, batch, length, weights=weights, packed=packed)
        return filled(spec, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})

    def init_cache(self, model, params, batch: int, length: int, start: jax.Array, mesh=None, **inputs) -> Cache:
        raise NotImplementedError

    def flops_per_token(self, cfg, seq_len: int) -> float:
        """Training FLOPs per token (for MFU); a decoder-only Transformer's count by default."""
        return flops.decoder_flops_per_token(cfg, seq_len)

    def tokens_to_logits(self, model, params):
        raise NotImplementedError

    def score(self, model, params, tokens, index, targets) -> tuple[jax.Array, jax.Array]:
        """Log-probabilities of next tokens, exactly as the model predicts them (every output
        transform, e.g. a final soft-cap, included).

        tokens [b, t] int32: the input, attended causally (right padding never changes what earlier
        positions see); index [b, c] int32: positions of `tokens` to read, in [0, t); targets [b, c]
        int32: the token each read position should predict. Returns (log p(target) [b, c] float32,
        greedy [b, c] bool: the target is the arg-max there). Only families that predict next tokens
        implement it.
        """
        raise NotImplementedError(f"model family {self.name!r} does not score next tokens")


def filled(spec: dict[str, jax.ShapeDtypeStruct], tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A host batch of `spec`: the given `tokens` arrays, and every other key as if each row held one
    sequence: positions 0..t-1 (keys ending in 'positions'), segment ids and weights 1."""

    def array(key, s):
        if key in tokens:
            return tokens[key]
        if key.endswith("positions"):
            return np.broadcast_to(np.arange(s.shape[-1], dtype=s.dtype), s.shape).copy()
        return np.ones(s.shape, s.dtype)

    return {k: array(k, s) for k, s in spec.items()}


def register(family: ModelFamily) -> ModelFamily:
    """Makes `family` available as `ModelConfig.family == family.name`; returns it."""
    if not family.name:
        raise ValueError(f"{type(family).__name__} needs a non-empty `name`")
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> ModelFamily:
    """The family registered under `name` (built-in ones are imported on first use)."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN))
        raise BadValue(f"config.model.family={name!r} is not a model family; use one of {known}")
    return _REGISTRY[name]


def of(model: nn.Module) -> ModelFamily:
    """The family of a module built by `make_model` (from its `cfg.family`)."""
    return get(model.cfg.family)


def build(cfg) -> nn.Module:
    """The module for `cfg`, made by its family."""
    return get(cfg.family).make_model(cfg)


def init_params(model: nn.Module, rng: jax.Array, length: int) -> Any:
    """Boxed (LogicallyPartitioned) parameters of `model`: the one `model.init` for training state."""
    inputs = of(model).init_inputs(model.cfg, 1, length)
    return model.init(rng, **inputs)["params"]


def abstract_params(model: nn.Module, length: int = 1) -> Any:
    """Boxed ShapeDtypeStructs of `model`'s parameters: nothing is computed or allocated."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), length))


def empty_cache(model: nn.Module, inputs: dict, mesh=None) -> tuple[Any, Any]:
    """(cache collection, logical specs) of `model.init(..., decode=True)` on `inputs`: the one
    `model.init` for decoding caches. Built from shapes only: zeros, or `cache_fill` values."""
    # Shapes only, so no sharding constraints while tracing `init` (flax's DenseGeneral applies its
    # kernel's logical constraint to the flattened kernel, which fails under `jax.set_mesh`).
    with nn.logical_axis_rules(()):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs, decode=True)["cache"])
    specs = nn.get_partition_spec(boxed)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    abstract = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)
    fill = of(model).cache_fill

    def empty(path, x):
        return jnp.full(x.shape, fill.get(path[-1].key, 0), x.dtype)

    cache = jax.tree_util.tree_map_with_path(empty, abstract)
    return nn.with_logical_constraint(cache, specs, mesh=mesh), flax.core.freeze(specs)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per (target) token of `cfg` (a ModelConfig) at context `seq_len`, as its family
    counts them (`ModelFamily.flops_per_token`; MaxText's accounting, llm_jax/models/flops.py)."""
    return get(cfg.family).flops_per_token(cfg, seq_len)

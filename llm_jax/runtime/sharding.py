"""Mesh, logical axis rules and shardings.

The model names logical axes; this file alone maps them onto the physical mesh axes
`(data, fsdp, expert, sequence, tensor)` (`expert` and `sequence` are 1 unless a run asks for them):
- batch-like activation axes go over `data` x `fsdp` x `expert` (every device sees a different slice of
  the batch);
- the MoE layers' experts are split over `expert` (tokens reach them by all-to-all);
- parameters are sharded over `fsdp` along their `embed` dim (ZeRO-3 style: gathered per layer in
  the forward pass, gradients reduce-scattered), and over `tensor` along heads / mlp / vocab
  (Megatron style);
- with a `sequence` axis, activations (and the KV cache) are split along their length over it
  (context parallelism: llm_jax/models/context_parallel.py) and parameters along `embed` over
  fsdp x sequence (`logical_rules`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.runtime.errors import BadValue

# Outermost to innermost: `tensor` last, so its all-reduces stay on neighbouring chips.
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
# `expert` acts as a data axis outside the MoE layers (MaxText): a batch is split over all three.
BATCH_AXES = ("data", "fsdp", "expert")

# (logical name, mesh axis or axes or None). The first rule whose mesh axes are still free wins,
# so e.g. 'activation_heads' falls back to replication if 'tensor' is already used in a spec.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),  # expert parallelism (llm_jax/models/expert_parallel.py)
    ("kv", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", "sequence"),  # context parallelism (models/context_parallel.py)
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache: sharded like the activations that fill it
    ("cache_batch", BATCH_AXES),
    ("cache_length", "sequence"),  # a long prompt's cache split along its length
    ("cache_kv_heads", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills in one -1 entry so the product equals num_devices; errors name the fix."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise BadValue(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise BadValue(f"mesh shape {shape}: at most one axis may be -1 (fill in the remaining devices)")
    if any(s == 0 or s < -1 for s in shape):
        raise BadValue(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise BadValue(
                f"mesh shape {dict(zip(MESH_AXES, shape))}: the fixed axes multiply to {known}, which does not "
                f"divide the {num_devices} available devices; choose sizes whose product divides {num_devices}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise BadValue(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {num_devices} are "
            f"available; make the product {num_devices} or set one axis to -1"
        )
    return shape


def mesh_sizes(mesh_config) -> list[int]:
    """The configured size of each of MESH_AXES (-1 = fill in); an axis a config lacks (a run saved
    before that axis existed) is 1."""
    return [int(getattr(mesh_config, axis, 1)) for axis in MESH_AXES]


def shown_axes(mesh_shape: dict) -> dict:
    """The axes worth printing of a {axis: size} mesh shape: data, fsdp and tensor always, the
    optional axes (expert, sequence) only when a run uses them."""
    return {k: int(v) for k, v in mesh_shape.items() if k in ("data", "fsdp", "tensor") or int(v) > 1}


def mesh_label(mesh_shape: dict) -> str:
    """A table cell for a {axis: size} mesh shape: 'data/fsdp/tensor', then any optional axis in
    use, e.g. '1/8/1' or '1/4/1 expert=4'."""
    core = "/".join(str(int(mesh_shape.get(k, 1))) for k in ("data", "fsdp", "tensor"))
    extra = [f"{k}={v}" for k, v in shown_axes(mesh_shape).items() if k not in ("data", "fsdp", "tensor")]
    return " ".join([core, *extra])


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with MESH_AXES from a config with those keys (-1 = fill in)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_sizes(mesh_config), len(devices))
    dcn = _slices_axis(shape, devices)
    try:
        # Topology-aware placement on TPU/GPU; on CPU it is a plain reshape.
        if dcn is None:
            grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
        else:
            per_slice = tuple(s // d for s, d in zip(shape, dcn))
            grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    # Mesh(...) rather than jax.make_mesh: the latter defaults to Explicit axis types in new JAX,
    # and we want the same (auto) behaviour from JAX 0.10 to 0.12.
    return Mesh(grid, MESH_AXES)


def _slices_axis(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> tuple[int, ...] | None:
    """How TPU slices divide the mesh axes, e.g. (2, 1, 1, 1, 1) for 2 slices along data; None for one slice.

    Slices talk over the data-centre network, far slower than the chips' own links: they go along
    `data` (only the gradient all-reduce crosses them), else along `fsdp`; each slice's own share of
    the mesh is then laid out topology-aware inside it.
    """
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices <= 1:
        return None
    for axis in range(2):  # data, then fsdp
        if shape[axis] % num_slices == 0:
            return tuple(num_slices if i == axis else 1 for i in range(len(shape)))
    raise BadValue(
        f"mesh {dict(zip(MESH_AXES, shape))} over {num_slices} TPU slices: neither data nor fsdp is a multiple "
        f"of {num_slices}; set config.mesh.data (or config.mesh.fsdp) to a multiple of the number of slices"
    )


def logical_rules(config=None) -> tuple[tuple[str, Any], ...]:
    """The rules in force: the defaults, with per-name overrides from `config.mesh.rules` if any.

    With a sequence axis (`config.mesh.sequence` not 1) parameters are split over it too, along
    `embed` with `fsdp`: its devices see different tokens of the same rows, so like data-parallel
    devices they need a layer's weights only while computing it (ZeRO-3 over fsdp x sequence)."""
    mesh_config = getattr(config, "mesh", None)
    overrides = dict(getattr(mesh_config, "rules", None) or {})
    if int(getattr(mesh_config, "sequence", 1)) != 1:
        overrides = {"embed": ("fsdp", "sequence"), **overrides}
    rules = tuple((name, overrides.pop(name, axes)) for name, axes in LOGICAL_RULES)
    return rules + tuple(overrides.items())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
    """Context for tracing model code on `mesh`: the logical activation constraints take effect.

    `jax.set_mesh`, not the legacy `with mesh:`: flax applies `with_logical_constraint` only when an
    abstract mesh is set, which `with mesh:` does not do (every activation constraint was silently
    dropped). Trace `init` outside it: flax's DenseGeneral constrains its flattened kernel there.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def boxed_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` (e.g. from eval_shape)."""
    return logical_to_shardings(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] token batch: rows over data x fsdp x expert, length over
    sequence (the activations' own split, so context parallelism starts without a reshuffle)."""
    return NamedSharding(mesh, P(BATCH_AXES, "sequence"))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays of any rank and length by their rows alone (data x fsdp x expert)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def host_to_global(local: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (numpy) -> global jax.Arrays sharded by `batch_sharding`.

    Each process passes only its own slice; the global batch is their concatenation in process
    order.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def check_divisible(mesh: Mesh, model_cfg, global_batch: int, seq_len: int | None = None) -> None:
    """Fails early, naming the value, when a dimension cannot be split over its mesh axis."""
    dp = data_parallel_size(mesh)
    tp = mesh.shape["tensor"]
    fsdp = mesh.shape["fsdp"]
    problems = []
    if global_batch % dp:
        problems.append(f"batch_size={global_batch} is not divisible by data*fsdp*expert={dp}")
    if seq_len is not None and seq_len % mesh.shape["sequence"]:
        problems.append(f"data.seq_len={seq_len} is not divisible by mesh sequence={mesh.shape['sequence']}")
    for name, value in (
        ("num_heads", model_cfg.num_heads),
        ("num_kv_heads", model_cfg.kv_heads),
        ("mlp_dim", model_cfg.mlp_dim),
        ("vocab_size (padded)", model_cfg.vocab_size),
    ):
        if value % tp:
            problems.append(f"model {name}={value} is not divisible by mesh tensor={tp}")
    ep = mesh.shape["expert"]
    if getattr(model_cfg, "num_experts", 0) and (model_cfg.num_experts % ep or model_cfg.expert_dim % tp):
        problems.append(
            f"model num_experts={model_cfg.num_experts} must be divisible by mesh expert={ep} and "
            f"expert_dim={model_cfg.expert_dim} by mesh tensor={tp}"
        )
    if model_cfg.embed_dim % fsdp:
        problems.append(f"model embed_dim={model_cfg.embed_dim} is not divisible by mesh fsdp={fsdp}")
    elif model_cfg.embed_dim % (fsdp * mesh.shape["sequence"]):  # embed over fsdp x sequence (logical_rules)
        n = fsdp * mesh.shape["sequence"]
        problems.append(f"model embed_dim={model_cfg.embed_dim} is not divisible by mesh fsdp*sequence={n}")
    if problems:
        raise BadValue(
            f"mesh {dict(mesh.shape)} does not fit this run: "
            + "; ".join(problems)
            + ". Change the mesh sizes (config.mesh.*) or the sizes named."
        )

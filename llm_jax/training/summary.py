"""A model summary: parameters per module, FLOPs per token, the mesh, every parameter's shape and sharding.

    print(summarize(model, params, mesh, rules, seq_len=128))   # the trainer prints it at start-up
    facts = summary_dict(model, params, mesh, rules, seq_len=128)

`params` may be the trained arrays (their own shardings are shown), host numpy arrays, or
nothing (the model's abstract parameters: shapes from `jax.eval_shape`, shardings from `rules`
on `mesh`). Repeated blocks collapse into one row: `layers_[0-3]/attn/query/kernel x4`. Logical
axis names come from the model's own annotations (llm_jax/models/model.py), the mesh axes from the rules
(llm_jax/runtime/sharding.py), so the table shows what the trainer actually does with each tensor.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import flax.linen as nn
import jax
import numpy as np

from llm_jax.models import family as family_lib
from llm_jax.models import flops as flops_lib
from llm_jax.models import lora
from llm_jax.runtime import sharding

_LAYER = re.compile(r"layers_(\d+)")


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _spec_text(spec) -> str:
    """PartitionSpec('fsdp', None) -> 'fsdp,-'; fully replicated -> 'replicated'."""
    if spec is None:
        return "?"
    parts = [("-" if a is None else "+".join(a) if isinstance(a, tuple) else str(a)) for a in spec]
    return "replicated" if all(p == "-" for p in parts) else ",".join(parts)


def _per_device(shape, spec, mesh) -> int:
    """Elements of one device's shard of a tensor of `shape` laid out as `spec` on `mesh`."""
    if spec is None or mesh is None:
        return math.prod(shape)
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= -(-dim // math.prod(mesh.shape[a] for a in axes))
    return n


def nbytes(elements: int, dtype) -> int:
    """Bytes of `elements` values of `dtype`, int4 packed two to a byte (as `quant.weight_bytes`
    counts them: TPUs and GPUs store them so; XLA on CPU keeps a byte each)."""
    dtype = np.dtype(dtype)
    return elements // 2 if dtype.name == "int4" else elements * dtype.itemsize


def tree_bytes(tree) -> tuple[int, int]:
    """(bytes in all, bytes one device holds) of a tree of arrays or ShapeDtypeStructs: each leaf's
    shard under its own sharding (a leaf without one counts whole on every device)."""
    total = per_device = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(int(d) for d in x.shape)
        sharding = getattr(x, "sharding", None)
        shard = shape if sharding is None else tuple(sharding.shard_shape(shape))
        total += nbytes(math.prod(shape), x.dtype)
        per_device += nbytes(math.prod(shard), x.dtype)
    return total, per_device


def param_rows(model, params=None, mesh=None, rules=None) -> list[dict]:
    """One row per parameter: name, shape, dtype, logical axes, mesh PartitionSpec, per-device elements.

    The sharding is the array's own when it has a NamedSharding, else the logical axes mapped by
    `rules` (when given).
    """
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    boxed = family_lib.abstract_params(model)
    names = {_path(p): x.names for p, x in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]}
    values = nn.meta.unbox(boxed) if params is None else nn.meta.unbox(params)
    rows = []
    for p, x in jax.tree_util.tree_flatten_with_path(values)[0]:
        name = _path(p)
        logical = names.get(name)
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec, mesh_of = sharding.spec, sharding.mesh
        else:
            spec = None if logical is None or rules is None else nn.logical_to_mesh_axes(logical, rules)
            mesh_of = mesh
        shape = tuple(int(d) for d in x.shape)
        rows.append({
            "name": name, "shape": shape, "dtype": str(np.dtype(x.dtype)), "logical": logical, "spec": spec,
            "per_device": _per_device(shape, spec, mesh_of), "size": math.prod(shape),
            "bytes": nbytes(math.prod(shape), x.dtype),
        })  # fmt: skip
    return rows


def memory(cfg, rows: list[dict], opt_state=None) -> dict:
    """What training holds, in parameters and bytes, in all and per device: the trainable
    parameters (a LoRA model's adapters, else all), the frozen ones (a LoRA model's base at its
    stored dtypes: bfloat16, int8, int4 packed; else none) and the optimizer state (None when not given)."""
    out = {}
    for part in ("trainable", "frozen"):
        frozen = part == "frozen"
        mine = [r for r in rows if bool(cfg.lora_rank and r["name"].split("/")[-1] not in lora.ADAPTERS) == frozen]
        out[part] = {
            "params": sum(r["size"] for r in mine), "bytes": sum(r["bytes"] for r in mine),
            "bytes_per_device": sum(nbytes(r["per_device"], r["dtype"]) for r in mine),
            "dtypes": sorted({r["dtype"] for r in mine}),
        }  # fmt: skip
    out["optimizer"] = None
    if opt_state is not None:
        total, per_device = tree_bytes(opt_state)
        out["optimizer"] = {"bytes": total, "bytes_per_device": per_device}
    return out


def _collapse(name: str) -> tuple[str, int | None]:
    """'decoder/layers_2/attn/...' -> ('decoder/layers_*/attn/...', 2); no layer index -> (name, None)."""
    m = _LAYER.search(name)
    return (name, None) if m is None else (name[: m.start()] + "layers_*" + name[m.end() :], int(m.group(1)))


def _range(indices: list[int]) -> str:
    lo, hi = min(indices), max(indices)
    return f"{lo}" if lo == hi else f"[{lo}-{hi}]" if sorted(indices) == list(range(lo, hi + 1)) else "[...]"


def collapsed_rows(rows: list[dict]) -> list[dict]:
    """Rows of identical repeated layers merged: name 'layers_[0-3]/...', with `count` = 4."""
    groups: dict[tuple, list] = defaultdict(list)
    order = []
    for r in rows:
        key_name, idx = _collapse(r["name"])
        key = (key_name, r["shape"], r["dtype"], r["logical"], str(r["spec"]))
        if key not in groups:
            order.append(key)
        groups[key].append((idx, r))
    out = []
    for key in order:
        members = groups[key]
        first = dict(members[0][1])
        indices = [i for i, _ in members if i is not None]
        if indices:
            first["name"] = key[0].replace("layers_*", f"layers_{_range(indices)}")
        first["count"] = len(members)
        out.append(first)
    return out


def module_counts(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(module, repeats, parameters in all repeats): top-level modules, and each kind of sub-module
    of a stack of blocks ('layers_*/attn', 'layers_*/mlp', ...), in order of first appearance."""
    totals: dict[str, int] = {}
    layers: dict[str, set] = defaultdict(set)
    for r in rows:
        name, idx = _collapse(r["name"])
        parts = name.split("/")
        cut = next((i for i, p in enumerate(parts) if p in ("layers_*", "layers")), None)
        module = "/".join(parts[: cut + 2]) if cut is not None and cut + 2 < len(parts) else parts[0]
        totals[module] = totals.get(module, 0) + r["size"]
        if idx is not None:
            layers[module].add(idx)
        elif r["logical"] and r["logical"][0] == "layers":  # scan_layers: stacked on a leading axis
            layers[module] = set(range(r["shape"][0]))
    return [(m, max(len(layers[m]), 1), n) for m, n in totals.items()]


def summary_dict(model, params=None, mesh=None, rules=None, seq_len: int | None = None, opt_state=None) -> dict:
    """The summary's facts: totals, FLOPs per token, the mesh, memory (trainable, frozen, optimizer
    state: `memory`), modules and collapsed parameter rows. `params` are the model's whole tree
    (a LoRA run's base and adapters together, `lora.combine`)."""
    cfg = model.cfg
    rows = param_rows(model, params, mesh, rules)
    seq_len = seq_len or cfg.max_len
    mesh_shape = None if mesh is None else {k: int(v) for k, v in mesh.shape.items()}
    total = sum(r["size"] for r in rows)
    return {
        "family": cfg.family, "preset": cfg.preset, "params": total,
        "active_params": total - flops_lib.inactive_params(cfg),  # what one token multiplies (MoE: k of E experts)
        "bytes": sum(r["bytes"] for r in rows),
        "bytes_per_device": sum(nbytes(r["per_device"], r["dtype"]) for r in rows),
        "memory": memory(cfg, rows, opt_state),
        "flops_per_token": family_lib.flops_per_token(cfg, seq_len), "seq_len": seq_len, "mesh": mesh_shape,
        "devices": None if mesh is None else f"{mesh.devices.size} {mesh.devices.flat[0].platform}",
        "modules": module_counts(rows), "rows": collapsed_rows(rows),
    }  # fmt: skip


def _experts_line(cfg, d: dict) -> str:
    """Where the experts are: which layers, their sizes, routing, dispatch, and their weights' mesh axes."""
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe(i)]
    placed = f"layers {', '.join(map(str, moe))} ({len(moe)} of {cfg.num_layers})"
    placed = f"all {cfg.num_layers} layers" if len(moe) == cfg.num_layers else placed
    shared = f" + {cfg.num_shared_experts} shared ({cfg.shared_dim} wide)" if cfg.num_shared_experts else ""
    spec = next((r["spec"] for r in d["rows"] if r["name"].endswith("mlp/wi_gate")), None)
    where = "" if spec is None else f"; expert weights [experts, embed, mlp] -> {_spec_text(spec)}"
    return (
        f"experts: {cfg.num_experts} x {cfg.expert_dim} wide{shared} in {placed}, top-{cfg.experts_per_token} "
        f"{cfg.router_score}, {cfg.moe_dispatch} dispatch; "
        f"{d['params']:,} parameters, {d['active_params']:,} active per token "
        f"({100 * d['active_params'] / max(d['params'], 1):.0f}%){where}"
    )


def _mb(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _memory_lines(cfg, m: dict) -> list[str]:
    """Trainable, frozen and optimizer-state bytes, per device and in all."""
    what = f"LoRA adapters, rank {cfg.lora_rank}" if cfg.lora_rank else "all parameters"
    lines = ["memory (per device, all devices):"]
    for part, note in (("trainable", what), ("frozen", "the LoRA base" if cfg.lora_rank else "none")):
        p = m[part]
        dtypes = f", {'/'.join(p['dtypes'])}" if p["dtypes"] else ""
        lines.append(
            f"  {part:<16} {_mb(p['bytes_per_device']):>12} {_mb(p['bytes']):>12}  "
            f"{p['params']:,} parameters ({note}{dtypes})"
        )
    opt = m["optimizer"]
    if opt is not None:
        lines.append(f"  {'optimizer state':<16} {_mb(opt['bytes_per_device']):>12} {_mb(opt['bytes']):>12}")
    return lines


def summarize(model, params=None, mesh=None, rules=None, seq_len: int | None = None, opt_state=None) -> str:
    """The summary as text: a header, memory, parameters per module, and the parameter table."""
    d = summary_dict(model, params, mesh, rules, seq_len, opt_state)
    cfg = model.cfg
    kv = f" ({cfg.kv_heads} kv)" if cfg.kv_heads != cfg.num_heads else ""
    enc = f"{cfg.encoder_layers} encoder + " if cfg.family == "encdec" else ""
    local = f" (pattern {cfg.layer_pattern!r}, window {cfg.sliding_window})" if "l" in cfg.layer_pattern else ""
    lines = [
        f"model: {type(model).__name__} (family {cfg.family!r}, preset {cfg.preset!r}): {d['params']:,} parameters "
        f"({_mb(d['bytes'])}, {_mb(d['bytes_per_device'])} per device); {enc}{cfg.num_layers} layers{local} x "
        f"{cfg.embed_dim} wide, {cfg.num_heads} heads{kv} of {cfg.dim_per_head}, mlp {cfg.mlp_dim} "
        f"{cfg.mlp_activation}, vocab {cfg.vocab_size}, {cfg.positions} positions, {cfg.dtype} compute",
        f"FLOPs per token (training, context {d['seq_len']}): {d['flops_per_token'] / 1e6:,.2f} M",
    ]
    if cfg.num_experts:
        lines.append(_experts_line(cfg, d))
    if d["mesh"] is not None:
        axes = " x ".join(f"{k}={v}" for k, v in sharding.shown_axes(d["mesh"]).items())
        n = jax.process_count()
        lines.append(f"mesh: {axes} over {d['devices']} devices in {n} process{'es' if n > 1 else ''}")
    lines += _memory_lines(cfg, d["memory"])
    lines.append("parameters per module:")
    width = max(len(m) + len(f" x{n}") for m, n, _ in d["modules"])
    for m, n, count in d["modules"]:
        label = m + (f" x{n}" if n > 1 else "")
        lines.append(f"  {label:<{width}} {count:>14,} {100 * count / max(d['params'], 1):5.1f}%")
    lines.append("parameters (shape, dtype, logical axes -> mesh axes):")
    rows = d["rows"]
    names = [r["name"] + (f" x{r['count']}" if r["count"] > 1 else "") for r in rows]
    shapes = [str(r["shape"]) for r in rows]
    nw, sw = max(map(len, names)), max(map(len, shapes))
    for name, shape, r in zip(names, shapes, rows):
        logical = ",".join(a or "-" for a in r["logical"]) if r["logical"] else "?"
        lines.append(f"  {name:<{nw}} {shape:<{sw}} {r['dtype']:<8} {logical} -> {_spec_text(r['spec'])}")
    return "\n".join(lines)

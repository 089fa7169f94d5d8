"""Meshes, partition specs, and numerical equivalence of one train step across mesh shapes.

The loss and the gradients of one step on meshes (data, fsdp, tensor) = 1x1x1, 8x1x1, 1x8x1,
2x2x2 and 2x1x4 must equal the single-device result, every leaf to 1e-5 of its own largest value
(tests/leafcheck.py). The real jitted train step (`state.make_steps`) is checked for its
parameter shardings (spec and per-device shard shape), its activation constraints and the
collectives of its compiled program.
"""

import dataclasses
import functools
import math
import re
from types import SimpleNamespace

import flax.linen as nn
import jax
import leafcheck
import numpy as np
import optax
import pytest
import runlib as R
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.data import lm_data as data_lib
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training import optim
from llm_jax.training import state as state_lib
from llm_jax.training.config import base_config

SEQ, BATCH = 16, 16
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)]
ONE_AXIS = [(8, 1, 1), (1, 8, 1)]

# Heads, kv heads, mlp, vocab and embed all divide 8 (or the tensor axes used with them).
# "gpt_gqa": every kind of sharded parameter (biases, learned positions, tied embedding used twice,
# grouped kv heads, two MLP input kernels) on all five meshes. "llama_scan": the other code paths
# (RoPE, RMSNorm, GELU, untied head, scan over layers, remat, jax.nn.dot_product_attention) on 2x1x4.
GPT_GQA = ModelConfig(
    vocab_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    embed_dim=32,
    mlp_dim=64,
    max_len=SEQ,
    positions="learned",
    norm="layernorm",
    mlp_activation="swiglu",
    use_bias=True,
    tie_embeddings=True,
)
LLAMA_SCAN = ModelConfig(
    vocab_size=128,
    num_layers=2,
    num_heads=8,
    embed_dim=32,
    mlp_dim=64,
    max_len=SEQ,
    positions="rope",
    norm="rmsnorm",
    mlp_activation="gelu",
    use_bias=False,
    tie_embeddings=False,
    scan_layers=True,
    remat="dots",
    attention="dot_product",
)
# "gemma_scan": every block option of today's open models at once (local and global layers, whose
# window and RoPE base are traced under scan, QK-norm, (1 + w) norms, post-norms, GeGLU, embedding
# scale, query scale, both soft-caps, q/k/v biases without an output bias), with remat.
# "gemma_dot": the same unscanned through jax.nn.dot_product_attention (its window mask path).
GEMMA_SCAN = ModelConfig(
    vocab_size=128,
    num_layers=3,
    num_heads=8,
    num_kv_heads=4,
    head_dim=12,
    embed_dim=32,
    mlp_dim=64,
    max_len=SEQ,
    **R.GEMMA_BLOCK,
    attention_bias=True,
    attention_out_bias=False,
    layer_pattern="llg",
    sliding_window=5,
    query_scale=10.0,
    attn_softcap=5.0,
    final_softcap=8.0,
    scan_layers=True,
    remat="full",
)
GEMMA_DOT = dataclasses.replace(
    GEMMA_SCAN, scan_layers=False, remat="none", attention="dot_product", attn_softcap=None, layer_pattern="lg"
)
CONFIGS = {"gpt_gqa": GPT_GQA, "llama_scan": LLAMA_SCAN, "gemma_scan": GEMMA_SCAN, "gemma_dot": GEMMA_DOT}
# The same models on packed documents (config.data.packing='documents'): segment ids mask the
# attention (einsum path for gpt_gqa, jax.nn.dot_product_attention for llama_scan), positions
# restart per document, and weights drop the targets across a boundary.
CONFIGS.update({f"{name}_packed": cfg for name, cfg in list(CONFIGS.items())})


def mesh_of(shape):
    """(data, fsdp, tensor), or a size for each of sharding.MESH_AXES -> the mesh."""
    n = math.prod(shape)
    sizes = (
        dict(zip(sharding.MESH_AXES, shape))
        if len(shape) == len(sharding.MESH_AXES)
        else dict(data=shape[0], fsdp=shape[1], tensor=shape[2])
    )
    return sharding.make_mesh(SimpleNamespace(**sizes), jax.devices()[:n])


def optimizer():
    c = base_config().optim
    # No warmup, so the first step really moves the weights (the default's lr is 0 at step 1).
    # AdamW's first step is lr * g / (|g| + eps): elements of g near eps magnify the gradients'
    # float noise (the summation order differs across meshes) by up to lr / (4 eps), so eps must
    # be large enough for the weights to agree to 1e-5 of each leaf; lr 0.1 still moves every
    # leaf by hundreds of tolerances (test_the_reference_step_changes_the_weights).
    c.update(lr=0.1, warmup_steps=0, decay_steps=100, eps=1e-2)
    return optim.make_optimizer(c)


def make_batch(cfg, seed=0, packed=False):
    r = np.random.default_rng(seed)
    toks = r.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    if not packed:
        return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    # Every row a different packing: documents start at 3 random places (some rows: fewer).
    starts = [np.unique(r.integers(1, SEQ, 3)) for _ in range(BATCH)]
    batch = data_lib.windows(
        data_lib.ArrayTokens(toks.reshape(-1), np.concatenate([i * (SEQ + 1) + s for i, s in enumerate(starts)])),
        np.arange(BATCH) * (SEQ + 1),
        SEQ,
        packing="documents",
    )
    assert batch["segment_ids"].max() > 2 and batch["weights"].min() == 0
    return batch


def mean_loss(params, batch, model):
    total, count = family_lib.of(model).loss_sum(model, params, batch, None, train=False)
    return total / count


# Programs that run once are compiled for compile speed (the SPMD partitioning is the same).
FAST = {"xla_backend_optimization_level": 0}


@functools.cache
def ref_state(name):
    """The initial train state (seed 0), computed on one device without any mesh (numpy leaves)."""
    model = TransformerLM(CONFIGS[name])
    init = state_lib.init_state_fn(model, optimizer(), SEQ)
    return jax.device_get(jax.jit(lambda r: nn.meta.unbox(init(r)), compiler_options=FAST)(jax.random.key(0)))


@functools.cache
def ref_grads(name):
    """Single device, no mesh, no sharding: (loss, grads) of the mean token loss."""
    model = TransformerLM(CONFIGS[name])
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(mean_loss, model=model)), compiler_options=FAST)
    return jax.device_get(grad_fn(ref_state(name).params, make_batch(model.cfg, packed=name.endswith("_packed"))))


@functools.cache
def ref_step(name):
    """Single device: the new state and metrics of one train step, from the reference gradients
    and the run's optimizer (what train_step computes)."""
    state = ref_state(name)
    loss, grads = ref_grads(name)
    tx = optimizer()

    def update(state, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )

    new = jax.device_get(jax.jit(update, compiler_options=FAST)(state, grads))
    grad_norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in jax.tree.leaves(grads)))
    return new, {"loss": loss, "grad_norm": grad_norm}


def no_grad_leaves(cfg):
    """Leaves with no gradient in exact arithmetic: the key bias adds the same q.b to every logit
    of a row, which the softmax ignores (with RoPE it does not). leafcheck compares them at the
    tree's scale and checks that they are rounding noise."""
    return () if cfg.positions == "rope" or not cfg.use_bias else ("['key']['bias']",)


def adam_moments(opt_state):
    """AdamW's first moment (0.1 x the clipped gradient after one step) and the square root of its
    second (0.05 x g^2: compared by its root, whose range is the gradients')."""
    adam = opt_state[1][0]  # chain(clip, adamw(scale_by_adam, ...))
    return {"mu": adam.mu, "sqrt_nu": jax.tree.map(np.sqrt, jax.device_get(adam.nu)), "count": adam.count}


def state_shardings(name, mesh):
    init = state_lib.init_state_fn(TransformerLM(CONFIGS[name]), optimizer(), SEQ)
    abstract = jax.eval_shape(init, jax.random.key(0))
    return sharding.boxed_shardings(abstract, mesh, sharding.LOGICAL_RULES)


# ----------------------------------------------------------------------------------------------
# Loss and gradients equal across meshes


@pytest.mark.parametrize(
    "name, shape",
    # The one-axis meshes only in the full suite: 2x2x2 and 2x1x4 shard over every axis at once.
    [("gpt_gqa", s) if s not in ONE_AXIS else pytest.param("gpt_gqa", s, marks=pytest.mark.slow) for s in MESHES]
    + [("llama_scan", (2, 1, 4)), ("gpt_gqa_packed", (2, 2, 2))]
    + [("llama_scan_packed", (2, 1, 4))]
    + [("gemma_scan", (2, 2, 2)), ("gemma_dot", (1, 2, 4)), ("gemma_scan_packed", (2, 1, 4))],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x,
)
def test_loss_and_grads_equal_single_device(name, shape):
    cfg = CONFIGS[name]
    ref_loss, ref_g = ref_grads(name)
    mesh, rules = mesh_of(shape), sharding.LOGICAL_RULES
    sharding.check_divisible(mesh, cfg, BATCH)
    param_sh = state_shardings(name, mesh).params
    params = jax.device_put(ref_state(name).params, param_sh)
    batch = sharding.host_to_global(make_batch(cfg, packed=name.endswith("_packed")), mesh)
    grad_fn = jax.jit(
        jax.value_and_grad(functools.partial(mean_loss, model=TransformerLM(cfg))),
        in_shardings=(param_sh, sharding.batch_sharding(mesh)),
        out_shardings=(NamedSharding(mesh, P()), param_sh),
        compiler_options=FAST,
    )
    with sharding.use_mesh(mesh, rules):
        loss, grads = grad_fn(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    # Every leaf to 1e-5 of its own largest value; each one real signal, not rounding (leafcheck).
    leafcheck.assert_close(grads, ref_g, noise=no_grad_leaves(cfg), what=f"grads on {shape}")


def test_sharded_train_step_with_grad_accumulation_equals_single_device():
    """The jitted train step (state donated) of `make_steps` on a 2x2x2 mesh, from a state made by
    `create_sharded_state`, accumulating over 2 micro-batches: the same loss, gradient norm, new
    weights and optimizer state as one update on the whole batch on one device."""
    name = "gpt_gqa"
    cfg = CONFIGS[name]
    ref_new, ref_metrics = ref_step(name)
    mesh, rules = mesh_of((2, 2, 2)), sharding.LOGICAL_RULES
    model, tx = TransformerLM(cfg), optimizer()
    state, state_sh = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), SEQ)
    # Born sharded, and the same weights as the single-device init (compiled differently, so
    # compared to float precision; zero-initialised biases and moments exactly).
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref_state(name))):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=0, err_msg=jax.tree_util.keystr(path))
    q = state.params["layers_0"]["attn"]["query"]["kernel"]  # [embed 32 / fsdp 2, heads 8 / tensor 2, kv 4]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 4, 4)}
    state = jax.device_put(ref_state(name), state_sh)  # exactly the reference's weights
    p_train, _ = state_lib.make_steps(model, tx, mesh, rules, state_sh, grad_accum_steps=2)
    rng = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
    new_state, metrics = p_train(state, sharding.host_to_global(make_batch(cfg), mesh), rng, {})
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert int(new_state.step) == 1
    noise = no_grad_leaves(cfg)
    for part, got, want in (
        ("moments", adam_moments(new_state.opt_state), adam_moments(ref_new.opt_state)),
        ("params", new_state.params, ref_new.params),
    ):
        leafcheck.assert_close(got, want, noise=noise, what=part)
    for x, s in zip(jax.tree.leaves(new_state), jax.tree.leaves(state_sh)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_the_reference_step_changes_the_weights():
    """Guards the equivalence test above against comparing a no-op update: every weight (but the
    key bias, which has no gradient) moved by at least 100 tolerances of the comparison."""
    new, _ = ref_step("gpt_gqa")
    leafcheck.assert_moved(ref_state("gpt_gqa").params, new.params, frozen=no_grad_leaves(GPT_GQA))


# ----------------------------------------------------------------------------------------------
# Partition specs, parameter by parameter

FSDP, TP = "fsdp", "tensor"
# The logical rules map each parameter to one PartitionSpec whatever the mesh sizes:
#   embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; kv, length, norm, layers -> replicated.
# path -> (shape, spec). Shapes: vocab 128, embed 64, heads 8, kv 8, mlp 128, max_len 16.
EXPECTED = {
    "embed/embedding": ((128, 64), (TP, FSDP)),
    "pos_embed": ((16, 64), (None, FSDP)),
    "ln_f/scale": ((64,), (None,)),
    "ln_f/bias": ((64,), (None,)),
    "lm_head/kernel": ((64, 128), (FSDP, TP)),
}
for _i in range(2):
    _l = f"layers_{_i}/"
    EXPECTED.update(
        {
            _l + "ln_1/scale": ((64,), (None,)),
            _l + "ln_1/bias": ((64,), (None,)),
            _l + "ln_2/scale": ((64,), (None,)),
            _l + "ln_2/bias": ((64,), (None,)),
            _l + "attn/query/kernel": ((64, 8, 8), (FSDP, TP, None)),
            _l + "attn/query/bias": ((8, 8), (TP, None)),
            _l + "attn/key/kernel": ((64, 8, 8), (FSDP, TP, None)),
            _l + "attn/key/bias": ((8, 8), (TP, None)),
            _l + "attn/value/kernel": ((64, 8, 8), (FSDP, TP, None)),
            _l + "attn/value/bias": ((8, 8), (TP, None)),
            _l + "attn/out/kernel": ((8, 8, 64), (TP, None, FSDP)),
            _l + "attn/out/bias": ((64,), (FSDP,)),
            _l + "mlp/wi/kernel": ((64, 128), (FSDP, TP)),
            _l + "mlp/wi/bias": ((128,), (TP,)),
            _l + "mlp/wo/kernel": ((128, 64), (TP, FSDP)),
            _l + "mlp/wo/bias": ((64,), (FSDP,)),
        }
    )
# Per-device shard shapes on the FSDP mesh 1x8x1 (embed dim / 8) and the tensor-parallel mesh
# 1x1x8 (vocab, heads, mlp / 8), for one of each kind of parameter.
SHARD_SHAPES = {
    "embed/embedding": {"fsdp": (128, 8), "tensor": (16, 64)},
    "pos_embed": {"fsdp": (16, 8), "tensor": (16, 64)},
    "ln_f/scale": {"fsdp": (64,), "tensor": (64,)},
    "lm_head/kernel": {"fsdp": (8, 128), "tensor": (64, 16)},
    "layers_0/attn/query/kernel": {"fsdp": (8, 8, 8), "tensor": (64, 1, 8)},
    "layers_0/attn/query/bias": {"fsdp": (8, 8), "tensor": (1, 8)},
    "layers_0/attn/out/kernel": {"fsdp": (8, 8, 8), "tensor": (1, 8, 64)},
    "layers_0/attn/out/bias": {"fsdp": (8,), "tensor": (64,)},
    "layers_0/mlp/wi/kernel": {"fsdp": (8, 128), "tensor": (64, 16)},
    "layers_0/mlp/wi/bias": {"fsdp": (128,), "tensor": (16,)},
    "layers_1/mlp/wo/kernel": {"fsdp": (128, 8), "tensor": (16, 64)},
}

SPEC_MODEL = ModelConfig(
    vocab_size=128,
    num_layers=2,
    num_heads=8,
    embed_dim=64,
    mlp_dim=128,
    max_len=SEQ,
    positions="learned",
    norm="layernorm",
    mlp_activation="gelu",
    use_bias=True,
    tie_embeddings=False,
)


def _path(p):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)


def _padded(spec, ndim):
    spec = tuple(spec)
    return spec + (None,) * (ndim - len(spec))


def _abstract_state(cfg):
    model = TransformerLM(cfg)
    return jax.eval_shape(state_lib.init_state_fn(model, optimizer(), SEQ), jax.random.key(0))


@functools.cache
def real_step(name, shape):
    """The trainer's jitted train step (`state.make_steps`, under `sharding.use_mesh` as the
    trainer runs it) on mesh `shape`, compiled ahead of time and run once from a state born
    sharded: (compiled, lowered StableHLO text, optimized HLO text, the new state)."""
    cfg = {"spec": SPEC_MODEL, **CONFIGS}[name]
    mesh, rules = mesh_of(shape), sharding.LOGICAL_RULES
    model, tx = TransformerLM(cfg), optimizer()
    state, state_sh = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), SEQ)
    p_train, _ = state_lib.make_steps(model, tx, mesh, rules, state_sh, grad_accum_steps=1)
    batch = sharding.host_to_global(make_batch(cfg), mesh)
    rng = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
    with sharding.use_mesh(mesh, rules):
        lowered = p_train.jitted.lower(state, batch, rng, {})
        compiled = lowered.compile(FAST)  # the SPMD partitioning is that of the default level
    new_state, _ = compiled(state, batch, rng, {})
    return compiled, lowered.as_text(), compiled.as_text(), new_state


@pytest.mark.parametrize("kind", ["fsdp", "tensor"])
def test_parameter_partition_specs(kind):
    """The real train step's state: each parameter's PartitionSpec (in the compiled step's input
    and output shardings and on the arrays it returns) and its per-device shard shape."""
    mesh = mesh_of((1, 8, 1) if kind == "fsdp" else (1, 1, 8))
    compiled, _, _, new_state = real_step("spec", tuple(mesh.shape.values()))
    in_sh, out_sh = compiled.input_shardings[0][0], compiled.output_shardings[0]
    arrays = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_state.params)[0]}
    assert set(arrays) == set(EXPECTED), set(arrays) ^ set(EXPECTED)
    for s_in, s_out, (path, x) in zip(jax.tree.leaves(in_sh.params), jax.tree.leaves(out_sh.params), arrays.items()):
        shape, spec = EXPECTED[path]
        assert x.shape == shape, path
        for s in (s_in, s_out, x.sharding):
            assert isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape, (path, s)
            assert _padded(s.spec, len(shape)) == spec, (path, s.spec)
        shards = {sh.data.shape for sh in x.addressable_shards}
        assert shards == {x.sharding.shard_shape(shape)}, (path, shards)
        if path in SHARD_SHAPES:
            assert shards == {SHARD_SHAPES[path][kind]}, (path, shards)
    # Every parameter is split over all 8 devices except the norms and biases that are not.
    split = {p for p, x in arrays.items() if math.prod(x.addressable_shards[0].data.shape) < x.size}
    unsplit = {p for p in arrays if p.endswith(("scale", "/bias"))}
    if kind == "fsdp":  # biases of the embed dim are split too
        unsplit -= {p for p in unsplit if p.endswith(("out/bias", "wo/bias"))}
    else:  # position table: no vocab/heads/mlp dim
        unsplit = (unsplit | {"pos_embed"}) - {
            p for p in unsplit if p.endswith(("query/bias", "key/bias", "value/bias", "wi/bias"))
        }
    assert split == set(arrays) - unsplit
    # Optimizer moments are sharded like their parameters; the step counter is replicated.
    adam = new_state.opt_state[1][0]
    for tree in (adam.mu, adam.nu):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(new_state.params)):
            assert a.sharding.is_equivalent_to(b.sharding, b.ndim)
            assert a.addressable_shards[0].data.shape == b.addressable_shards[0].data.shape
    assert _padded(new_state.step.sharding.spec, 0) == ()


def _collectives(hlo: str) -> dict[str, int]:
    """Count of each collective op in an optimized HLO module (async -start forms included)."""
    ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in ops}  # opcodes follow the type


@pytest.mark.parametrize("kind, shape", [("data", (8, 1, 1)), ("fsdp", (1, 8, 1)), ("tensor", (1, 1, 8))])
def test_compiled_step_has_the_collectives_of_its_parallelism(kind, shape):
    """Data parallel: gradients all-reduced, no weight gathered (every device holds them whole).
    FSDP: weights all-gathered before use, gradients reduced back to shards (reduce-scatter; XLA
    on CPU does not form it and all-reduces, each device keeping its slice). Tensor parallel: the
    partial sums of split matmuls all-reduced."""
    _, _, hlo, _ = real_step("spec", shape)
    got = _collectives(hlo)
    reduced = got["all-reduce"] + got["reduce-scatter"]
    if kind == "data":
        assert got["all-reduce"] >= 1 and got["all-gather"] == 0, got
    elif kind == "fsdp":
        assert got["all-gather"] >= 2 * SPEC_MODEL.num_layers and reduced >= 1, got
    else:
        assert got["all-reduce"] >= 2 * SPEC_MODEL.num_layers, got


# (global shape, per-device shape, PartitionSpec) of the activation constraints of the real step of
# "gpt_gqa" on the 2x2x2 mesh: batch 16 over data x fsdp (4 rows a device), heads, mlp, vocab over
# tensor (2), the length over sequence (size 1 here: llm_jax/models/context_parallel.py).
# b = 16, t = 16, e = 32, h = 8, d = 4, mlp 64, vocab 128.
ROWS, SQ = sharding.BATCH_AXES, "sequence"  # rows: data x fsdp x expert (expert 1 here)
ACTIVATIONS = {
    (16, 16, 32): ((4, 16, 32), P(ROWS, SQ, None)),  # block input / output [b, t, e]
    (16, 16, 8, 4): ((4, 16, 4, 4), P(ROWS, SQ, "tensor", None)),  # queries, attention output
    (16, 16, 64): ((4, 16, 32), P(ROWS, SQ, "tensor")),  # MLP hidden
    (16, 16, 128): ((4, 16, 64), P(ROWS, SQ, "tensor")),  # logits
}


def _constraints(lowered: str, mesh) -> list[tuple[tuple, tuple, P]]:
    """(global shape, per-device shape, spec) of every sharding constraint in a lowered module
    (Shardy's `sdy.sharding_constraint`, what JAX 0.10-0.12 emit)."""
    out = []
    pattern = r"sdy\.sharding_constraint \S+ <@\w+, \[(.*?)\]> : tensor<([\dx]+)x[a-z]\w*>"
    for dims, shape in re.findall(pattern, lowered):
        axes = [tuple(re.findall(r'"(\w+)"', d)) for d in re.findall(r"\{([^}]*)\}", dims)]
        shape = tuple(int(n) for n in shape.split("x"))
        local = tuple(n // math.prod(mesh.shape[a] for a in ax) for n, ax in zip(shape, axes))
        spec = P(*[ax if len(ax) > 1 else (ax[0] if ax else None) for ax in axes])
        out.append((shape, local, spec))
    return out


def test_activations_are_sharded_in_the_real_step():
    """The trainer's step on 2x2x2: every activation constraint of the model splits the batch over
    data x fsdp, with the heads / mlp / vocab dims over tensor (by spec and per-device shape), and
    the compiled program never holds the whole batch's hidden states on one device. Mapping the
    `activation_*` rules to None, or dropping a constraint from the model, fails here."""
    mesh = mesh_of((2, 2, 2))
    _, lowered, hlo, _ = real_step("gpt_gqa", (2, 2, 2))
    found = _constraints(lowered, mesh)
    assert len(found) >= 5 * GPT_GQA.num_layers + 1, f"{len(found)} constraints in the lowered step"
    for shape, local, spec in found:
        assert spec[0] == ROWS and local[0] == BATCH // 4, (shape, spec)
    got = {shape: (local, spec) for shape, local, spec in found}
    for shape, want in ACTIVATIONS.items():
        assert got.get(shape) == want, (shape, got.get(shape), want)
    # What the partitioner made of it: no [b, t, e] or [b * t, e] array of the whole batch.
    whole = re.findall(r"f32\[(?:16,16,32|256,32)\]", hlo)
    assert not whole, f"{len(whole)} whole-batch hidden-state arrays in the compiled step"


def test_partition_specs_with_scanned_layers_and_swiglu():
    cfg = dataclasses.replace(LLAMA_SCAN, embed_dim=64, mlp_activation="swiglu")
    expect = {  # a leading 'layers' axis, replicated
        "layers/attn/query/kernel": (None, FSDP, TP, None),
        "layers/attn/key/kernel": (None, FSDP, TP, None),
        "layers/attn/out/kernel": (None, TP, None, FSDP),
        "layers/mlp/wi_0/kernel": (None, FSDP, TP),
        "layers/mlp/wi_1/kernel": (None, FSDP, TP),
        "layers/mlp/wo/kernel": (None, TP, FSDP),
        "layers/ln_1/scale": (None, None),
        "lm_head/kernel": (FSDP, TP),
    }
    shardings = sharding.boxed_shardings(_abstract_state(cfg).params, mesh_of((1, 2, 4)), sharding.LOGICAL_RULES)
    got = {_path(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    assert set(expect) <= set(got)
    for path, spec in expect.items():
        assert _padded(got[path], len(spec)) == spec, (path, got[path])


def test_batch_sharding_and_host_to_global():
    mesh = mesh_of((2, 2, 2))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), "sequence")
    assert sharding.data_parallel_size(mesh) == 4
    local = {"inputs": np.arange(8 * 3).reshape(8, 3).astype(np.int32)}
    g = sharding.host_to_global(local, mesh)["inputs"]
    np.testing.assert_array_equal(np.asarray(g), local["inputs"])
    # rows over data x fsdp (4 ways), replicated over tensor
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}


# ----------------------------------------------------------------------------------------------
# Mesh shapes: -1 fill-in and clear errors


def test_resolve_mesh_shape_fills_in_minus_one():
    assert sharding.resolve_mesh_shape([-1, 1, 1, 1, 1], 8) == (8, 1, 1, 1, 1)
    assert sharding.resolve_mesh_shape([2, -1, 1, 1, 2], 8) == (2, 2, 1, 1, 2)
    assert sharding.resolve_mesh_shape([1, 1, 1, 1, -1], 8) == (1, 1, 1, 1, 8)
    assert sharding.resolve_mesh_shape([2, 1, 2, 2, 1], 8) == (2, 1, 2, 2, 1)
    # A config without the expert and sequence keys (a run saved before they existed): sizes 1.
    mesh = sharding.make_mesh(SimpleNamespace(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    assert mesh.axis_names == ("data", "fsdp", "expert", "sequence", "tensor")


@pytest.mark.parametrize(
    "shape, devices, message",
    [
        ([3, -1, 1, 1, 1], 8, r"multiply to 3, which does not divide the 8 available devices"),
        ([2, 2, 1, 1, 1], 8, r"needs 4 devices but 8 are available"),
        ([4, 4, 1, 1, 1], 8, r"needs 16 devices but 8 are available"),
        ([-1, -1, 1, 1, 1], 8, r"at most one axis may be -1"),
        ([0, 1, 1, 1, -1], 8, r"sizes must be positive or -1"),
        ([8, 1], 8, r"must have 5 entries"),
    ],
)
def test_impossible_mesh_shapes_fail_clearly(shape, devices, message):
    with pytest.raises(BadValue, match=message):
        sharding.resolve_mesh_shape(shape, devices)


def test_make_mesh_with_too_few_devices_fails_clearly():
    with pytest.raises(BadValue, match=r"needs 8 devices but 4 are available"):
        sharding.make_mesh(SimpleNamespace(data=2, fsdp=2, tensor=2), jax.devices()[:4])


def test_check_divisible_names_the_bad_sizes():
    cfg = ModelConfig(vocab_size=128, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=12, mlp_dim=64)
    with pytest.raises(BadValue) as e:
        sharding.check_divisible(mesh_of((1, 1, 8)), cfg, 16)
    msg = str(e.value)
    assert "num_heads=4 is not divisible by mesh tensor=8" in msg
    assert "num_kv_heads=2 is not divisible by mesh tensor=8" in msg
    assert "mlp_dim" not in msg and "vocab" not in msg
    with pytest.raises(BadValue, match=r"batch_size=12 is not divisible by data\*fsdp\*expert=8"):
        sharding.check_divisible(mesh_of((2, 4, 1)), dataclasses.replace(cfg, embed_dim=16), 12)
    moe = dataclasses.replace(cfg, embed_dim=16, num_experts=6, mlp_activation="swiglu")
    with pytest.raises(BadValue, match=r"num_experts=6 must be divisible by mesh expert=4"):
        sharding.check_divisible(mesh_of((1, 2, 4, 1, 1)), moe, 16)
    with pytest.raises(BadValue, match=r"embed_dim=12 is not divisible by mesh fsdp=8"):
        sharding.check_divisible(mesh_of((1, 8, 1)), cfg, 16)
    sharding.check_divisible(mesh_of((2, 2, 2)), dataclasses.replace(cfg, embed_dim=16), 16)  # fits: no error


def test_logical_rule_overrides_from_config():
    c = SimpleNamespace(mesh=SimpleNamespace(rules={"embed": None, "extra": "data"}))
    rules = dict(sharding.logical_rules(c))
    assert rules["embed"] is None and rules["extra"] == "data" and rules["mlp"] == "tensor"
    assert sharding.logical_rules(None) == sharding.LOGICAL_RULES


def test_a_mesh_that_does_not_split_over_tpu_slices_is_a_bad_value():
    from llm_jax.runtime.errors import BadValue

    devices = [SimpleNamespace(slice_index=i // 2) for i in range(4)]  # 2 slices of 2 chips
    assert sharding._slices_axis((2, 1, 2), devices) == (2, 1, 1)
    with pytest.raises(BadValue, match=r"over 2 TPU slices: neither data nor fsdp is a multiple of 2; set config.mesh"):
        sharding._slices_axis((1, 1, 4), devices)

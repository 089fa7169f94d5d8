"""Expert parallelism: experts split over the `expert` mesh axis, tokens exchanged by all-to-all.

The shard_map dispatch equals a dense loop over experts (forward and gradients) on expert=4 x data=2
and expert=2 x fsdp=2 x tensor=2; an MoE model's loss and gradients on those meshes equal the
single-device ones, leaf by leaf; its compiled step exchanges tokens with all-to-alls.
"""

import functools
import math
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import leafcheck
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.models import expert_parallel, moe
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding
from llm_jax.tools import hlo

# {axis: size} of the meshes; the others are 1.
MESHES = {"expert4_data2": dict(data=2, expert=4), "expert2_fsdp2_tensor2": dict(fsdp=2, expert=2, tensor=2)}
T, D, F, E, K = 32, 8, 6, 8, 3


def mesh_of(sizes):
    full = {axis: sizes.get(axis, 1) for axis in sharding.MESH_AXES}
    return sharding.make_mesh(SimpleNamespace(**full), jax.devices()[: math.prod(full.values())])


def dense_loop(x, weights, experts, wi_gate, wi_up, wo):
    """Every expert on every token, weighted by the router where it was chosen: [T, D]."""
    out = jnp.zeros_like(x)
    for e in range(wi_gate.shape[0]):
        y = (jax.nn.silu(x @ wi_gate[e]) * (x @ wi_up[e])) @ wo[e]
        out = out + jnp.sum(jnp.where(experts == e, weights, 0.0), axis=1)[:, None] * y
    return out


@pytest.mark.parametrize("routing", ["skewed", "crowded"])
@pytest.mark.parametrize("name", MESHES)
def test_dispatch_equals_a_dense_loop_with_its_gradients(name, routing):
    """'skewed': some experts get many more copies than others; 'crowded': every token picks experts
    0, 1, 2, so the device holding experts 0 and 1 gets the most copies any routing can send it
    (its exchange buffers are full)."""
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (T, D))
    ws = [jax.random.normal(k, s) * 0.3 for k, s in zip(ks[1:4], [(E, D, F), (E, D, F), (E, F, D)])]
    bias = jnp.arange(E) if routing == "skewed" else jnp.where(jnp.arange(E) < K, 100.0, 0.0)
    weights, experts, _ = moe.route(jax.random.normal(ks[4], (T, E)) * 3 + bias, K, "softmax", True)
    counts = np.bincount(np.ravel(experts), minlength=E)
    assert counts.max() > 2 * T * K // E if routing == "skewed" else list(counts[:K]) == [T] * K
    mesh = mesh_of(MESHES[name])

    def loss(fn, x, *ws):  # a nonlinear loss, so gradients depend on every output row differently
        return jnp.sum(jnp.sin(fn(x, weights, experts, *ws)))

    with jax.set_mesh(mesh):
        ctx = expert_parallel.context_mesh()
        assert expert_parallel.applies(ctx, T)
        ep = functools.partial(expert_parallel.dropless, activation="swiglu", mesh=ctx)
        got = jax.jit(ep)(x, weights, experts, *ws)
        got_grads = jax.jit(jax.grad(functools.partial(loss, ep), argnums=(0, 1, 2, 3)))(x, *ws)
    np.testing.assert_allclose(got, dense_loop(x, weights, experts, *ws), atol=1e-5, rtol=1e-5)
    want_grads = jax.grad(functools.partial(loss, dense_loop), argnums=(0, 1, 2, 3))(x, *ws)
    leafcheck.assert_close(got_grads, want_grads, what=f"dispatch grads on {name}")


def test_a_mesh_without_the_expert_axis_or_too_few_tokens_dispatches_locally():
    assert not expert_parallel.applies(None, T)
    assert not expert_parallel.applies(mesh_of(dict(data=2, fsdp=4)), T)
    assert not expert_parallel.applies(mesh_of(MESHES["expert4_data2"]), 4)  # a decoding step of 4 tokens


MOE = ModelConfig(
    vocab_size=128,
    num_layers=2,
    num_heads=4,
    embed_dim=32,
    mlp_dim=48,
    max_len=16,
    positions="rope",
    norm="rmsnorm",
    mlp_activation="swiglu",
    use_bias=False,
    tie_embeddings=False,
    num_experts=8,
    experts_per_token=2,
    expert_mlp_dim=24,
    moe_first_dense=1,  # one dense layer (tensor-split MLP), then an MoE one
    num_shared_experts=1,
)
FAST = {"xla_backend_optimization_level": 0}


def mean_loss(params, batch, model):
    total, count = family_lib.of(model).loss_sum(model, params, batch, None, train=False)
    return total / count


@functools.cache
def reference():
    """Params (seed 0), batch and the single-device (loss, grads), no mesh."""
    model = TransformerLM(MOE)
    tokens = np.random.default_rng(0).integers(0, MOE.vocab_size, (16, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = jax.device_get(nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"])["params"]))
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(mean_loss, model=model)), compiler_options=FAST)
    return params, batch, jax.device_get(grad_fn(params, batch))


@pytest.mark.parametrize("name", MESHES)
def test_moe_model_loss_and_grads_equal_single_device_and_exchange_by_all_to_all(name):
    params, batch, (ref_loss, ref_grads) = reference()
    model = TransformerLM(MOE)
    mesh, rules = mesh_of(MESHES[name]), sharding.LOGICAL_RULES
    sharding.check_divisible(mesh, MOE, batch["inputs"].shape[0])
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch["inputs"])["params"])
    param_sh = sharding.boxed_shardings(abstract, mesh, rules)
    assert param_sh["layers_1"]["mlp"]["wi_gate"].spec[0] == "expert"  # the experts are split over devices
    grad_fn = jax.jit(
        jax.value_and_grad(functools.partial(mean_loss, model=model)),
        in_shardings=(param_sh, sharding.batch_sharding(mesh)),
        out_shardings=(NamedSharding(mesh, P()), param_sh),
        compiler_options=FAST,
    )
    args = jax.device_put(params, param_sh), sharding.host_to_global(batch, mesh)
    with sharding.use_mesh(mesh, rules):
        compiled = grad_fn.lower(*args).compile()  # compiled once: run, then read its collectives
        loss, grads = compiled(*args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    leafcheck.assert_close(grads, ref_grads, what=f"MoE grads on {name}")
    # Forward: tokens out and back (2), counts (1); backward: the transposes of both exchanges.
    ops, _ = hlo.collective_ops(compiled.as_text())
    summary = hlo.summarize(ops)
    assert summary["all-to-all"]["count"] >= 4 and summary["all-to-all"]["bytes"] > 0, summary

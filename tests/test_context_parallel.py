"""Context parallelism (llm_jax/models/context_parallel.py): the sequence sharded over the mesh's
`sequence` axis gives the single-device loss and gradients, and its step all-gathers keys/values.

Reuses tests/test_sharding.py's tiny models, batches and single-device references (16 rows of 16
tokens: on sequence=8 each device holds 2 positions of its rows, so causal, window and segment
masks are read across shards by global index, and RoPE by each token's own position). With
attention='blockwise' each device runs blockwise attention from its queries' global offset and
gives the single-device einsum model's loss and gradients.
"""

import dataclasses
import functools
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import leafcheck
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_decode import PROMPTS, gen, model_and_params
from test_sharding import (
    BATCH,
    CONFIGS,
    FAST,
    SEQ,
    make_batch,
    mean_loss,
    mesh_of,
    no_grad_leaves,
    optimizer,
    ref_grads,
    ref_state,
)

from llm_jax.models import family as family_lib
from llm_jax.models.model import TransformerLM
from llm_jax.runtime import sharding
from llm_jax.tools import hlo
from llm_jax.training import state as state_lib

# (data, fsdp, expert, sequence, tensor)
SEQ8, DATA2_SEQ4, FSDP2_SEQ2_TP2, SEQ4 = (1, 1, 1, 8, 1), (2, 1, 1, 4, 1), (1, 2, 1, 2, 2), (1, 1, 1, 4, 1)


def param_shardings(name, mesh, rules):
    init = state_lib.init_state_fn(TransformerLM(CONFIGS[name]), optimizer(), SEQ)
    return sharding.boxed_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules).params


def compiled_grads(name, shape, **overrides):
    """(compiled value-and-grad of the mean loss on the mesh, its params, its batch), under the
    rules a run with this mesh gets (`logical_rules`: parameters over fsdp x sequence); `overrides`
    change the model config (not its parameters)."""
    cfg = dataclasses.replace(CONFIGS[name], **overrides)
    mesh = mesh_of(shape)
    rules = sharding.logical_rules(SimpleNamespace(mesh=SimpleNamespace(**mesh.shape)))
    sharding.check_divisible(mesh, cfg, BATCH, SEQ)
    param_sh = param_shardings(name, mesh, rules)
    params = jax.device_put(ref_state(name).params, param_sh)
    batch = sharding.host_to_global(make_batch(cfg, packed=name.endswith("_packed")), mesh)
    grad_fn = jax.jit(
        jax.value_and_grad(functools.partial(mean_loss, model=TransformerLM(cfg))),
        in_shardings=(param_sh, sharding.batch_sharding(mesh)),
        out_shardings=(NamedSharding(mesh, P()), param_sh),
        compiler_options=FAST,
    )
    with sharding.use_mesh(mesh, rules):
        compiled = grad_fn.lower(params, batch).compile()
    return compiled, params, batch


@pytest.mark.parametrize(
    "name, shape",
    # llama_scan_packed: RoPE, scan, remat, jax.nn.dot_product_attention, packed segments.
    # gemma_scan: GQA, local windows traced under scan, both soft-caps, query scale (einsum path).
    # gpt_gqa_packed: GQA, learned positions, packed segments, einsum path, with fsdp and tensor.
    [("llama_scan_packed", SEQ8), ("gemma_scan", DATA2_SEQ4), ("gpt_gqa_packed", FSDP2_SEQ2_TP2)],
    ids=["seq8", "data2xseq4", "fsdp2xseq2xtp2"],
)
def test_context_parallel_equals_single_device(name, shape):
    ref_loss, ref_g = ref_grads(name)
    compiled, params, batch = compiled_grads(name, shape)
    loss, grads = compiled(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    leafcheck.assert_close(grads, ref_g, noise=no_grad_leaves(CONFIGS[name]), what=f"grads on {shape}")
    if shape == FSDP2_SEQ2_TP2:  # parameters split along embed over fsdp x sequence, heads over tensor
        q = params["layers_0"]["attn"]["query"]["kernel"]  # [embed 32, heads 8, kv 4]
        assert {s.data.shape for s in q.addressable_shards} == {(8, 4, 4)}
    if shape == SEQ8:
        # Nothing else is sharded on this mesh, so every all-gather is attention's keys/values (and
        # segment ids): per layer, forward and backward (remat recomputes the forward).
        ops, _ = hlo.collective_ops(compiled.as_text())
        gathers = [op for op in ops if op.kind == "all-gather"]
        assert gathers and not [op for op in ops if op.kind == "collective-permute"], hlo.summarize(ops)
        cfg = CONFIGS[name]
        kv = f"[{BATCH},16,{cfg.kv_heads},{cfg.dim_per_head}]"  # the gathered keys/values, whole sequence
        assert any(kv in s for op in gathers for s in op.shapes), [op.shapes for op in gathers]


@pytest.mark.parametrize(
    "name, shape",
    # gemma_scan_packed: GQA, windows traced under scan, soft-caps, query scale, packed segments.
    # llama_scan: RoPE, scan, remat, plain causal.
    [("gemma_scan_packed", DATA2_SEQ4), ("llama_scan", SEQ4)],
    ids=["data2xseq4", "seq4"],
)
def test_blockwise_context_parallel_equals_single_device_einsum(name, shape):
    """attention='blockwise' with the sequence sharded: each device runs blockwise attention from its
    global query offset against the gathered keys, and gives the single-device einsum model's loss
    and gradients."""
    ref_loss, ref_g = ref_grads(name)
    # Blocks of 2 rows: on sequence=4 each device's 4 queries are 2 blocks against 8 key blocks, so
    # key blocks past the shard (and before a window) are skipped.
    compiled, params, batch = compiled_grads(name, shape, attention="blockwise", attention_block=2)
    loss, grads = compiled(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    leafcheck.assert_close(grads, ref_g, noise=no_grad_leaves(CONFIGS[name]), what=f"blockwise grads on {shape}")
    # No device forms its [.., t/n, t] scores (the einsum path's f32[16,8,4,16] on sequence=4).
    scores = re.findall(rf"f32\[[0-9,]*,{SEQ // shape[3]},{SEQ}\]", compiled.as_text())
    assert not scores, sorted(set(scores))


def test_sequence_length_and_embed_must_divide_over_the_sequence_axis():
    mesh = mesh_of((1, 1, 1, 8, 1))
    with pytest.raises(sharding.BadValue, match="seq_len=12 is not divisible by mesh sequence=8"):
        sharding.check_divisible(mesh, CONFIGS["gpt_gqa"], BATCH, 12)
    narrow = SimpleNamespace(num_heads=8, kv_heads=8, mlp_dim=64, vocab_size=128, embed_dim=36)
    with pytest.raises(sharding.BadValue, match="embed_dim=36 is not divisible by mesh fsdp\\*sequence=8"):
        sharding.check_divisible(mesh, narrow, BATCH, SEQ)


def test_decoding_with_the_cache_sharded_along_the_sequence_equals_single_device():
    """sequence=4: the KV cache split along its length ('cache_length' -> sequence; 7 prompt + 9
    new = 16 slots, 4 per device), parameters over fsdp x sequence: the same greedy tokens."""
    model, params = model_and_params("rope_gqa")
    expected, _ = gen(model, params, PROMPTS, 9)
    mesh = mesh_of((1, 1, 1, 4, 1))
    rules = sharding.logical_rules(SimpleNamespace(mesh=SimpleNamespace(**mesh.shape)))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    sharded = jax.device_put(params, sharding.boxed_shardings(boxed, mesh, rules))
    with sharding.use_mesh(mesh, rules):
        got, _ = gen(model, sharded, PROMPTS, 9, mesh=mesh)
        start = jnp.zeros((3,), jnp.int32)
        cache = jax.jit(lambda: family_lib.of(model).init_cache(model, sharded, 3, 16, start, mesh=mesh).layers)()
    np.testing.assert_array_equal(got, expected)
    key = cache["layers"]["attn"]["cached_key"]  # [layers, b, k, c, d] (scanned)
    assert key.sharding.spec[3] == "sequence", key.sharding
    assert {s.data.shape[3] for s in key.addressable_shards} == {4}

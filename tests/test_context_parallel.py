"""Context parallelism (llm_jax/models/context_parallel.py): the sequence sharded over the mesh's
`sequence` axis gives the single-device loss and gradients, and its step all-gathers keys/values.

Reuses tests/test_sharding.py's tiny models, batches and single-device references (16 rows of 16
tokens: on sequence=8 each device holds 2 positions of its rows, so causal, window and segment
masks are read across shards by global index, and RoPE by each token's own position).
"""

import functools

import jax
import leafcheck
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import BATCH, CONFIGS, FAST, make_batch, mean_loss, mesh_of, no_grad_leaves, ref_grads, ref_state
from test_sharding import state_shardings as param_shardings

from llm_jax.models.model import TransformerLM
from llm_jax.runtime import sharding
from llm_jax.tools import hlo

# (data, fsdp, expert, sequence, tensor)
SEQ8, DATA2_SEQ4, FSDP2_SEQ2_TP2 = (1, 1, 1, 8, 1), (2, 1, 1, 4, 1), (1, 2, 1, 2, 2)


def compiled_grads(name, shape):
    """(compiled value-and-grad of the mean loss on the mesh, its params, its batch)."""
    cfg = CONFIGS[name]
    mesh = mesh_of(shape)
    sharding.check_divisible(mesh, cfg, BATCH, 16)
    param_sh = param_shardings(name, mesh).params
    params = jax.device_put(ref_state(name).params, param_sh)
    batch = sharding.host_to_global(make_batch(cfg, packed=name.endswith("_packed")), mesh)
    grad_fn = jax.jit(
        jax.value_and_grad(functools.partial(mean_loss, model=TransformerLM(cfg))),
        in_shardings=(param_sh, sharding.batch_sharding(mesh)),
        out_shardings=(NamedSharding(mesh, P()), param_sh),
        compiler_options=FAST,
    )
    with sharding.use_mesh(mesh, sharding.LOGICAL_RULES):
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
    if shape == SEQ8:
        # Nothing else is sharded on this mesh, so every all-gather is attention's keys/values (and
        # segment ids): per layer, forward and backward (remat recomputes the forward).
        ops, _ = hlo.collective_ops(compiled.as_text())
        gathers = [op for op in ops if op.kind == "all-gather"]
        assert gathers and not [op for op in ops if op.kind == "collective-permute"], hlo.summarize(ops)
        cfg = CONFIGS[name]
        kv = f"[{BATCH},16,{cfg.kv_heads},{cfg.dim_per_head}]"  # the gathered keys/values, whole sequence
        assert any(kv in s for op in gathers for s in op.shapes), [op.shapes for op in gathers]


def test_sequence_length_must_divide_over_the_sequence_axis():
    mesh = mesh_of((1, 1, 1, 8, 1))
    with pytest.raises(sharding.BadValue, match="seq_len=12 is not divisible by mesh sequence=8"):
        sharding.check_divisible(mesh, CONFIGS["gpt_gqa"], BATCH, 12)

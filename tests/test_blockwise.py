"""Blockwise (flash-style) attention (llm_jax/models/blockwise.py) equals the reference attention
(ops._causal_attention, the einsum path of `attend`) in values and gradients, float32, to 1e-5:
causal, packed segments, sliding windows (static and traced), grouped-query heads, query scale and
soft-capped scores, lengths that are not a multiple of the blocks; a tiny TransformerLM with
attention='blockwise' has the einsum model's loss and gradients; the backward pass keeps memory
linear (its compiled temporaries at 4x the length grow about 4x, the reference's about 16x); and a
16k-token training step that does not fit a stated budget with the reference attention does with
blockwise attention. Kernels asked for on the wrong hardware fail in one line."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models import blockwise, kernels, ops
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime.errors import BadValue

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(b=2, t=40, h=4, kv=2, d=8, segments=False, seed=0):
    r = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(r[0], (b, t, h, d))
    k = jax.random.normal(r[1], (b, t, kv, d))
    v = jax.random.normal(r[2], (b, t, kv, d))
    cotangent = jax.random.normal(r[3], (b, t, h, d))
    seg = jnp.cumsum(jax.random.bernoulli(r[4], 0.15, (b, t)), axis=1) if segments else None
    return q, k, v, cotangent, seg


CASES = {
    "causal_mha": dict(kv=4),
    "causal_gqa": dict(kv=2),
    "mqa_segments": dict(kv=1, segments=True),
    "window": dict(window=7),
    "window_segments_gqa": dict(window=5, segments=True),
    "softcap_and_scale": dict(softcap=2.0, scale=0.3),
    "everything_uneven_blocks": dict(window=9, segments=True, softcap=3.0, scale=0.5, block_q=16, block_k=8),
    "one_block": dict(block_q=64, block_k=64),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_the_reference(case):
    kw = dict(CASES[case])
    block_q, block_k = kw.pop("block_q", 8), kw.pop("block_k", 8)
    window, scale, softcap = kw.pop("window", None), kw.pop("scale", None), kw.pop("softcap", None)
    q, k, v, ct, seg = _inputs(**kw)  # t=40: 5 blocks of 8, or padded up to 48 with blocks of 16

    def ref(q, k, v):
        return ops._causal_attention(q, k, v, seg, window, scale, softcap)

    def new(q, k, v):
        return blockwise.attention(q, k, v, seg, window, scale, softcap, block_q, block_k)

    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    out_new, vjp_new = jax.vjp(new, q, k, v)
    np.testing.assert_allclose(out_new, out_ref, atol=TOL, rtol=TOL)
    for name, g_new, g_ref in zip("qkv", vjp_new(ct), vjp_ref(ct)):
        np.testing.assert_allclose(g_new, g_ref, atol=TOL, rtol=TOL, err_msg=f"d{name}")


def test_traced_window_under_jit_equals_the_static_one():
    """Under scan_layers a layer's window is a traced value (global layers: a huge one)."""
    q, k, v, ct, _ = _inputs()

    @jax.jit
    def loss(q, k, v, window):
        return jnp.sum(blockwise.attention(q, k, v, window=window, block_q=8, block_k=8) * ct)

    for window in (6, jnp.iinfo(jnp.int32).max // 2):
        static = None if window > 1000 else window
        want = jax.grad(lambda q, k, v, w=static: jnp.sum(ops._causal_attention(q, k, v, window=w) * ct), (0, 1, 2))
        got = jax.grad(loss, (0, 1, 2))(q, k, v, jnp.int32(window))
        for g, w in zip(got, want(q, k, v)):
            np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL)


def test_causal_blocks_above_the_diagonal_are_not_computed():
    """A key changed past every query of the first block changes nothing there (masked), and the
    loop visits only the causal band: the jaxpr's key-block loop bounds depend on the query block."""
    q, k, v, _, _ = _inputs(t=32)
    out = blockwise.attention(q, k, v, block_q=8, block_k=8)
    k2 = k.at[:, 8:].set(1e6)
    np.testing.assert_array_equal(blockwise.attention(q, k2, v, block_q=8, block_k=8)[:, :8], out[:, :8])
    off = jnp.int32(0)
    lo, hi = blockwise._key_range(jnp.int32(1), off, 8, 8, 4, None)
    assert (int(lo), int(hi)) == (0, 2)  # query block 1 visits key blocks 0 and 1, not 2 and 3
    lo, hi = blockwise._key_range(jnp.int32(3), off, 8, 8, 4, jnp.int32(5))
    assert (int(lo), int(hi)) == (2, 4)  # with a window of 5, block 3 (rows 24-31) skips keys 0-15
    lo, hi = blockwise._query_range(jnp.int32(1), off, 8, 8, 4, jnp.int32(5))
    assert (int(lo), int(hi)) == (1, 3)  # keys 8-15 are seen by rows 8-19 only
    # Queries at global rows 16.. (a context-parallel shard): key blocks 3-5 of 6 are all in the future
    # of local block 0 (rows 16-23), and with a window of 5 key block 0 (keys 0-7, seen by rows 0-11) by no local query.
    lo, hi = blockwise._key_range(jnp.int32(0), jnp.int32(16), 8, 8, 6, None)
    assert (int(lo), int(hi)) == (0, 3)
    lo, hi = blockwise._query_range(jnp.int32(0), jnp.int32(16), 8, 8, 2, jnp.int32(5))
    assert int(hi) <= int(lo)


def _loss_and_grads(cfg, params, tokens, segment_ids=None):
    model = TransformerLM(cfg)
    positions = None
    if segment_ids is not None:  # positions restart at each document
        starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1]), jnp.diff(segment_ids, axis=1)], 1) > 0
        idx = jnp.arange(tokens.shape[1])[None]
        positions = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)

    def loss(p):
        logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("scan", [False, True])
def test_model_loss_and_grads_equal_einsum(scan):
    """Gemma-like: GQA, RoPE, local and global layers (a traced window under scan), soft-capping,
    query scale, packed documents; blocks of 8 over 24 tokens."""
    cfg = ModelConfig(
        vocab_size=32, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=64,
        positions="rope", norm="rmsnorm", layer_pattern="lg", sliding_window=5, attn_softcap=20.0,
        query_scale=16.0, scan_layers=scan, attention_block=8,
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 32)
    segment_ids = jnp.array([[0] * 10 + [1] * 14, [0] * 24])
    params = TransformerLM(cfg).init(jax.random.key(0), tokens)["params"]
    want = _loss_and_grads(cfg, params, tokens, segment_ids)
    got = _loss_and_grads(dataclasses.replace(cfg, attention="blockwise"), params, tokens, segment_ids)
    np.testing.assert_allclose(got[0], want[0], atol=TOL, rtol=TOL)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL)


def _grad_temp_bytes(fn, t: int, h=2, d=16) -> int:
    """Compiled temporaries of the gradient of sum(attention) at length t (batch 1)."""
    x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_backward_memory_is_linear_in_the_length():
    blockwise_fn = lambda q, k, v: blockwise.attention(q, k, v, block_q=128, block_k=128)  # noqa: E731
    small, large = _grad_temp_bytes(blockwise_fn, 1024), _grad_temp_bytes(blockwise_fn, 4096)
    ref_small, ref_large = _grad_temp_bytes(ops._causal_attention, 1024), _grad_temp_bytes(ops._causal_attention, 4096)
    assert large / small < 5, (small, large)  # linear: 4x
    assert ref_large / ref_small > 10, (ref_small, ref_large)  # quadratic: 16x
    assert large < ref_large / 10


# A 16k-token training step of a small model (4 layers, 8 heads) against a 4 GiB budget of
# temporaries: the reference attention's [b, h, t, s] scores (and their gradients) need far more;
# blockwise attention fits, and that step then really runs here (experiments/long_context.py times it).
BUDGET_GIB = 4
LONG = ModelConfig(
    vocab_size=256, num_layers=4, num_heads=8, embed_dim=256, mlp_dim=1024, max_len=16384,
    positions="rope", norm="rmsnorm", mlp_activation="swiglu", scan_layers=True, remat="full",
)  # fmt: skip


def _train_step_temp_gib(cfg: ModelConfig, t: int) -> float:
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
    model = TransformerLM(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])

    def step(p, tokens):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens)[..., 0]))(p)

    return jax.jit(step).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes / 2**30


def test_16k_step_fits_the_budget_only_with_blockwise_attention():
    reference = _train_step_temp_gib(LONG, 16384)
    flash = _train_step_temp_gib(dataclasses.replace(LONG, attention="blockwise", attention_block=512), 16384)
    assert reference > BUDGET_GIB, reference
    assert flash < BUDGET_GIB / 4, flash


def test_kernels_on_the_wrong_hardware_are_one_clear_line():
    with pytest.raises(BadValue, match="attention='splash' is a TPU kernel but the devices are cpu.*'blockwise'"):
        kernels.check_platform("splash", "cpu")
    with pytest.raises(BadValue, match="attention='cudnn' is a GPU kernel"):
        kernels.check_platform("cudnn", "tpu")
    kernels.check_platform("blockwise", "cpu")
    with pytest.raises(BadValue, match="attention='cudnn' has no soft-capping"):
        ModelConfig(attention="cudnn", attn_softcap=30.0)
    with pytest.raises(BadValue, match="attention='flash'"):
        ModelConfig(attention="flash")


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("LLM_JAX_REQUIRE_LIBTPU"),
    reason="TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'",
)
def test_splash_kernel_is_in_the_tpu_train_step():
    """attention='splash': the trainer's step for a v5p slice (4 chips, FSDP) lowers with the Pallas
    kernel (a tpu_custom_call per pass: forward, dq, dkv), packed documents included; on the CPU
    devices the same config is refused in one line. (The 8B rows in README are full compiles.)"""
    from llm_jax.tools import aot

    spec = importlib.util.spec_from_file_location("cfg_llama3", os.path.join(REPO, "configs", "llama3.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overrides = {"model.attention": "splash", "model.head_dim": 128, "data.seq_len": 256, "model.max_len": 256}
    overrides["data.packing"] = "documents"  # segment ids reach the kernel
    config = aot.with_overrides(module.get_config("tiny"), overrides)
    text = aot.build_train_step(config, aot.topology_devices(aot.parse_topology("v5p-8"))).lower().as_text()
    assert text.count("tpu_custom_call") == 3
    with pytest.raises(BadValue, match="attention='splash' is a TPU kernel but the devices are cpu"):
        aot.build_train_step(config, jax.devices("cpu")[:1])


@pytest.mark.parametrize(
    "offset, window, blocks",
    # A middle slice with uneven blocks (keys padded to 64), a window that skips whole key blocks, and
    # the last slice. The offset is traced, as under shard_map.
    [(16, 5, (8, 16)), (24, 9, (8, 8)), (32, None, (16, 8))],
    ids=["middle_uneven_blocks", "window_skips_blocks", "last"],
)
def test_query_offset_with_longer_keys_equals_the_reference(offset, window, blocks):
    """A context-parallel device's case: t_q = 16 local queries at global positions offset.., all
    t_k = 48 keys; causal + segments + window + GQA + softcap, values and gradients."""
    q, k, v, _, seg = _inputs(t=48, h=4, kv=2, segments=True)
    q, seg_q = q[:, offset : offset + 16], seg[:, offset : offset + 16]
    ct = jax.random.normal(jax.random.key(9), q.shape)
    q_idx, k_idx = offset + jnp.arange(16), jnp.arange(48)
    mask = (k_idx[None] <= q_idx[:, None]) & ops.within_window(q_idx, k_idx, window)
    mask = mask[None] & ops._same_segment(seg_q, seg)

    def ref(q, k, v):
        return ops.attend(q, k, v, mask, "einsum", scale=0.4, softcap=3.0)

    @jax.jit
    def new(q, k, v, off):
        return blockwise.attention(q, k, v, seg_q, window, 0.4, 3.0, *blocks, q_offset=off, kv_segment_ids=seg)

    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    out_new, vjp_new = jax.vjp(lambda q, k, v: new(q, k, v, jnp.int32(offset)), q, k, v)
    np.testing.assert_allclose(out_new, out_ref, atol=TOL, rtol=TOL)
    for name, g_new, g_ref in zip("qkv", vjp_new(ct), vjp_ref(ct)):
        np.testing.assert_allclose(g_new, g_ref, atol=TOL, rtol=TOL, err_msg=f"d{name}")

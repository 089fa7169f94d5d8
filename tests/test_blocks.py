"""The block options of today's open models, each against a plain reference, and through scan,
remat, bf16 and the KV cache: local (sliding-window) layers, per-layer RoPE bases, QK-norm,
Gemma's (1 + w) RMSNorm, post-norms, GeGLU, embedding scale, query scale, attention and final
soft-capping, an output projection without bias. (Parity with transformers: test_hf_families.py;
loss and gradients on FSDP / tensor meshes: test_sharding.py's gemma configs.)"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runlib as R
from flax import traverse_util

from llm_jax.inference import decode
from llm_jax.models import loss as loss_lib
from llm_jax.models.layers import Mlp, RMSNorm
from llm_jax.models.model import ModelConfig, TransformerLM, attend, output_kernel
from llm_jax.runtime.errors import BadValue

GEMMA = ModelConfig(
    vocab_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=6,
    embed_dim=16,
    mlp_dim=24,
    max_len=48,
    **R.GEMMA_BLOCK,
    attention_bias=True,
    attention_out_bias=False,
    layer_pattern="llg",
    sliding_window=4,
    query_scale=5.0,
    attn_softcap=3.0,
    final_softcap=4.0,
    tie_embeddings=False,
)


def reference_attention(q, k, v, window=None, scale=None, softcap=None, segments=None):
    """Plain numpy causal attention, one query at a time. q [b, t, h, d]; k, v [b, t, k, d]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            for hi in range(h):
                seen = [j for j in range(i + 1) if window is None or i - j < window]
                if segments is not None:
                    seen = [j for j in seen if segments[bi, j] == segments[bi, i]]
                logits = np.array([q[bi, i, hi] @ k[bi, j, hi // g] for j in seen]) * (scale or d**-0.5)
                if softcap:
                    logits = softcap * np.tanh(logits / softcap)
                p = np.exp(logits - logits.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, seen, hi // g]
    return out


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
@pytest.mark.parametrize(
    "t, window, scale, softcap, packed",
    [(12, 4, None, None, False), (12, 5, 0.3, 2.0, True), (256, 100, None, 1.5, False), (9, 1, None, None, False)],
)
def test_windowed_scaled_softcapped_attention_equals_reference(impl, t, window, scale, softcap, packed):
    """`attend` with a window (also 1: only itself; and at t=256 the query-blocked causal path),
    a query scale, soft-capping and packed segments, GQA, equals the one-query-at-a-time reference."""
    b, h, kv, d = 2, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, n, d)) for i, n in ((0, h), (1, kv), (2, kv)))
    segments = np.repeat(np.arange(3), -(-t // 3))[:t][None].repeat(b, 0) if packed else None
    ours = attend(q, k, v, None, impl, segments, window=window, scale=scale, softcap=softcap)
    if t > 64:  # the reference is slow: compare a few rows of each query block
        rows = [0, 1, 127, 128, 200, 255]
        want = reference_attention(q, k, v, window, scale, softcap, segments)[:, rows]
        np.testing.assert_allclose(np.asarray(ours)[:, rows], want, atol=2e-5)
    else:
        np.testing.assert_allclose(ours, reference_attention(q, k, v, window, scale, softcap, segments), atol=2e-5)


def test_gemma_rmsnorm_is_one_plus_scale_and_starts_at_identity_scale():
    cfg = dataclasses.replace(GEMMA, norm_eps=1e-6)
    x = jax.random.normal(jax.random.key(0), (2, 3, 16)) * 3
    norm = RMSNorm(cfg)
    params = norm.init(jax.random.key(1), x)
    np.testing.assert_array_equal(params["params"]["scale"].value, np.zeros(16))  # (1 + 0): unit scale at init
    w = np.linspace(-0.5, 0.5, 16).astype(np.float32)
    want = np.asarray(x) / np.sqrt(np.mean(np.square(np.asarray(x)), -1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(norm.apply({"params": {"scale": w}}, x), want, rtol=1e-5)
    plain = RMSNorm(dataclasses.replace(cfg, norm_plus_one=False))
    np.testing.assert_allclose(plain.apply({"params": {"scale": w}}, x), want / (1 + w) * w, rtol=1e-4, atol=1e-6)


def test_geglu_is_tanh_gelu_gate_times_up():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    mlp = Mlp(GEMMA)
    p = nn.meta.unbox(mlp.init(jax.random.key(1), x))["params"]
    w0, w1, wo = (np.asarray(p[n]["kernel"], np.float64) for n in ("wi_0", "wi_1", "wo"))
    xs = np.asarray(x, np.float64)
    a = xs @ w0
    gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    np.testing.assert_allclose(mlp.apply({"params": p}, x), (gelu * (xs @ w1)) @ wo, rtol=1e-4, atol=1e-6)
    assert "bias" not in p["wo"]


def _params(cfg, seed=0, length=8):
    model = TransformerLM(cfg)
    return model, nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32)))["params"]


def _stack(params, n):
    """Unrolled params (layers_0, layers_1, ...) -> the scanned layout (one 'layers' stacked on axis 0)."""
    layers = [params.pop(f"layers_{i}") for i in range(n)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def test_parameters_of_the_new_options():
    _, params = _params(GEMMA)
    flat = {"/".join(k) for k in traverse_util.flatten_dict(params)}
    layer = {k.split("/", 1)[1] for k in flat if k.startswith("layers_0/")}
    assert {"attn/query_norm/scale", "attn/key_norm/scale", "ln_1_post/scale", "ln_2_post/scale"} <= layer
    assert {"attn/query/bias", "attn/key/bias", "attn/value/bias"} <= layer and "attn/out/bias" not in layer


def test_final_softcap_and_embed_scale_change_exactly_what_they_say():
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, 64)
    model, params = _params(GEMMA)
    capped = model.apply({"params": params}, tokens)
    raw = TransformerLM(dataclasses.replace(GEMMA, final_softcap=None)).apply({"params": params}, tokens)
    np.testing.assert_allclose(capped, 4.0 * np.tanh(np.asarray(raw) / 4.0), rtol=1e-5, atol=1e-6)
    # Embedding scale: the same as feeding a table sqrt(16) = 4x larger without it.
    bigger = {**params, "embed": {"embedding": params["embed"]["embedding"] * 4.0}}
    unscaled = TransformerLM(dataclasses.replace(GEMMA, embed_scale=False)).apply({"params": bigger}, tokens)
    np.testing.assert_allclose(capped, unscaled, rtol=1e-5, atol=1e-5)


def test_scan_and_remat_equal_unrolled_with_mixed_layers():
    """'llg' under scan traces each layer's window and RoPE base: logits and gradients equal the
    unrolled model's, with and without remat."""
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
    model, params = _params(GEMMA)
    want = model.apply({"params": params}, tokens)

    def grads(cfg, p):
        loss = lambda p: TransformerLM(cfg).apply({"params": p}, tokens).sum()  # noqa: E731
        return jax.grad(loss)(p)

    ref_g = grads(GEMMA, params)
    for remat in ("none", "full"):
        cfg = dataclasses.replace(GEMMA, scan_layers=True, remat=remat)
        stacked = _stack(dict(params), GEMMA.num_layers)
        np.testing.assert_allclose(TransformerLM(cfg).apply({"params": stacked}, tokens), want, atol=1e-5)
        got = grads(cfg, stacked)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, _stack(dict(ref_g), 3))


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_decoding_with_the_cache_equals_full_recomputation_past_the_window(scan):
    """32 greedy tokens with the KV cache (windows applied through cached positions) equal argmax
    over a full forward pass of the whole sequence at every step, far past the 4-token window."""
    model, params = _params(GEMMA, seed=1)
    if scan:
        model = TransformerLM(dataclasses.replace(GEMMA, scan_layers=True))
        params = _stack(dict(params), GEMMA.num_layers)
    prompt = np.asarray([[5, 9, 13, 2, 7, 1]], np.int32)
    tokens, start = decode.left_pad(prompt.tolist())
    got = np.asarray(decode.generate(model, params, tokens, start, jax.random.key(0), max_new_tokens=32).tokens)
    forward = jax.jit(lambda t: model.apply({"params": params}, t)[:, -1].argmax(-1))
    seq = prompt
    for _ in range(32):
        seq = np.concatenate([seq, np.asarray(forward(seq))[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq[:, prompt.shape[1] :])


def test_bfloat16_compute_stays_close_to_float32():
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
    model, params = _params(GEMMA)
    want = np.asarray(model.apply({"params": params}, tokens))
    got = TransformerLM(dataclasses.replace(GEMMA, dtype="bfloat16")).apply({"params": params}, tokens)
    assert got.dtype == jnp.float32 and np.abs(np.asarray(got) - want).max() < 0.1 * np.abs(want).max()


def test_chunked_loss_with_final_softcap_equals_the_plain_loss_and_gradients():
    cfg = dataclasses.replace(GEMMA, loss_chunk=4)
    model, params = _params(cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def plain(p):
        logits = TransformerLM(GEMMA).apply({"params": p}, batch["inputs"])
        return loss_lib.token_loss(logits, batch["targets"], None)[0]

    def chunked(p):
        hidden = model.apply({"params": p}, batch["inputs"], return_hidden=True)
        kernel, vocab_first = output_kernel(cfg, p)
        return loss_lib.chunked_cross_entropy(hidden, kernel, batch["targets"], None, 4, vocab_first, 0.0, 4.0)[0]

    (a, ga), (b, gb) = jax.value_and_grad(plain)(params), jax.value_and_grad(chunked)(params)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), ga, gb)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layer_pattern="lx"), "layer_pattern='lx'"),
        (dict(layer_pattern="lg"), "set sliding_window"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(attn_softcap=-1.0), "attn_softcap=-1.0"),
        (dict(qk_norm=True, norm="layernorm"), "qk_norm is an RMSNorm"),
        (dict(mlp_activation="reglu"), "mlp_activation='reglu'"),
        (dict(family="encdec", layer_pattern="l", sliding_window=4), "decoder-only"),
    ],
)
def test_bad_block_options_are_one_line_errors(fields, message):
    with pytest.raises(BadValue, match=message):
        ModelConfig(**fields)

"""Layer tests on small hand-made inputs, and model-level properties (causality, KV cache, scan,
remat, logical axis names, known parameter counts)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.models.model import (
    Attention,
    Mlp,
    ModelConfig,
    TransformerLM,
    attend,
    count_params,
    make_norm,
    rope,
    rope_frequencies,
)
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue

GPT = ModelConfig(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    embed_dim=32,
    mlp_dim=64,
    max_len=32,
    positions="learned",
    norm="layernorm",
    mlp_activation="gelu",
    use_bias=True,
    tie_embeddings=True,
)
LLAMA = ModelConfig(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    mlp_dim=64,
    max_len=32,
    positions="rope",
    norm="rmsnorm",
    mlp_activation="swiglu",
    use_bias=False,
    tie_embeddings=False,
)


def _rng(i=0):
    return np.random.default_rng(i)


def _tokens(cfg, b=2, t=12, seed=0):
    return jnp.asarray(_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


# Everything model-sized runs jitted (op-by-op dispatch of a flax model is slow to "compile"),
# with the config static so that tests with the same config and shapes share one compilation,
# and compiled for compile speed: each program runs once or twice.
FAST = {"xla_backend_optimization_level": 0}


@functools.cache
def _params(cfg):
    """Unboxed parameters of `cfg` (seed 0)."""
    init = lambda: nn.meta.unbox(TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])  # noqa: E731
    return jax.jit(init, compiler_options=FAST)()


@functools.cache
def _empty_cache(cfg, b):
    init = lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((b, cfg.max_len), jnp.int32), decode=True)  # noqa: E731
    return jax.jit(lambda: nn.meta.unbox(init()["cache"]), compiler_options=FAST)()


_attend = jax.jit(attend, static_argnums=4, compiler_options=FAST)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _logits(cfg, params, tokens):
    return TransformerLM(cfg).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _decode(cfg, params, cache, tokens, positions):
    """One cached forward: (logits, new cache)."""
    logits, mut = TransformerLM(cfg).apply(
        {"params": params, "cache": cache}, tokens, positions, decode=True, mutable=["cache"]
    )
    return logits, mut["cache"]


# ----------------------------------------------------------------------------------------------
# RoPE


def _rope(x, pos, theta):
    """rope() with the plain (unscaled) frequencies of base `theta` for x's head dim."""
    d = x.shape[-1]
    cfg = ModelConfig(vocab_size=8, num_heads=1, embed_dim=d, positions="rope", rope_theta=theta)
    return rope(x, pos, rope_frequencies(cfg))


def _rope_reference(x, pos, theta):
    """Independent reference: pairs (x[i], x[i + d/2]) as complex numbers times exp(i * pos * f_i)."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d)  # [d/2]
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    z = z * np.exp(1j * pos[:, :, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_hand_values():
    # d=2: one pair with frequency 1, so position p rotates (1, 0) to (cos p, sin p).
    x = jnp.asarray([[[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 2.0]]]])  # [b=1, t=3, h=1, d=2]
    pos = jnp.asarray([[0, 1, 2]])
    out = np.asarray(_rope(x, pos, 10000.0))[0, :, 0]
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(out[1], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)
    np.testing.assert_allclose(out[2], [-2 * np.sin(2.0), 2 * np.cos(2.0)], rtol=1e-6)


def test_rope_matches_complex_reference():
    x = _rng(1).normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.asarray([[0, 1, 2, 3, 4], [7, 100, 3, 0, 2048]])
    out = _rope(jnp.asarray(x), jnp.asarray(pos), 500.0)
    np.testing.assert_allclose(np.asarray(out), _rope_reference(x, pos, 500.0), rtol=2e-5, atol=2e-5)


def test_rope_properties():
    x = jnp.asarray(_rng(2).normal(size=(1, 4, 2, 16)), jnp.float32)
    # Position 0 is the identity; the rotation keeps the norm.
    np.testing.assert_allclose(_rope(x, jnp.zeros((1, 4), jnp.int32), 10000.0), x, atol=1e-7)
    rot = _rope(x, jnp.asarray([[3, 9, 27, 81]]), 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(rot, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # q.k depends only on the relative offset m - n.
    q, k = x[:, :1], x[:, 1:2]

    def dot(m, n):
        return float(jnp.sum(_rope(q, jnp.asarray([[m]]), 10000.0) * _rope(k, jnp.asarray([[n]]), 10000.0)))

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)
    assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)
    # dtype is kept.
    assert _rope(x.astype(jnp.bfloat16), jnp.zeros((1, 4), jnp.int32), 10000.0).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# attend


def _attend_reference(q, k, v, mask):
    """numpy MHA: q [b,t,h,d], k/v [b,s,h,d] (same heads), mask [b,t,s] bool."""
    d = q.shape[-1]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    logits = np.where(mask[:, None], logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(b=2, t=6, h=4, kv=4, d=8, seed=3):
    r = _rng(seed)
    q = r.normal(size=(b, t, h, d)).astype(np.float32)
    k = r.normal(size=(b, t, kv, d)).astype(np.float32)
    v = r.normal(size=(b, t, kv, d)).astype(np.float32)
    return q, k, v


def test_attend_causal_matches_reference():
    q, k, v = _qkv()
    causal = np.broadcast_to(np.tril(np.ones((6, 6), bool)), (2, 6, 6))
    out = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, "einsum")
    np.testing.assert_allclose(np.asarray(out), _attend_reference(q, k, v, causal), rtol=1e-5, atol=1e-6)
    # The first query sees only the first key: its output is exactly v[:, 0].
    np.testing.assert_allclose(np.asarray(out)[:, 0], v[:, 0], rtol=1e-6)


def test_attend_future_keys_do_not_matter():
    q, k, v = _qkv()
    out = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, "einsum")
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] += 10.0
    v2[:, 4:] -= 10.0
    out2 = _attend(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), None, "einsum")
    np.testing.assert_array_equal(np.asarray(out)[:, :4], np.asarray(out2)[:, :4])
    assert not np.allclose(np.asarray(out)[:, 4:], np.asarray(out2)[:, 4:])


def test_attend_explicit_mask_semantics():
    q, k, v = _qkv()
    # Each query may look at exactly one key (key (t + 2) % s): the output is that key's value.
    mask = np.zeros((2, 6, 6), bool)
    for t in range(6):
        mask[:, t, (t + 2) % 6] = True
    out = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), "einsum"))
    for t in range(6):
        np.testing.assert_allclose(out[:, t], v[:, (t + 2) % 6], rtol=1e-6)
    # A general mask (True = may attend) against the reference, keys masked per batch row.
    mask = _rng(4).random((2, 6, 6)) < 0.6
    mask[:, :, 0] = True  # every row sees at least one key
    out = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), "einsum")
    np.testing.assert_allclose(np.asarray(out), _attend_reference(q, k, v, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
def test_gqa_equals_mha_with_repeated_kv_heads(impl):
    q, k, v = _qkv(h=6, kv=2)
    # Query head j uses kv head j // (h // kv): repeating each kv head g times gives plain MHA.
    k_rep, v_rep = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    mask = np.broadcast_to(np.tril(np.ones((6, 6), bool)), (2, 6, 6))
    for m in (None, jnp.asarray(mask)):
        gqa = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), m, impl)
        mha = _attend(jnp.asarray(q), jnp.asarray(k_rep), jnp.asarray(v_rep), m, impl)
        np.testing.assert_allclose(np.asarray(gqa), np.asarray(mha), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gqa), _attend_reference(q, k_rep, v_rep, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv", [4, 2])
def test_einsum_and_dot_product_attention_agree(kv):
    q, k, v = _qkv(kv=kv)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(attend(*args, None, "einsum"), _attend(*args, None, "dot_product"), rtol=1e-5, atol=1e-6)
    mask = _rng(5).random((2, 6, 6)) < 0.5
    mask[:, :, 1] = True
    mask = jnp.asarray(mask)
    np.testing.assert_allclose(attend(*args, mask, "einsum"), _attend(*args, mask, "dot_product"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Norms and MLP


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_hand_values(kind):
    cfg = dataclasses.replace(GPT, norm=kind, norm_eps=1e-6)
    x = jnp.asarray([[1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, 1.0, 1.0]])
    norm = make_norm(cfg, "n")
    params = nn.meta.unbox(norm.init(jax.random.key(0), x)["params"])
    assert set(params) == ({"scale"} if kind == "rmsnorm" else {"scale", "bias"})
    params = {**params, "scale": jnp.asarray([1.0, 2.0, 0.5, 1.0])}
    if kind == "layernorm":
        params["bias"] = jnp.asarray([0.0, 1.0, 0.0, -1.0])
    out = np.asarray(norm.apply({"params": params}, x))
    xn = np.asarray(x, np.float64)
    if kind == "rmsnorm":
        # row 0: mean square (1 + 4 + 9 + 36) / 4 = 12.5
        expect = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * [1.0, 2.0, 0.5, 1.0]
        np.testing.assert_allclose(out[0, 0], 1.0 / np.sqrt(12.5 + 1e-6), rtol=1e-6)
    else:
        # row 0: mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5
        expect = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
        expect = expect * [1.0, 2.0, 0.5, 1.0] + [0.0, 1.0, 0.0, -1.0]
        np.testing.assert_allclose(out[0, 0], -2.0 / np.sqrt(3.5 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_mlp_shapes_and_values(act):
    cfg = dataclasses.replace(GPT, mlp_activation=act, embed_dim=8, mlp_dim=12, use_bias=act == "gelu")
    x = jnp.asarray(_rng(6).normal(size=(2, 3, 8)), jnp.float32)
    mlp = Mlp(cfg)
    params = jax.jit(lambda: nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"]), compiler_options=FAST)()
    shapes = jax.tree.map(lambda a: a.shape, params)
    if act == "gelu":
        assert shapes == {"wi": {"kernel": (8, 12), "bias": (12,)}, "wo": {"kernel": (12, 8), "bias": (8,)}}
    else:
        assert shapes == {"wi_0": {"kernel": (8, 12)}, "wi_1": {"kernel": (8, 12)}, "wo": {"kernel": (12, 8)}}
    # Give the biases non-zero values so they are checked too.
    params = jax.tree.map(lambda a: a + 0.1, params)
    out = np.asarray(jax.jit(mlp.apply, compiler_options=FAST)({"params": params}, x))
    assert out.shape == (2, 3, 8)
    xn = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    if act == "gelu":
        h = xn @ p["wi"]["kernel"] + p["wi"]["bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        expect = h @ p["wo"]["kernel"] + p["wo"]["bias"]
    else:
        g, u = xn @ p["wi_0"]["kernel"], xn @ p["wi_1"]["kernel"]
        expect = (g / (1 + np.exp(-g)) * u) @ p["wo"]["kernel"]
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


def test_attention_param_shapes_gqa():
    cfg = dataclasses.replace(LLAMA, num_heads=4, num_kv_heads=2, embed_dim=16)
    x = jnp.zeros((1, 5, 16))
    init = lambda: Attention(cfg).init(jax.random.key(0), x, jnp.zeros((1, 5), jnp.int32), True, False)  # noqa: E731
    params = nn.meta.unbox(jax.eval_shape(init)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == {
        "query": {"kernel": (16, 4, 4)},
        "key": {"kernel": (16, 2, 4)},
        "value": {"kernel": (16, 2, 4)},
        "out": {"kernel": (4, 4, 16)},
    }


# ----------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_logits_shape_dtype_and_causality(cfg):
    params = _params(cfg)
    tokens = _tokens(cfg)
    logits = _logits(cfg, params, tokens)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    # Changing token 6 leaves the logits of positions 0..5 exactly as they were.
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
    logits2 = _logits(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(logits)[:, :6], np.asarray(logits2)[:, :6])
    assert not np.allclose(np.asarray(logits)[:, 6:], np.asarray(logits2)[:, 6:])


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_kv_cache_decoding_matches_full_forward(cfg):
    tokens = _tokens(cfg)  # [2, 12]
    params = _params(cfg)
    full = _logits(cfg, params, tokens)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    logits, cache = _decode(cfg, params, _empty_cache(cfg, 2), tokens[:, :9], pos[:, :9])  # prefill
    np.testing.assert_allclose(logits, full[:, :9], rtol=1e-5, atol=1e-5)
    for i in range(9, 12):  # then one token at a time
        logits, cache = _decode(cfg, params, cache, tokens[:, i : i + 1], pos[:, i : i + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_left_padding_with_position_minus_one_is_ignored(cfg):
    params = _params(cfg)
    prompt = _tokens(cfg, b=1, t=9, seed=8)
    # Row 0: the prompt alone. Rows 1, 2: the prompt left-padded by 3 tokens at position -1, with
    # different pad ids (the pad tokens must be invisible whatever they are).
    tokens = jnp.concatenate(
        [
            jnp.concatenate([prompt, jnp.zeros((1, 3), jnp.int32)], axis=1),  # right-padded, unused tail
            jnp.concatenate([jnp.asarray([[0, 0, 0]], jnp.int32), prompt], axis=1),
            jnp.concatenate([jnp.asarray([[17, 33, 5]], jnp.int32), prompt], axis=1),
        ]
    )
    positions = jnp.asarray(
        [list(range(9)) + [-1, -1, -1], [-1, -1, -1] + list(range(9)), [-1, -1, -1] + list(range(9))], jnp.int32
    )
    out, cache = _decode(cfg, params, _empty_cache(cfg, 3), tokens, positions)
    assert np.abs(np.asarray(out[0, :9]) - np.asarray(out[1, :9])).max() > 1e-3  # it does depend on position
    for row in (1, 2):
        np.testing.assert_allclose(out[row, 3:], out[0, :9], rtol=1e-5, atol=1e-5)
    # The next token (position 9) too: the pad slots stay in the cache, still ignored.
    nxt, _ = _decode(cfg, params, cache, jnp.full((3, 1), 7, jnp.int32), jnp.full((3, 1), 9, jnp.int32))
    full = _logits(cfg, params, jnp.concatenate([prompt, jnp.asarray([[7]], jnp.int32)], axis=1))
    for row in range(3):
        np.testing.assert_allclose(nxt[row, 0], full[0, 9], rtol=1e-5, atol=1e-5)


def test_scan_layers_equals_unrolled():
    cfg = LLAMA
    params = _params(cfg)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(cfg.num_layers)])
    scan_params = {k: v for k, v in params.items() if not k.startswith("layers_")} | {"layers": stacked}
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    # The scanned model's own init has the same tree structure and shapes.
    abstract = jax.eval_shape(lambda: TransformerLM(scan_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    ref_shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract["params"]))
    assert jax.tree.map(lambda a: a.shape, scan_params) == ref_shapes
    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        _logits(cfg, params, tokens), _logits(scan_cfg, scan_params, tokens), rtol=1e-5, atol=1e-5
    )


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = TransformerLM(cfg).apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_grads(remat):
    cfg = dataclasses.replace(GPT, num_layers=1)  # remat wraps each block: one is enough
    params, tokens = _params(cfg), _tokens(cfg)
    l0, g0 = _loss_and_grads(cfg, params, tokens)
    l1, g1 = _loss_and_grads(dataclasses.replace(cfg, remat=remat), params, tokens)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_dropout():
    cfg = dataclasses.replace(GPT, dropout_rate=0.5)
    params, tokens = _params(GPT), _tokens(GPT)
    run = jax.jit(
        lambda rng: TransformerLM(cfg).apply({"params": params}, tokens, deterministic=False, rngs={"dropout": rng}),
        compiler_options=FAST,
    )
    d1, d1b, d2 = (run(jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(d1, d1b)  # the masks are a function of the key
    det = _logits(GPT, params, tokens)
    assert not np.allclose(d1, det) and not np.allclose(d1, d2)
    # deterministic=True (evaluation) switches dropout off.
    np.testing.assert_allclose(_logits(cfg, params, tokens), det, rtol=1e-6, atol=1e-7)


def test_tied_and_untied_output():
    tied = _params(GPT)
    assert "lm_head" not in tied
    untied = _params(LLAMA)
    assert untied["lm_head"]["kernel"].shape == (LLAMA.embed_dim, LLAMA.vocab_size)
    # Tied: the logits are the final hidden state times the embedding table. Check it by
    # swapping the table: with every row equal, all vocabulary entries get the same logit.
    flat = {**tied, "embed": {"embedding": jnp.ones_like(tied["embed"]["embedding"])}}
    logits = np.asarray(_logits(GPT, flat, jnp.zeros((2, 12), jnp.int32)))
    np.testing.assert_allclose(logits, np.broadcast_to(logits[..., :1], logits.shape), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Logical axis names


def _boxed_leaves(tree):
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]


@pytest.mark.parametrize(
    "cfg",
    [
        GPT,
        LLAMA,
        dataclasses.replace(LLAMA, scan_layers=True, use_bias=True),
        dataclasses.replace(GPT, scan_layers=True, tie_embeddings=False),
    ],
    ids=["gpt", "llama", "llama_scan_bias", "gpt_scan_untied"],
)
def test_every_parameter_and_cache_variable_has_logical_axis_names(cfg):
    known = {name for name, _ in sharding.LOGICAL_RULES}
    variables = jax.eval_shape(
        lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((2, cfg.max_len), jnp.int32), decode=True)
    )
    leaves = _boxed_leaves(variables["params"])
    assert len(leaves) >= 10
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} vs shape {leaf.value.shape}"
        assert set(leaf.names) <= known, f"{where}: {leaf.names} has a name the sharding rules do not know"
        assert ("layers" in leaf.names) == (cfg.scan_layers and where.startswith("['layers']")), where
    for path, leaf in _boxed_leaves(variables["cache"]):
        if jax.tree_util.keystr(path).endswith("['index']"):
            continue  # the scalar write index
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert set(leaf.names) <= known


# ----------------------------------------------------------------------------------------------
# Known sizes of the presets (exact published parameter counts)


def test_gpt2_small_has_124m_parameters():
    cfg = ModelConfig(
        vocab_size=50257, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, max_len=1024, scan_layers=True
    )
    shapes = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert count_params(shapes["params"]) == 124_439_808


def test_llama2_7b_has_6_74b_parameters():
    cfg = ModelConfig(
        vocab_size=32000,
        num_layers=32,
        num_heads=32,
        embed_dim=4096,
        mlp_dim=11008,
        max_len=4096,
        positions="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
        scan_layers=True,
    )
    shapes = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert count_params(shapes["params"]) == 6_738_415_616


def test_model_config_validation_messages():
    with pytest.raises(BadValue, match="embed_dim=30 is not divisible by num_heads=4"):
        ModelConfig(vocab_size=8, embed_dim=30, num_heads=4)
    with pytest.raises(BadValue, match="num_kv_heads=3"):
        ModelConfig(vocab_size=8, embed_dim=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(BadValue, match="rope needs an even head_dim"):
        ModelConfig(vocab_size=8, embed_dim=12, num_heads=4, positions="rope")
    with pytest.raises(BadValue, match="norm='batchnorm'"):
        ModelConfig(vocab_size=8, norm="batchnorm")

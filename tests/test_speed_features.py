"""Every speed switch leaves the loss (and the gradients) what the reference path computes.

Reference: layers unrolled, no remat, einsum attention, float32, full logits, one micro-batch.
Each switch is compared on the same weights (scan gets the unrolled weights stacked).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import leafcheck
import numpy as np
import pytest

from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training import config as config_lib
from llm_jax.training import optim
from llm_jax.training import state as state_lib

B, T = 4, 16


def _cfg(**kw):
    base = dict(vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=32)
    base.update(kw)
    return ModelConfig(**base)


def _batch(seed=0, vocab=128, weights=False):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, vocab, (B, T + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    if weights:
        batch["weights"] = jnp.asarray((rng.random((B, T)) > 0.3).astype(np.float32))
    return batch


def _params(cfg):
    return nn.unbox(TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])


def _stack_layers(params, num_layers):
    """Unrolled params (layers_0, layers_1, ...) -> nn.scan's layout (one 'layers' tree, leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
    return out


def _loss_and_grads(cfg, params, batch):
    model = TransformerLM(cfg)
    fn = lambda p: family_lib.of(model).loss_sum(model, p, batch, None, train=False)
    (total, count), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return float(total / count), grads


def _close(a, b, rtol, atol=0.0):
    """Leafwise allclose; atol is relative to the largest entry of the whole tree `b` (some
    gradients, e.g. the key bias's, are zero in exact arithmetic and pure rounding here)."""
    scale = max(float(np.abs(np.asarray(y, np.float32)).max()) for y in jax.tree.leaves(b))
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol * scale
        ),
        a,
        b,
    )


@pytest.fixture(scope="module")
def reference():
    cfg = _cfg()
    params = _params(cfg)
    batch = _batch()
    loss, grads = _loss_and_grads(cfg, params, batch)
    return cfg, params, batch, loss, grads


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "none"), (True, "dots")])
def test_scan_and_remat_keep_loss_and_grads(reference, scan, remat):
    cfg, params, batch, loss, grads = reference
    var = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
    p = _stack_layers(params, cfg.num_layers) if scan else params
    loss2, grads2 = _loss_and_grads(var, p, batch)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    _close(grads2, _stack_layers(grads, cfg.num_layers) if scan else grads, rtol=1e-4, atol=1e-5)


def test_scan_init_has_layer_axis_and_shards_on_fsdp():
    """Scanned params carry the 'layers' logical axis; the stacked weights still shard over fsdp."""
    cfg = _cfg(scan_layers=True, remat="dots")
    model = TransformerLM(cfg)
    mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=4))
    rules = sharding.logical_rules()
    tx = optim.make_optimizer(config_lib.base_config().optim)
    state, sh = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), T)
    spec = sh.params["layers"]["attn"]["query"]["kernel"].spec
    assert spec[0] is None and spec[1] == "fsdp", spec  # [layers, embed, heads, kv]
    kernel = state.params["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.shape == (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim)
    assert kernel.addressable_shards[0].data.shape == (cfg.num_layers, cfg.embed_dim // 4, cfg.mlp_dim)


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
    import ml_collections

    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_dot_product_attention_matches_einsum(reference):
    cfg, params, batch, loss, grads = reference
    loss2, grads2 = _loss_and_grads(dataclasses.replace(cfg, attention="dot_product"), params, batch)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    _close(grads2, grads, rtol=1e-4, atol=1e-5)


def test_dot_product_attention_gqa_and_rope_matches_einsum():
    cfg = _cfg(
        num_kv_heads=2, positions="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False, tie_embeddings=False
    )
    params, batch = _params(cfg), _batch()
    loss, grads = _loss_and_grads(cfg, params, batch)
    loss2, grads2 = _loss_and_grads(dataclasses.replace(cfg, attention="dot_product"), params, batch)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    _close(grads2, grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied,weights,chunk", [(True, True, 4), (False, False, T)])
def test_chunked_loss_matches_full_logits(tied, weights, chunk):
    cfg = _cfg(tie_embeddings=tied)
    params, batch = _params(cfg), _batch(weights=weights)
    loss, grads = _loss_and_grads(cfg, params, batch)
    loss2, grads2 = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=chunk), params, batch)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    _close(grads2, grads, rtol=1e-4, atol=1e-5)


def test_chunked_loss_rejects_a_chunk_that_does_not_divide():
    cfg = _cfg(loss_chunk=5)
    with pytest.raises(BadValue, match="does not divide"):
        _loss_and_grads(cfg, _params(cfg), _batch())


def test_bfloat16_compute_keeps_float32_master_weights(reference):
    cfg, params, batch, loss, grads = reference
    var = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_params(var)))
    loss2, grads2 = _loss_and_grads(dataclasses.replace(var, loss_chunk=8), params, batch)
    assert loss2 == pytest.approx(loss, rel=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads2))
    flat, flat2 = jax.flatten_util.ravel_pytree(grads)[0], jax.flatten_util.ravel_pytree(grads2)[0]
    assert float(jnp.vdot(flat, flat2) / (jnp.linalg.norm(flat) * jnp.linalg.norm(flat2))) > 0.99


def _fast_path_config():
    """A tiny GPT-2 on an 8-device (data 2 x fsdp 4) mesh, with an optimizer whose first step
    really moves every weight (the default warm-up has lr 0 at step 1). AdamW's first step is
    lr * g / (|g| + eps): with eps 1e-2 the elements near eps do not magnify the gradients' float
    noise past the weights' tolerance (at eps 1e-3 they did, 1.3e-5), and lr 0.1 still moves the
    least-moved leaf (a LayerNorm scale) by ~400 tolerances."""
    config = config_lib.base_config()
    config.model.update(vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=32)
    config.data.seq_len = T
    config.train.batch_size = 16  # 2 micro-batches of 8 rows: each splits over data x fsdp = 8
    config.mesh.update(data=2, fsdp=4, tensor=1)
    config.optim.update(lr=0.1, warmup_steps=0, decay_steps=100, eps=1e-2)
    return config_lib.finalize(config)


def _one_step(config, accum, **model_kw):
    """(before, after, metrics) of one real jitted train step (`state.make_steps`), as host trees
    in the unrolled layout; a scanned model starts from the unrolled model's weights, stacked."""
    mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config)
    tx = optim.make_optimizer(config.optim)
    cfg = dataclasses.replace(config_lib.model_config(config, 128), **model_kw)
    model = TransformerLM(cfg)
    state, sh = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), T)
    if cfg.scan_layers:  # same starting weights as the unrolled run
        unrolled = TransformerLM(dataclasses.replace(cfg, scan_layers=False))
        ref_state, _ = state_lib.create_sharded_state(unrolled, tx, mesh, rules, jax.random.key(0), T)
        params = jax.device_put(_stack_layers(ref_state.params, cfg.num_layers), sh.params)
        state = state.replace(params=params, opt_state=jax.device_put(tx.init(params), sh.opt_state))
    before = jax.device_get(state.params)
    tok = np.random.default_rng(1).integers(0, 128, (16, T + 1), dtype=np.int32)
    batch = sharding.host_to_global({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
    p_train, _ = state_lib.make_steps(model, tx, mesh, rules, sh, accum)
    state, metrics = p_train(state, batch, jax.random.key(2), {})
    adam = state.opt_state[1][0]  # chain(clip, adamw(scale_by_adam, ...)): AdamW's moments
    # The second moment (0.05 x g^2) is compared by its square root: the gradients' own range.
    after = {"params": state.params, "mu": adam.mu, "sqrt_nu": jax.tree.map(jnp.sqrt, adam.nu)}
    after = jax.device_get(after)
    if cfg.scan_layers:
        before = _unstack(before, cfg.num_layers)
        after = {k: _unstack(v, cfg.num_layers) for k, v in after.items()}
    return before, after, {k: float(v) for k, v in metrics.items()}


def test_grad_accumulation_and_fast_path_give_the_same_update():
    """One jitted train step on an 8-device (data 2 x fsdp 4) mesh: gradient accumulation x2 + scan
    + dots remat + chunked loss (what configs/bench_cpu.py runs) gives the plain step's loss,
    gradient norm, gradients (AdamW's first moment is 0.1 x the clipped gradient), second
    moments (by their square roots) and new weights, each leaf to 1e-5 of its largest value; every weight moved by far
    more than that."""
    config = _fast_path_config()
    before, ref, ref_m = _one_step(config, 1)
    _, fast, fast_m = _one_step(config, 2, scan_layers=True, remat="dots", loss_chunk=8)
    assert fast_m["loss"] == pytest.approx(ref_m["loss"], rel=1e-6)
    assert fast_m["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=1e-5)
    no_grad = ("['key']['bias']",)  # zero gradient in exact arithmetic (see leafcheck)
    leafcheck.assert_moved(before, ref["params"], frozen=no_grad, what="reference step")
    for part in ("mu", "sqrt_nu", "params"):
        leafcheck.assert_close(fast[part], ref[part], noise=no_grad, what=part)


def _unstack(params, num_layers):
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


@pytest.mark.parametrize("remat", ["dots"])
def test_scan_decode_matches_full_forward(remat):
    """The KV cache works under nn.scan (+ remat): token-by-token logits equal the full forward's."""
    cfg = _cfg(scan_layers=True, remat=remat)
    model = TransformerLM(cfg)
    params = _params(cfg)
    tok = _batch()["inputs"][:, :8]
    full = model.apply({"params": params}, tok)
    cache = model.init(jax.random.key(0), jnp.zeros((B, 8), jnp.int32), decode=True)["cache"]
    step = jax.jit(
        lambda p, c, x, pos: model.apply({"params": p, "cache": c}, x, positions=pos, decode=True, mutable=["cache"])
    )
    outs = []
    for i in range(8):
        out, mut = step(params, cache, tok[:, i : i + 1], jnp.full((B, 1), i, jnp.int32))
        cache = mut["cache"]
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)

"""Interpretability (llm_jax/tools/hooks.py, llm_jax/tools/interpret.py): capture and intervention
leave the model's output bit for bit alone, patching and the logit lens reproduce the model's own
output exactly, integrated gradients are complete, results agree across meshes, and the training
step's program is the plain model's."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runlib as R

from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.tools import hooks
from llm_jax.tools import interpret as interp

_COMMON = dict(vocab_size=64, vocab_multiple=1, embed_dim=32, mlp_dim=64, num_heads=4, max_len=16, init_std=0.3)
GPT = ModelConfig(num_layers=3, **_COMMON)
CONFIGS = {
    "gpt": GPT,
    # one compiled block applied num_layers times: the layer index is traced inside the hooks
    "llama_scan": ModelConfig(
        num_layers=3,
        num_kv_heads=2,
        positions="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        use_bias=False,
        scan_layers=True,
        remat="full",
        **_COMMON,
    ),  # fmt: skip
    # Gemma-style blocks: local / global layers (a window), post-norms, soft-capping, (1 + w) norms
    "gemma_local": ModelConfig(
        num_layers=2,
        num_kv_heads=2,
        **R.GEMMA_BLOCK,
        layer_pattern="lg",
        sliding_window=3,
        attn_softcap=5.0,
        final_softcap=8.0,
        **_COMMON,
    ),  # fmt: skip
    "encdec": ModelConfig(family="encdec", num_layers=2, num_encoder_layers=2, positions="learned", **_COMMON),
}
SEQ = 8


@functools.cache
def model_and_params(name):
    model = family_lib.build(CONFIGS[name])
    params = jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(1), SEQ)))()
    return model, params


def inputs_of(name, seed=0, batch=1):
    r = np.random.default_rng(seed)
    tokens = interp.rows(r.integers(0, 64, SEQ).tolist())
    out = {"tokens": np.tile(tokens, (batch, 1))}
    if CONFIGS[name].family == "encdec":
        out["source"] = np.tile(interp.rows(r.integers(0, 64, SEQ - 2).tolist()), (batch, 1))
    return out


@functools.partial(jax.jit, static_argnames=("model",))
def plain(model, params, inputs):
    return model.apply({"params": params}, **inputs)


@functools.partial(jax.jit, static_argnames=("model", "site", "layer"))
def patched_everywhere(model, params, inputs, source, site, layer):
    """`inputs` run with `site` at `layer` replaced at every position by `source` [L, b, ...]."""
    return hooks.forward(model, params, inputs, edit=hooks.patch_edit(site, source, layer, True))[0]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("gpt", marks=pytest.mark.slow),
        "llama_scan",
        pytest.param("gemma_local", marks=pytest.mark.slow),
        "encdec",
    ],
)
def test_capture_and_identity_edit_give_bit_identical_logits(name):
    model, params = model_and_params(name)
    inputs = inputs_of(name)
    seen = []

    def identity(site, layer, value):
        seen.append(site)
        return value

    run = jax.jit(lambda p, x: hooks.forward(model, p, x, edit=identity, capture=True))
    logits, acts = run(params, inputs)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain(model, params, inputs)))
    cfg = CONFIGS[name]
    stack = "decoder/" if cfg.family == "encdec" else ""
    e, h, d = cfg.embed_dim, cfg.num_heads, cfg.dim_per_head
    assert acts[stack + "residual"].shape == (cfg.num_layers, 1, SEQ, e)
    assert acts[stack + "heads"].shape == (cfg.num_layers, 1, SEQ, h, d)
    assert acts[stack + "mlp"].shape == acts[stack + "attn"].shape == (cfg.num_layers, 1, SEQ, e)
    assert acts[stack + "attention_weights"].shape == (cfg.num_layers, 1, h, SEQ, SEQ)
    if cfg.family == "encdec":
        assert acts["encoder/residual"].shape == (cfg.encoder_layers, 1, SEQ - 2, e)
        assert acts["decoder/cross_heads"].shape == (cfg.num_layers, 1, SEQ, h, d)
        assert acts["source_embed"].shape == (1, SEQ - 2, e) and "encoder/residual" in seen
    assert {"embed", stack + "residual", stack + "heads", stack + "attn", stack + "mlp"} <= set(seen)


@pytest.mark.parametrize("name", ["gpt", "llama_scan"])
def test_captured_sites_are_the_blocks_sums(name):
    """Pre-norm blocks without post-norms: residual[l] = residual[l-1] + attn[l] + mlp[l], and the
    attention output is the per-head outputs through the `out` projection (so each site is what
    its name says, whether layers are unrolled or scanned)."""
    model, params = model_and_params(name)
    _, acts = jax.jit(lambda p, x: hooks.forward(model, p, x, capture=True))(params, inputs_of(name))
    resid, attn, mlp = (np.asarray(acts[k], np.float64) for k in ("residual", "attn", "mlp"))
    np.testing.assert_allclose(resid[1:], resid[:-1] + attn[1:] + mlp[1:], atol=2e-5)
    layer = (lambda p, i: jax.tree.map(lambda v: v[i], p["layers"])) if CONFIGS[name].scan_layers else None
    for i in range(resid.shape[0]):
        p = layer(params, i) if layer else params[f"layers_{i}"]
        out = jnp.einsum("bthd,hde->bte", acts["heads"][i], p["attn"]["out"]["kernel"])
        out = out + p["attn"]["out"].get("bias", 0)
        np.testing.assert_allclose(out, acts["attn"][i], atol=2e-5)


def _patch_cases(name):
    """(site, layers, clean inputs, corrupted inputs): the encoder-decoder's decoder also reads the
    encoder, so its decoder is patched under a corrupted target and its encoder under a corrupted source."""
    clean, other = inputs_of(name, seed=0), inputs_of(name, seed=1)
    cfg = CONFIGS[name]
    if cfg.family != "encdec":
        return [("residual", range(cfg.num_layers), clean, other), ("heads", [0], clean, other)]
    return [
        ("decoder/residual", range(cfg.num_layers), clean, {**clean, "tokens": other["tokens"]}),
        ("encoder/residual", range(cfg.encoder_layers), clean, {**clean, "source": other["source"]}),
    ]


@pytest.mark.parametrize("name", [pytest.param("gpt", marks=pytest.mark.slow), "llama_scan", "gemma_local", "encdec"])
def test_patching_every_position_from_the_clean_run_reproduces_it_exactly(name):
    model, params = model_and_params(name)
    for site, layers, clean, corrupt in _patch_cases(name):
        clean_logits = np.asarray(plain(model, params, clean))
        assert not np.allclose(clean_logits, np.asarray(plain(model, params, corrupt)), atol=1e-3)
        _, acts = jax.jit(lambda p, x: hooks.forward(model, p, x, capture=True))(params, clean)
        for layer in layers:
            out = np.asarray(patched_everywhere(model, params, corrupt, acts[site], site, layer))
            # the same program on the clean inputs: what patching must reproduce bit for bit (the
            # plain model is another program, whose fusions may round differently)
            same = np.asarray(patched_everywhere(model, params, clean, acts[site], site, layer))
            np.testing.assert_allclose(same, clean_logits, atol=2e-6, err_msg=f"{site} layer {layer}")
            if site.endswith("residual"):
                np.testing.assert_array_equal(out, same, err_msg=f"{site} layer {layer}")
            else:  # layer 0's heads restore its attention, not the corrupted tokens beside it
                assert not np.allclose(out, same, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logit_lens_at_the_last_layer_is_the_models_own_output(name):
    model, params = model_and_params(name)
    per_layer, final = interp.logit_lens(model, params, inputs_of(name))
    assert per_layer.shape == (CONFIGS[name].num_layers, SEQ, 64)
    own = np.asarray(jax.nn.log_softmax(plain(model, params, inputs_of(name))[0]))
    # another program than the model's (the unembedding over [L, t, e]): equal up to the rounding
    # of its fusions (exact for the GPT and Llama blocks; 1e-6 with Gemma's soft-caps)
    np.testing.assert_allclose(per_layer[-1], own, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(final, own)
    assert not np.allclose(per_layer[0], final, atol=1e-2)  # earlier layers decode to something else


@pytest.mark.parametrize(
    "name", [pytest.param("gpt", marks=pytest.mark.slow), "gemma_local", pytest.param("encdec", marks=pytest.mark.slow)]
)
def test_integrated_gradients_sum_to_the_output_difference(name):
    model, params = model_and_params(name)
    inputs, target = inputs_of(name), 5
    attr = interp.integrated_gradients(model, params, inputs, position=-1, target=target, steps=64)
    assert abs(attr.total) > 0.05, attr  # a difference worth attributing
    assert attr.gap < 0.01, (attr.tokens, attr.total)
    assert set(attr.tokens) == ({"embed", "source_embed"} if name == "encdec" else {"embed"})
    own = jax.nn.log_softmax(plain(model, params, inputs)[0, -1])[target]
    np.testing.assert_allclose(attr.score, own, rtol=1e-5)
    gxi = interp.integrated_gradients(model, params, inputs, position=-1, target=target, steps=0)
    assert gxi.tokens["embed"].shape == (SEQ,) and not np.allclose(gxi.tokens["embed"], attr.tokens["embed"])


def test_patching_scores_the_position_that_differs():
    """Clean and corrupted prompts differ at position 2: positions before it hold the same values in
    both runs (causal attention), so patching them changes nothing at any layer; position 2 itself
    changes the score until the last layer, whose patch at the scored position restores the clean
    score."""
    model, params = model_and_params("gpt")
    clean = inputs_of("gpt")
    corrupt = {"tokens": clean["tokens"].copy()}
    corrupt["tokens"][:, 2] = (corrupt["tokens"][:, 2] + 1) % 64
    grid = interp.patch(model, params, clean, corrupt, position=-1, target=5)
    assert grid.scores.shape == (3, SEQ) and grid.index == "position"
    np.testing.assert_allclose(grid.scores[:, :2], grid.base, atol=1e-6)
    assert np.all(np.abs(grid.scores[:-1, 2] - grid.base) > 1e-3)
    # after the last block a position reaches only its own output: only the scored one matters
    np.testing.assert_allclose(grid.scores[-1, :-1], grid.base, atol=1e-6)
    np.testing.assert_allclose(grid.scores[-1, -1], grid.reference, atol=1e-6)
    np.testing.assert_allclose(grid.recovered[-1, -1], 1.0, atol=1e-4)
    heads = interp.patch(model, params, clean, corrupt, position=-1, target=5, site="heads")
    assert heads.scores.shape == (3, 4) and heads.index == "head"


def test_head_ablation():
    model, params = model_and_params("llama_scan")
    inputs = inputs_of("llama_scan")
    zero = interp.ablate_heads(model, params, inputs, position=-1, target=5)
    mean = interp.ablate_heads(model, params, inputs, position=-1, target=5, mode="mean")
    assert zero.scores.shape == mean.scores.shape == (3, 4)
    assert np.all(zero.effect != 0) and not np.allclose(zero.scores, mean.scores)
    # by hand: zeroing head 1 of layer 2 is zeroing its slice of the out projection's input
    edit = hooks.patch_edit("heads", jnp.zeros((3, 1, SEQ, 4, 8)), 2, (jnp.arange(4) == 1)[:, None])
    logits = jax.jit(lambda p: hooks.forward(model, p, inputs, edit=edit)[0])(params)
    np.testing.assert_allclose(zero.scores[2, 1], jax.nn.log_softmax(logits[0, -1])[5], rtol=1e-6)


def test_bad_requests_name_the_fix():
    model, params = model_and_params("gpt")
    clean = inputs_of("gpt")
    short = {"tokens": clean["tokens"][:, :-1]}
    with pytest.raises(BadValue, match="same number of tokens"):
        interp.patch(model, params, clean, short, position=-1, target=5)
    with pytest.raises(BadValue, match=r"use one of \['attn', 'heads', 'mlp', 'residual'\]"):
        interp.patch(model, params, clean, clean, position=-1, target=5, site="resid")
    with pytest.raises(BadValue, match="'zero' or 'mean'"):
        interp.ablate_heads(model, params, clean, position=-1, target=5, mode="half")


def _all_instruments(model, params, inputs, corrupt):
    lens, _ = interp.logit_lens(model, params, inputs)
    attr = interp.integrated_gradients(model, params, inputs, position=-1, target=5, steps=16)
    grid = interp.patch(model, params, inputs, corrupt, position=-1, target=5)
    drop = interp.ablate_heads(model, params, inputs, position=-1, target=5)
    return lens, attr.tokens["embed"], grid.scores, drop.scores


@pytest.mark.parametrize("name", [pytest.param("gpt", marks=pytest.mark.slow), "llama_scan"])
def test_equal_on_one_device_and_on_a_data_x_tensor_mesh(name):
    model, params = model_and_params(name)
    ref = _all_instruments(model, params, inputs_of(name), inputs_of(name, seed=1))
    mesh = sharding.make_mesh(SimpleNamespace(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    rules = sharding.LOGICAL_RULES
    abstract = jax.eval_shape(lambda: family_lib.init_params(model, jax.random.key(1), SEQ))
    sharded = jax.device_put(params, sharding.boxed_shardings(abstract, mesh, rules))
    assert not sharded["embed"]["embedding"].sharding.is_fully_replicated  # really split over the mesh
    with sharding.use_mesh(mesh, rules):
        got = _all_instruments(model, sharded, inputs_of(name, batch=2), inputs_of(name, seed=1, batch=2))
    for what, a, b in zip(("lens", "attributions", "patching", "ablation"), got, ref):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=what)


def lowered_train_step(cfg: ModelConfig) -> str:
    """The trainer's train step (`state.make_steps`) for `cfg` on one device, lowered: its text.
    Imports nothing of llm_jax.tools (so a fresh process can run it without the instruments)."""
    from llm_jax.training import optim
    from llm_jax.training import state as state_lib
    from llm_jax.training.config import base_config

    mesh = sharding.make_mesh(SimpleNamespace(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rules, model, tx = sharding.LOGICAL_RULES, family_lib.build(cfg), optim.make_optimizer(base_config().optim)
    batch = {"inputs": np.zeros((2, SEQ), np.int32), "targets": np.zeros((2, SEQ), np.int32)}
    state, shardings = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), SEQ)
    train, _ = state_lib.make_steps(model, tx, mesh, rules, shardings, grad_accum_steps=1)
    with sharding.use_mesh(mesh, rules):
        return train.jitted.lower(state, batch, jax.random.key(1), {}).as_text()


_FRESH = """
import sys
from llm_jax.models.model import ModelConfig
sys.path.insert(0, {tests!r})
import test_interpret as t
assert 'llm_jax.tools.hooks' in sys.modules  # the test module imports it; nothing is installed by that
sys.stdout.write(t.lowered_train_step({cfg}))
"""


def test_training_step_program_is_unchanged():
    """The trainer's lowered step here, after every instrument ran in this process, is the text a
    fresh process lowers without ever running one; and the comparison can see a hook: lowered
    with one active, the text differs."""
    import os
    import subprocess
    import sys

    cfg = CONFIGS["llama_scan"]
    _all_instruments(*model_and_params("llama_scan"), inputs_of("llama_scan"), inputs_of("llama_scan", seed=1))
    after = lowered_train_step(cfg)
    code = _FRESH.format(tests=os.path.dirname(os.path.abspath(__file__)), cfg=repr(cfg))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout == after
    double = hooks._Hooks(edit=lambda site, layer, v: v * 2 if site == "residual" else v, capture=False)
    with nn.intercept_methods(double):
        assert lowered_train_step(cfg) != after


def test_hooks_are_off_outside_forward():
    model, params = model_and_params("gpt")
    calls = []
    hooks.forward(model, params, inputs_of("gpt"), edit=lambda s, layer, v: calls.append(s) or v)
    n = len(calls)
    assert n > 0
    plain(model, params, inputs_of("gpt", seed=3))
    model.apply({"params": params}, **inputs_of("gpt", seed=4))
    assert len(calls) == n


def test_unknown_family_is_refused():
    model = SimpleNamespace(cfg=dataclasses.replace(GPT, family="other"))
    with pytest.raises(BadValue, match="has no interpretability sites"):
        interp.unembed(model, {}, jnp.zeros((1, 32)))


def test_patch_summary_warns_when_the_corruption_changes_nothing():
    from llm_jax import interpret as command

    d = {"kind": "patch", "target": "e", "clean_score": -1.47}
    assert "noise" in command._summary({**d, "corrupt_score": -1.471})
    assert "noise" not in command._summary({**d, "corrupt_score": -2.42})

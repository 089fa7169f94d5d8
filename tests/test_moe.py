"""Mixture of experts: the router, both dispatches against a dense loop over experts, the auxiliary
losses by their formulas, and an MoE TransformerLM that trains, resumes to the bit and decodes."""

import dataclasses
import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import runlib as R

from llm_jax.inference import decode
from llm_jax.models import family as family_lib
from llm_jax.models import flops, moe
from llm_jax.models.model import ModelConfig, TransformerLM, count_params
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training import loop, summary
from llm_jax.training.saved_run import load_run

T, D, F, E, K = 13, 8, 6, 4, 2


def _experts(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (T, D), jnp.float32)
    w = [jax.random.normal(k, s, jnp.float32) * 0.3 for k, s in zip(ks[1:], [(E, D, F), (E, D, F), (E, F, D)])]
    return x, *w


def _dense_loop(x, weights, experts, wi_gate, wi_up, wo, kept=None):
    """Every expert on every token, in float64, weighted by the router where it was chosen (and kept)."""
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    kept = np.ones(experts.shape, bool) if kept is None else np.asarray(kept)
    out = np.zeros_like(x)
    for e in range(wi_gate.shape[0]):
        g, u = x @ np.asarray(wi_gate[e], np.float64), x @ np.asarray(wi_up[e], np.float64)
        y = (g / (1 + np.exp(-g)) * u) @ np.asarray(wo[e], np.float64)  # SwiGLU
        w = np.sum(np.where((np.asarray(experts) == e) & kept, weights, 0.0), axis=1)  # [T]
        out += w[:, None] * y
    return out


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route_picks_the_top_k_scores_and_normalises_them(score):
    logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]], jnp.float32)
    weights, experts, probs = moe.route(logits, 2, score, norm_topk=False)
    np.testing.assert_array_equal(experts, [[1, 2], [0, 3]])
    scores = jax.nn.softmax(logits) if score == "softmax" else jax.nn.sigmoid(logits)
    np.testing.assert_allclose(weights, np.take_along_axis(np.asarray(scores), np.asarray(experts), 1), rtol=1e-6)
    np.testing.assert_allclose(np.sum(probs, axis=1), 1.0, rtol=1e-6)
    normed, _, _ = moe.route(logits, 2, score, norm_topk=True)
    np.testing.assert_allclose(normed, weights / np.sum(weights, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "blocks"])
def test_dropless_equals_a_dense_loop_over_experts(dispatch):
    """Both dropless dispatches (ragged_dot; padded blocks of 4 rows, so groups span several blocks
    and end in padding) equal every expert applied to every token, weighted where chosen."""
    fn = moe.dropless if dispatch == "dropless" else functools.partial(moe.blocks, block=4)
    x, wi_gate, wi_up, wo = _experts()
    logits = jax.random.normal(jax.random.key(9), (T, E))
    weights, experts, _ = moe.route(logits, K, "softmax", True)
    got = jax.jit(fn, static_argnums=6)(x, weights, experts, wi_gate, wi_up, wo, "swiglu")
    np.testing.assert_allclose(got, _dense_loop(x, weights, experts, wi_gate, wi_up, wo), atol=1e-6, rtol=1e-6)
    # An expert that no token chose (group size 0) and one that takes everything.
    lopsided = jnp.zeros((T, K), jnp.int32).at[:, 1].set(3)
    got = fn(x, weights, lopsided, wi_gate, wi_up, wo, "swiglu")
    np.testing.assert_allclose(got, _dense_loop(x, weights, lopsided, wi_gate, wi_up, wo), atol=1e-6, rtol=1e-6)


def test_blocks_gradients_equal_dropless():
    """`blocks` moves rows with its own gradient (a gather back, no scatter): the same gradients."""
    x, wi_gate, wi_up, wo = _experts(3)
    weights, experts, _ = moe.route(jax.random.normal(jax.random.key(4), (T, E)), K, "softmax", True)

    def grads(fn):
        loss = lambda *a: jnp.sum(jnp.sin(fn(a[0], a[1], experts, *a[2:], "swiglu")))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, wi_gate, wi_up, wo)

    want = grads(moe.dropless)
    for got, ref in zip(grads(functools.partial(moe.blocks, block=4)), want):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_capacity_drops_exactly_the_overflow_copies_in_token_order():
    x, wi_gate, wi_up, wo = _experts(1)
    weights = jax.random.uniform(jax.random.key(2), (T, K))
    # Expert 0 is everyone's first choice: with C = ceil(0.5 * 13 * 2 / 4) = 4 only tokens 0-3 keep it.
    experts = jnp.stack([jnp.zeros(T, jnp.int32), 1 + jnp.arange(T, dtype=jnp.int32) % 3], axis=1)
    assert moe.capacity_of(T, K, E, 0.5) == 4
    got, kept = moe.capacity(x, weights, experts, wi_gate, wi_up, wo, "swiglu", 0.5)
    want_kept, used = np.zeros((T, K), bool), np.zeros(E, int)
    for t in range(T):  # copies claim slots in (token, slot) order
        for j in range(K):
            e = int(experts[t, j])
            want_kept[t, j] = used[e] < 4
            used[e] += 1
    np.testing.assert_array_equal(kept, want_kept)
    assert not want_kept.all() and want_kept[:4, 0].all() and not want_kept[4:, 0].any()
    np.testing.assert_allclose(got, _dense_loop(x, weights, experts, wi_gate, wi_up, wo, want_kept), atol=1e-6)
    # With room for everything, capacity equals dropless.
    roomy, kept = moe.capacity(x, weights, experts, wi_gate, wi_up, wo, "swiglu", float(E))
    assert np.asarray(kept).all()
    np.testing.assert_allclose(roomy, moe.dropless(x, weights, experts, wi_gate, wi_up, wo, "swiglu"), atol=1e-6)


def test_aux_losses_match_their_formulas_on_a_hand_made_routing():
    probs = jnp.asarray([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]], jnp.float32)
    experts = jnp.asarray([[0, 1], [0, 1], [3, 2]], jnp.int32)
    logits = jnp.log(probs) + 1.5  # logsumexp = 1.5 in every row
    got = moe.aux_losses(probs, experts, logits)
    f = np.asarray([2, 2, 1, 1]) / 6  # copies per expert / (T * k)
    p = np.asarray([1.2, 0.7, 0.5, 0.6]) / 3  # mean router probability
    np.testing.assert_allclose(got["load"], f, rtol=1e-6)
    np.testing.assert_allclose(got["aux_loss"], 4 * np.sum(f * p), rtol=1e-6)
    np.testing.assert_allclose(got["router_z_loss"], 1.5**2, rtol=1e-5)
    # Balanced routing with uniform probabilities: 1.
    uniform = moe.aux_losses(jnp.full((4, 4), 0.25), jnp.asarray([[0, 1], [2, 3], [0, 1], [2, 3]]), jnp.zeros((4, 4)))
    np.testing.assert_allclose(uniform["aux_loss"], 1.0, rtol=1e-6)


MOE = ModelConfig(
    vocab_size=64, num_layers=3, num_heads=2, embed_dim=16, mlp_dim=24, max_len=32, positions="rope", norm="rmsnorm",
    mlp_activation="swiglu", use_bias=False, num_experts=4, experts_per_token=2, expert_mlp_dim=12, moe_first_dense=1,
    num_shared_experts=1, shared_expert_dim=8,
)  # fmt: skip


def test_moe_layers_parameters_and_placement():
    assert [MOE.is_moe(i) for i in range(3)] == [False, True, True]
    every_other = dataclasses.replace(MOE, num_layers=6, moe_every=2, moe_first_dense=1)
    assert [every_other.is_moe(i) for i in range(6)] == [False, True, False, True, False, True]
    params = nn.meta.unbox(TransformerLM(MOE).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert "router" not in params["layers_0"]["mlp"]
    mlp = params["layers_1"]["mlp"]
    shapes = {k: mlp[k].shape for k in ("wi_gate", "wi_up", "wo")}
    assert shapes == {"wi_gate": (4, 16, 12), "wi_up": (4, 16, 12), "wo": (4, 12, 16)}
    assert mlp["router"]["kernel"].shape == (16, 4) and mlp["shared"]["wi_0"]["kernel"].shape == (16, 8)


def test_flops_and_the_summary_count_active_parameters():
    """Per layer: attention 16 * (2 + 2 * 2) * 8 + 2 * 8 * 16; the dense MLP 3 * 16 * 24; an MoE MLP
    the router 16 * 4, k = 2 experts of 3 * 16 * 12 and the shared 3 * 16 * 8; the tied head 16 * 64."""
    model = family_lib.build(MOE)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    matmul = 3 * (16 * 6 * 8 + 2 * 8 * 16) + 3 * 16 * 24 + 2 * (16 * 4 + 2 * 3 * 16 * 12 + 3 * 16 * 8) + 16 * 64
    assert family_lib.flops_per_token(MOE, 32) == 6 * matmul + 6 * 32 * 2 * 8 * 3
    inactive = 2 * (4 - 2) * 3 * 16 * 12  # two MoE layers, two experts idle per token
    assert flops.inactive_params(MOE) == inactive
    assert matmul == count_params(params) - inactive - 7 * 16  # less the 7 norm scales
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    d = summary.summary_dict(model, None, mesh, sharding.logical_rules(), seq_len=32)
    assert d["params"] == count_params(params) and d["active_params"] == d["params"] - inactive
    text = summary.summarize(model, None, mesh, sharding.logical_rules(), seq_len=32)
    assert "experts: 4 x 12 wide + 1 shared (8 wide) in layers 1, 2 (2 of 3), top-2 softmax" in text
    assert f"{d['active_params']:,} active per token" in text and "-> expert,fsdp,tensor" in text


def test_the_dispatches_compute_the_same_model():
    """A runtime choice: the same params give the same logits with every dispatch (capacity with
    room for every copy)."""
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 64)
    params = nn.meta.unbox(TransformerLM(MOE).init(jax.random.key(0), tokens))["params"]
    want = TransformerLM(MOE).apply({"params": params}, tokens)
    for fields in ({"moe_dispatch": "blocks"}, {"moe_dispatch": "capacity", "capacity_factor": 2.0}):
        got = TransformerLM(dataclasses.replace(MOE, **fields)).apply({"params": params}, tokens)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scanned_and_rematerialized_layers_sow_the_same_auxiliary_losses():
    """Under scan_layers (+ remat) the MoE stats stack on the layer axis: the same objective and metrics."""
    cfg = dataclasses.replace(MOE, moe_first_dense=0)
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 64)
    batch = {"inputs": tokens, "targets": tokens}
    params = nn.meta.unbox(TransformerLM(cfg).init(jax.random.key(0), tokens))["params"]
    family = family_lib.get("lm")
    want, (_, _, want_metrics) = family.train_loss(TransformerLM(cfg), params, batch, None)
    layers = [params.pop(f"layers_{i}") for i in range(3)]
    stacked = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    scanned = TransformerLM(dataclasses.replace(cfg, scan_layers=True, remat="full"))
    got, (_, _, metrics) = family.train_loss(scanned, stacked, batch, None)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key in ("aux_loss", "router_z_loss", "expert_load"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"experts_per_token": 5}, "experts_per_token=5"),
        ({"mlp_activation": "gelu"}, "mlp_activation='swiglu'"),
        ({"router_score": "relu"}, "router_score='relu'"),
        ({"moe_dispatch": "sorted"}, "moe_dispatch='sorted'"),
        ({"scan_layers": True}, "scan_layers needs every layer MoE"),
    ],
)
def test_bad_moe_options_are_one_line_errors(fields, message):
    with pytest.raises(BadValue, match=message) as e:
        dataclasses.replace(MOE, **fields)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_decoding_with_the_cache_equals_the_full_forward(scan):
    cfg = dataclasses.replace(MOE, moe_first_dense=0, scan_layers=scan)
    model = TransformerLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))["params"]
    prompt = np.asarray([[5, 9, 13, 2, 7, 1]], np.int32)
    tokens, start = decode.left_pad(prompt.tolist())
    got = np.asarray(decode.generate(model, params, tokens, start, jax.random.key(0), max_new_tokens=12).tokens)
    forward = jax.jit(lambda t: model.apply({"params": params}, t)[:, -1].argmax(-1))
    seq = prompt
    for _ in range(12):
        seq = np.concatenate([seq, np.asarray(forward(seq))[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq[:, prompt.shape[1] :])


def _moe_run_config(corpus, steps, **model):
    moe_model = {
        "model.num_experts": 4, "model.experts_per_token": 2, "model.expert_mlp_dim": 32, "model.norm": "rmsnorm",
        "model.mlp_activation": "swiglu", **{f"model.{k}": v for k, v in model.items()},
    }  # fmt: skip
    over = R.tiny_overrides(corpus, steps, 2, **moe_model, **{"optim.lr": 1e-2, "optim.decay_steps": 6})
    return R.tiny_config(over)


def test_moe_model_trains_logs_its_router_and_resumes_bit_exactly(tmp_path):
    """3 steps, then the same run raised to 6 (resumed from step 3's checkpoint) against 6 straight
    steps: the loss falls, the auxiliary losses and the expert load are logged, and the resumed
    run's metrics and final parameters are the straight run's to the bit."""
    corpus = R.write_corpus(str(tmp_path / "code.txt"))
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    loop.train_and_evaluate(_moe_run_config(corpus, 3), resumed)
    loop.train_and_evaluate(_moe_run_config(corpus, 6), resumed)
    loop.train_and_evaluate(_moe_run_config(corpus, 6), straight)
    losses = R.losses_list(straight)
    assert R.losses_list(resumed)[-3:] == losses[-3:] and losses[-1][1] < losses[0][1]
    load = R.metric(straight, "train/expert_load")
    assert len(load) == 6 and len(load[-1][1]) == 4 and abs(sum(load[-1][1]) - 1) < 1e-5
    assert R.metric(resumed, "train/expert_load")[-1] == load[-1]
    aux = R.metric(straight, "train/aux_loss")[-1][1]
    assert 1.0 <= aux < 4.0 and R.metric(straight, "train/router_z_loss")[-1][1] > 0

    if importlib.util.find_spec("matplotlib"):  # the notebook extra: the load and router panels
        from llm_jax.tools import plot

        axes = {ax.get_title(): ax for ax in plot.figure([straight, resumed]).axes if ax.get_visible()}
        assert len(axes["expert load (one line per expert; dotted: balanced)"].get_lines()) == 2 * (4 + 1)
        assert {line.get_label() for line in axes["router losses"].get_lines()} == {
            f"{run} ({kind})" for run in ("straight", "resumed") for kind in ("aux_loss", "router_z_loss")
        }
        assert len(axes["loss against wall time"].get_lines()) == 4  # train and eval, two runs
    a, b = load_run(resumed, on_host=True), load_run(straight, on_host=True)
    assert a.step == b.step == 6
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

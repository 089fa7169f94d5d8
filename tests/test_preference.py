"""Preference tuning: the DPO and SimPO losses against their formulas, the reference policy (the
base with the adapters off), the preference JSONL data (pairs kept together, weights on the
responses only, bad lines refused) and a tiny LoRA DPO run that learns its pairs."""

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llm_jax.data import chat as chat_lib
from llm_jax.data import preference as pref_data
from llm_jax.data import tokenizer as tok_lib
from llm_jax.models import family as family_lib
from llm_jax.models import lora
from llm_jax.models import preference as pref
from llm_jax.models.model import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training import config as config_lib
from llm_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=2, embed_dim=32, mlp_dim=64, num_heads=2, max_len=64, vocab_size=257, positions="learned")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------------------
# The losses


def test_dpo_loss_matches_its_formula():
    pi_c, pi_r = np.array([-5.0, -9.0, -3.0]), np.array([-7.0, -4.0, -3.5])
    ref_c, ref_r = np.array([-6.0, -8.0, -3.0]), np.array([-6.5, -5.0, -2.0])
    for beta in (0.1, 0.5):
        losses, rc, rr = pref.dpo_loss(*map(jnp.asarray, (pi_c, pi_r, ref_c, ref_r)), beta)
        h = (pi_c - ref_c) - (pi_r - ref_r)  # [1.5, -2, 1.5]
        np.testing.assert_allclose(losses, -np.log(_sigmoid(beta * h)), rtol=1e-6)
        np.testing.assert_allclose(rc, beta * (pi_c - ref_c), rtol=1e-6)
        np.testing.assert_allclose(rr, beta * (pi_r - ref_r), rtol=1e-6)
        # The sign: a pair the policy prefers more than the reference does costs less than log 2.
        assert losses[0] < np.log(2) < losses[1]
    # Swapping chosen and rejected is the opposite preference: sigmoid(-x) = 1 - sigmoid(x).
    args = tuple(map(jnp.asarray, (pi_c, pi_r, ref_c, ref_r)))
    losses = pref.dpo_loss(*args, 0.1)[0]
    swapped = pref.dpo_loss(args[1], args[0], args[3], args[2], 0.1)[0]
    np.testing.assert_allclose(np.exp(-swapped) + np.exp(-losses), 1.0, rtol=1e-6)
    metrics = pref.pair_metrics(*pref.dpo_loss(*map(jnp.asarray, (pi_c, pi_r, ref_c, ref_r)), 0.1)[1:])
    np.testing.assert_allclose(metrics["rewards/margin"], 0.1 * np.mean([1.5, -2.0, 1.5]), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracy"], 2 / 3, rtol=1e-6)


def test_simpo_loss_matches_its_formula():
    pi_c, pi_r = np.array([-4.0, -12.0]), np.array([-9.0, -6.0])
    len_c, len_r = np.array([2.0, 4.0]), np.array([3.0, 1.0])
    beta, gamma = 2.0, 0.5
    losses, rc, rr = pref.simpo_loss(*map(jnp.asarray, (pi_c, pi_r, len_c, len_r)), beta, gamma)
    want_c, want_r = beta * pi_c / len_c, beta * pi_r / len_r  # [-4, -6], [-6, -12]: lengths matter
    np.testing.assert_allclose(rc, want_c, rtol=1e-6)
    np.testing.assert_allclose(rr, want_r, rtol=1e-6)
    np.testing.assert_allclose(losses, -np.log(_sigmoid(want_c - want_r - gamma)), rtol=1e-6)
    # Summed, the second pair's chosen would look worse (-12 < -6); per token it is better.
    assert pref.pair_metrics(rc, rr)["rewards/accuracy"] == 1.0


def _lora_model(rank=2, **kw):
    cfg = ModelConfig(**TINY, lora_rank=rank, lora_alpha=4.0, **kw)
    model = family_lib.build(cfg)
    return model, nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 16))


def test_reference_is_the_base_exactly():
    model, params = _lora_model()
    # Adapters that change the function (B is zero at init): the reference must not see them.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 if p[-1].key == "lora_b" else x, params
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 257)
    base_model = family_lib.build(dataclasses.replace(model.cfg, lora_rank=0))
    base = lora.split(params)[1]
    want = jax.jit(base_model.apply)({"params": base}, tokens)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(np.asarray(apply({"params": pref.reference_params(params)}, tokens)), want)
    assert not np.allclose(apply({"params": params}, tokens), want)  # the policy itself differs


def test_token_logps_are_the_weighted_cross_entropy():
    """Row sums of token_logps are minus the family's loss, plain and chunked."""
    model, params = _lora_model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, (4, 17)).astype(np.int32)
    weights = (rng.random((4, 16)) > 0.3).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
    total, _ = jax.jit(lambda p, b: family_lib.of(model).loss_sum(model, p, b, None, False))(params, batch)
    logps = jax.jit(lambda p, b: pref.token_logps(model, p, b))(params, batch)
    sums, counts = pref.row_logps(logps, batch["weights"])
    np.testing.assert_allclose(-sums.sum(), total, rtol=1e-5)
    np.testing.assert_allclose(counts, weights.sum(-1))
    # The objectives read rows 2i / 2i + 1 as a pair; DPO's reference is the model without adapters.
    pi_c, pi_r = pref.as_pairs(sums)
    len_c, len_r = pref.as_pairs(counts)
    simpo = jax.jit(lambda p, b: pref.Objective("simpo", 2.0, 0.5).pair_losses(model, p, b))(params, batch)
    for got, want in zip(simpo, pref.simpo_loss(pi_c, pi_r, len_c, len_r, 2.0, 0.5)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    adapted = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.3 if p[-1].key == "lora_b" else x, params)
    ref = pref.as_pairs(pref.row_logps(logps, batch["weights"])[0])  # lora_b is zero in `params`: the base
    pi = pref.as_pairs(pref.row_logps(jax.jit(lambda p, b: pref.token_logps(model, p, b))(adapted, batch), weights)[0])
    dpo = jax.jit(lambda p, b: pref.Objective("dpo", 0.1).pair_losses(model, p, b))(adapted, batch)
    for got, want in zip(dpo, pref.dpo_loss(*pi, *ref, 0.1)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # sums of ~60 log-probs in float32
    chunked = family_lib.build(dataclasses.replace(model.cfg, loss_chunk=4))
    got = jax.jit(lambda p, b: pref.token_logps(chunked, p, b))(params, batch)
    np.testing.assert_allclose(got, logps, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The data


def _data_cfg(path, **kw):
    base = dict(source="preference", path=str(path), val_path="", val_fraction=0.25, tokenizer="byte",
                vocab_size=0, tokenizer_path="", seq_len=32)  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


SUMS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in
        [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3), (4, 4), (2, 5), (1, 1)]]  # fmt: skip


def test_pairs_stay_together_and_learn_responses_only(tmp_path):
    data = pref_data.load_preference_data(_data_cfg(_write(tmp_path / "p.jsonl", SUMS)), log=lambda *a: None)
    data.check(32)
    tok = data.tokenizer
    batch = data.train_batch(3, 8, 32, seed=0)
    assert batch["inputs"].shape == (8, 32)
    for i in range(0, 8, 2):  # rows 2i, 2i+1: one prompt, the chosen then the rejected response
        c, r = (batch["inputs"][j] for j in (i, i + 1))
        wc, wr = (batch["weights"][j] for j in (i, i + 1))
        prompt = tok.decode(c[: np.argmax(wc > 0) + 1].tolist())
        line = next(x for x in SUMS if x["prompt"] == prompt)
        assert tok.decode(r[: np.argmax(wr > 0) + 1].tolist()) == prompt
        # Weights: exactly the response and its EOS (as targets).
        for row, w, text in ((i, wc, line["chosen"]), (i + 1, wr, line["rejected"])):
            learned = batch["targets"][row][w > 0]
            assert learned.tolist() == tok.encode(text) + [tok.eos_id]
    # A pure function of (seed, step); each process's rows are whole pairs of the global batch.
    again = data.train_batch(3, 8, 32, seed=0)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    halves = [data.train_batch(3, 8, 32, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    assert np.array_equal(np.concatenate([h["inputs"] for h in halves]), batch["inputs"])
    evals = data.eval_batches(2, 4, 32, seed=0)
    assert len(evals) == 2 and evals[0]["inputs"].shape == (4, 32)


def test_chat_pairs_learn_the_final_replies_only(tmp_path):
    pytest.importorskip("transformers", reason="the chat tokenizer fixture needs the 'hf' extra")
    from test_chat import ours, write_tokenizer

    write_tokenizer(tmp_path / "tok", "qwen")
    tok = ours(tmp_path / "tok", "qwen")
    talk = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "The capital of France?"}]  # fmt: skip
    lines = [
        {"chosen": talk + [{"role": "assistant", "content": "Paris."}],
         "rejected": talk + [{"role": "assistant", "content": "I am fine."}]},
        {"prompt": talk, "chosen": "Paris.", "rejected": {"role": "assistant", "content": "I am fine."}},
    ]  # fmt: skip
    pairs = pref_data.read_pairs(str(_write(tmp_path / "chat.jsonl", lines)))
    chat = chat_lib.chat_for(tok)
    text = lambda ids: tok.tok.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    for pair in pairs:
        ids_c, learn_c, ids_r, learn_r = pref_data.encode_pair(tok, chat, pair)
        # The shared assistant turn ("Hello.") is prompt; each row learns its last reply and <|im_end|>.
        # (Qwen's template writes an empty <think> block into the last assistant turn: part of the reply.)
        assert text(ids_c[learn_c]).endswith("\n\nParis.<|im_end|>")
        assert text(ids_r[learn_r]).endswith("\n\nI am fine.<|im_end|>")
        assert "Hello." in text(ids_c[~learn_c]) and "Hello." not in text(ids_c[learn_c])
    assert np.array_equal(pref_data.encode_pair(tok, chat, pairs[0])[0], pref_data.encode_pair(tok, chat, pairs[1])[0])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "chosen": "b"}', r"bad.jsonl:2: missing field 'rejected'"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}', r"bad.jsonl:2: field 'rejected' must be a string"),
        ('{"chosen": "b", "rejected": "c"}', r"bad.jsonl:2: without a 'prompt', 'chosen' and 'rejected' must be"),
        ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "x"}', r"bad.jsonl:2: .* same"),
        ('{"prompt": [{"role": "robot", "content": "q"}], "chosen": "x", "rejected": "y"}', r"bad.jsonl:2: prompt"),
        ('[1, 2]', r"bad.jsonl:2: expected a JSON object"),
        ('{"prompt": "a", ', r"bad.jsonl:2: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SUMS[0]) + "\n" + line + "\n")
    with pytest.raises(BadValue, match=message):
        pref_data.read_pairs(str(path))


def test_long_pairs_are_truncated_or_dropped_and_counted(tmp_path):
    lines = SUMS[:4] + [{"prompt": "x" * 10, "chosen": "y" * 40, "rejected": "n"},
                        {"prompt": "p" * 40, "chosen": "y", "rejected": "n"}]  # fmt: skip
    logged, val = [], _write(tmp_path / "val.jsonl", SUMS)
    data = pref_data.load_preference_data(_data_cfg(_write(tmp_path / "p.jsonl", lines), val_path=str(val)),
                                          log=logged.append)  # fmt: skip
    data.check(24)
    tokens, mask, truncated, dropped = data.rows("train", 24)
    assert (truncated, dropped, len(tokens)) == (2, 1, 2 * 5)  # the long prompt's pair kept no response token
    assert any("2 of 6 training pairs are longer" in m and "1 pairs dropped" in m for m in logged)
    # The truncated pair keeps its start: the prompt, and as much of the chosen response as fits.
    assert mask[8].sum() == 25 - 10 and mask[9].sum() == 2


# ----------------------------------------------------------------------------------------------
# Config checks and a tiny LoRA DPO run


def _default_tiny():
    spec = importlib.util.spec_from_file_location("cfg_default", os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def _dpo_config(path, **train):
    c = _default_tiny()
    c.data.update(source="preference", path=str(path), max_chars=0, seq_len=16)
    c.lora.update(rank=4, alpha=8.0, base="unused-here", targets="query,key,value,out,wi,wo")
    c.optim.update(lr=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.0)
    c.train.update(objective="dpo", batch_size=8, num_steps=40, **train)
    return c


def test_objective_errors_are_one_line(tmp_path):
    c = _dpo_config(tmp_path / "p.jsonl")
    config_lib.check_values(c)
    for change, message in [
        (dict(lora=dict(rank=0, base="")), r"objective='dpo' needs a LoRA run .* objective='simpo' needs no"),
        (dict(train=dict(objective="ppo")), r"config.train.objective='ppo' must be one of"),
        (dict(train=dict(objective="lm")), r"objective='lm' with config.data.source='preference'"),
        (dict(pref=dict(gamma=0.3)), r"config.pref.gamma=0.3 is SimPO's margin"),
        (dict(pref=dict(beta=-1.0)), r"config.pref.beta=-1.0 must be >= 0"),
    ]:
        bad = ml_collections.ConfigDict(c.to_dict())
        for section, values in change.items():
            bad[section].update(values)
        with pytest.raises(BadValue, match=message):
            config_lib.check_values(bad)
    with pytest.raises(BadValue, match=r"config.train.batch_size=8 must be a multiple of 16"):
        state_lib.build(_dpo_config(tmp_path / "p.jsonl", grad_accum_steps=8), 257, jax.devices()[:1])
    assert config_lib.finalize(c).pref.beta == 0.1
    simpo = ml_collections.ConfigDict(c.to_dict())  # SimPO needs no reference: full fine-tuning is allowed
    simpo.train.objective, simpo.lora.rank, simpo.lora.base = "simpo", 0, ""
    config_lib.check_values(simpo)
    assert config_lib.finalize(simpo).pref.beta == 2.0


def test_tiny_lora_dpo_run_learns_its_pairs(tmp_path):
    """LoRA DPO steps on eight pairs (over a random base) raise their margin and preference accuracy;
    gradient accumulation keeps each pair in one micro-batch (the same loss and gradient)."""
    path = _write(tmp_path / "p.jsonl", SUMS)
    data = pref_data.load_preference_data(_data_cfg(path, val_path=str(path), seq_len=16), log=lambda *a: None)
    assert isinstance(data.tokenizer, tok_lib.ByteTokenizer)
    devices = jax.devices()[:2]  # a pair's rows may sit on two devices
    b = state_lib.build(_dpo_config(path), data.tokenizer.vocab_size, devices)
    state, frozen = b.create_state(jax.random.key(0)), b.create_frozen(jax.random.key(1))
    all_pairs = sharding.host_to_global(data.eval_batches(1, 16, 16, 0)[0], b.mesh)

    def measured(state):
        m = jax.device_get(b.p_eval(lora.combine(frozen, state.params), all_pairs))
        return {k: float(v) / float(m["count"]) for k, v in m.items() if k != "count"}

    before = measured(state)
    assert before["rewards/margin"] == 0.0 and before["loss_sum"] == pytest.approx(np.log(2))  # policy = reference
    accum = state_lib.build(_dpo_config(path, grad_accum_steps=2), data.tokenizer.vocab_size, devices)
    rng = jax.random.key(2)
    for step in range(40):
        batch = sharding.host_to_global(data.train_batch(step, 8, 16, 0), b.mesh)
        if step == 0:  # the same update whether the batch is split in two micro-batches or not
            _, whole = b.p_train(jax.tree.map(jnp.copy, state), batch, rng, frozen)
            _, split = accum.p_train(jax.tree.map(jnp.copy, state), batch, rng, frozen)
            np.testing.assert_allclose(split["loss"], whole["loss"], rtol=1e-6)
            np.testing.assert_allclose(split["grad_norm"], whole["grad_norm"], rtol=1e-4)
        state, metrics = b.p_train(state, batch, rng, frozen)
    after = measured(state)
    print("tiny LoRA DPO on 8 pairs, before -> after 40 steps:", before, after)
    # Measured: accuracy 0 -> 1.0 (a tie is no win), margin 0 -> 0.128, loss 0.693 -> 0.632.
    assert after["rewards/accuracy"] == 1.0 and after["rewards/margin"] > 0.08
    assert after["loss_sum"] < before["loss_sum"] - 0.03


def test_plot_draws_the_preference_panels(tmp_path):
    pytest.importorskip("matplotlib", reason="the pictures need the notebook extra")
    from llm_jax.tools import plot

    records = [{"step": s, "train/loss": 0.7 - s / 100, "train/rewards/margin": s / 10, "train/rewards/accuracy": s / 4,
                "train/rewards/chosen": s / 20, "train/rewards/rejected": -s / 20} for s in (1, 2, 3)]  # fmt: skip
    records.append({"step": 3, "eval/loss": 0.66, "eval/rewards/margin": 0.2, "eval/rewards/accuracy": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    axes = {ax.get_title(): ax for ax in plot.figure([str(tmp_path)]).axes if ax.get_visible()}
    margin, accuracy = axes["reward margin (chosen - rejected)"], axes["preference accuracy"]
    assert [len(line.get_xdata()) for line in margin.get_lines()] == [3, 1]  # training, then validation
    assert list(accuracy.get_lines()[0].get_ydata()) == [0.25, 0.5, 0.75] and "rewards" in axes

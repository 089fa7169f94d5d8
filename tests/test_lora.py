"""LoRA: adapters that start as the base model, train alone, merge back, and a run that keeps
only them (its base named and read from the base's own run directory)."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runlib as R

from llm_jax.models import family, lora
from llm_jax.models.config import ModelConfig
from llm_jax.runtime.errors import UserError
from llm_jax.training import loop, saved_run
from llm_jax.training import state as state_lib

LLAMA = dict(
    vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32,
    positions="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False, tie_embeddings=False,
)  # fmt: skip


def params_of(cfg: ModelConfig, seed: int) -> dict:
    return nn.meta.unbox(family.init_params(family.build(cfg), jax.random.key(seed), 16))


def logits(cfg: ModelConfig, params, tokens, jit: bool = True):
    """The model's logits; `jit=False` runs op by op, where each layer computes exactly what it is
    given (one compiled program may fuse two models' identical layers differently, to the last bit)."""
    model = family.build(cfg)
    fn = (lambda p, t: model.apply({"params": p}, t, t)) if cfg.family == "encdec" else (
        lambda p, t: model.apply({"params": p}, t))  # fmt: skip
    return (jax.jit(fn) if jit else fn)(params, tokens)


def random_b(adapters: dict, seed: int = 3) -> dict:
    """The adapters with B drawn at random (a fresh adapter has B = 0)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, adapters
    )


@pytest.mark.parametrize(
    "over",
    [dict(LLAMA), dict(LLAMA, scan_layers=True), dict(vocab_size=128, num_layers=2, embed_dim=32, num_heads=2,
                                                      mlp_dim=64, max_len=32, family="encdec")],
    ids=["llama", "llama-scan", "encdec"],
)  # fmt: skip
def test_zero_b_is_the_base_exactly_and_merge_gives_the_adapted_logits(over):
    cfg = ModelConfig(**over)
    lcfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_targets="query,value,wo,wi_1")
    base = params_of(cfg, 0)
    adapters, rest = lora.split(params_of(lcfg, 1))
    assert rest.keys() == base.keys() and adapters  # the LoRA model's base tree is the base model's
    names = lora.adapter_names(adapters)
    assert {n.rsplit("/", 1)[-1] for n in names} >= {"query", "value"}, names
    assert not any(n.endswith(("key", "out")) for n in names), names  # only the targets
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 128)
    np.testing.assert_array_equal(
        logits(lcfg, lora.combine(base, adapters), tokens, jit=False), logits(cfg, base, tokens, jit=False)
    )
    y_base = logits(cfg, base, tokens)

    adapted = lora.combine(base, random_b(adapters))
    y_lora = logits(lcfg, adapted, tokens)
    assert float(jnp.max(jnp.abs(y_lora - y_base))) > 1e-2  # the adapters do something
    merged = lora.merge(adapted, lcfg.lora_alpha, lcfg.lora_rank)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(logits(cfg, merged, tokens), y_lora, atol=1e-5, rtol=0)


def test_targets_by_regex_over_the_parameter_path():
    cfg = ModelConfig(**LLAMA, lora_rank=2, lora_targets=r"layers_1/mlp/wi_\d")
    names = lora.adapter_names(lora.split(params_of(cfg, 0))[0])
    assert names == ["layers_1/mlp/wi_0", "layers_1/mlp/wi_1"]


def test_one_step_changes_only_the_adapters_and_keeps_no_state_for_the_base(tmp_path):
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    c = R.tiny_config(R.tiny_overrides(corpus, 2, 2))
    c.model.update(LLAMA)
    c.model.vocab_size = None
    c.lora.update(rank=4, base=str(tmp_path / "unused"), targets="query,value")
    b = state_lib.build(c, 256)
    state = b.create_state(jax.random.key(0))
    frozen = b.create_frozen(jax.random.key(1))
    adapters_before = jax.device_get(state.params)
    frozen_before = jax.device_get(frozen)
    n_adapter = lora.count(adapters_before)
    assert set(lora.adapter_names(adapters_before)) == {
        f"layers_{i}/attn/{n}" for i in (0, 1) for n in ("query", "value")
    }
    # AdamW's two moments of the adapters and nothing of the base.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) - 2 == 2 * n_adapter
    batch = {k: jnp.zeros(v.shape, v.dtype) + 5 for k, v in b.batch.items()}
    new = state
    for _ in range(3):  # the warmup's lr is 0 at step 0; A's gradient is 0 while B is
        new, metrics = b.p_train(new, batch, jax.random.key(2), frozen)
        assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(new.params)
    for path, x in jax.tree_util.tree_leaves_with_path(after):
        old = dict(jax.tree_util.tree_leaves_with_path(adapters_before))[path]
        assert not np.array_equal(x, old), path  # A and B both move (B from 0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)


def _lora_overrides(corpus, base, steps, every, **extra):
    return R.tiny_overrides(
        corpus, steps, every, **{"lora.rank": 4, "lora.base": base, "lora.targets": "query,value,wo"}, **extra
    )


def test_a_lora_run_saves_adapters_only_names_its_base_and_resumes_bit_exactly(tmp_path):
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    base = str(tmp_path / "base")
    loop.train_and_evaluate(R.tiny_config(R.tiny_overrides(corpus, 2, 2)), base)

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(R.tiny_config(_lora_overrides(corpus, base, 4, 2)), straight)
    loop.train_and_evaluate(R.tiny_config(_lora_overrides(corpus, base, 2, 2)), resumed)
    loop.train_and_evaluate(R.tiny_config(_lora_overrides(corpus, base, 4, 2)), resumed)

    saved = R.read_state(straight, 4)
    names = {k for k in saved if "params" in k}
    assert names and all("lora_a" in k or "lora_b" in k for k in names), sorted(names)[:5]
    assert R.read_loop_data(straight, 4)["lora_base_step"] == 2
    R.assert_bitwise_equal(R.read_state(resumed, 4), saved)

    run = saved_run.load_run(straight)  # the adapters on the base they were trained on
    assert run.model.cfg.lora_rank == 4
    base_run = saved_run.load_run(base)
    _, run_base = lora.split(run.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run_base), jax.device_get(base_run.params))


def test_qlora_trains_on_an_int8_base(tmp_path):
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    base = str(tmp_path / "base")
    loop.train_and_evaluate(R.tiny_config(R.tiny_overrides(corpus, 2, 2)), base)
    run = str(tmp_path / "qlora")
    loop.train_and_evaluate(R.tiny_config(_lora_overrides(corpus, base, 3, 3, **{"lora.base_dtype": "int8"})), run)
    losses = R.losses_list(run)
    assert len(losses) == 3 and all(np.isfinite(v) for _, v in losses)
    loaded = saved_run.load_run(run)
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(loaded.params) if p[-1].key == "kernel"]
    assert kernels and all(k.dtype == jnp.int8 for k in kernels)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"lora.rank": 4}, r"config.lora.rank=4 needs the frozen base: set config.lora.base"),
        ({"lora.base": "BASE"}, r"config.lora.base='.*' is set but config.lora.rank=0"),
        ({"lora.rank": 4, "lora.base": "BASE", "lora.base_dtype": "fp8"}, r"lora.base_dtype='fp8' must be one of"),
        ({"lora.rank": 4, "lora.base": "NOWHERE"}, r"config.lora.base='.*nowhere' is not a run directory"),
        ({"lora.rank": 4, "lora.base": "BASE", "model.num_layers": 3},
         r"is another model than this run's: model.num_layers is 2 there but 3 here"),
        ({"lora.rank": 4, "lora.base": "LORA"}, r"is itself a LoRA run \(rank 4\); merge it"),
    ],
)  # fmt: skip
def test_bad_lora_configs_are_one_line_and_change_nothing(tmp_path_factory, extra, match):
    tmp = tmp_path_factory.getbasetemp() / "lora_bad"
    corpus = R.write_corpus(str(tmp_path_factory.mktemp("c") / "corpus.txt"))
    base, lora_run = str(tmp / "base"), str(tmp / "lora")
    if not os.path.isdir(base):
        loop.train_and_evaluate(R.tiny_config(R.tiny_overrides(corpus, 1, 1)), base)
        loop.train_and_evaluate(R.tiny_config(_lora_overrides(corpus, base, 1, 1)), lora_run)
    paths = {"BASE": base, "LORA": lora_run, "NOWHERE": str(tmp / "nowhere")}
    extra = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    before = R.snapshot(base)
    workdir = tmp_path_factory.mktemp("w") / "run"
    with pytest.raises(UserError, match=match):
        loop.train_and_evaluate(R.tiny_config(R.tiny_overrides(corpus, 1, 1, **extra)), str(workdir))
    assert R.snapshot(base) == before
    assert not os.path.exists(workdir)  # refused before the workdir was claimed


def test_a_relative_base_is_saved_as_an_absolute_path(tmp_path, monkeypatch):
    """Later commands (resume, generate, merge) read the base from wherever they run."""
    monkeypatch.chdir(tmp_path)
    c = R.tiny_config({"lora.rank": 4, "lora.base": "base"})
    assert state_lib.checked_config(c).lora.base == str(tmp_path / "base")

"""Configs: presets, derived values, locking; unknown keys and impossible meshes fail clearly."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime.errors import BadValue
from llm_jax.training import config as config_lib
from llm_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def cli_env():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return env


@pytest.mark.parametrize(
    "name, args",
    [
        ("default", ["", "tiny"]),
        ("shakespeare_char", [""]),
        ("gpt2", ["tiny", "small", "medium", "large", "xl"]),
        ("llama", ["tiny", "1b", "7b"]),
        ("bench_cpu", [""]),
        ("bench_gpt2_small", [""]),
    ],
)
def test_every_preset_builds_a_valid_model_config(name, args):
    for arg in args:
        c = config_lib.finalize(load_config(name, arg))
        mc = config_lib.model_config(c, tokenizer_vocab=257)
        assert mc.vocab_size >= 257 and mc.vocab_size % max(c.model.vocab_multiple, 1) == 0
        assert c.data.seq_len <= mc.max_len
        assert c.train.batch_size % c.train.grad_accum_steps == 0
        assert json.loads(config_lib.to_json(c)) == c.to_dict()
    with pytest.raises(ValueError, match="unknown|argument"):
        load_config(name, "nonsense")


def test_presets_have_the_published_shapes():
    g = config_lib.model_config(config_lib.finalize(load_config("bench_gpt2_small")), 50304)
    assert (g.num_layers, g.num_heads, g.embed_dim, g.mlp_dim, g.max_len) == (12, 12, 768, 3072, 256)
    shapes = jax.eval_shape(lambda: TransformerLM(g).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    # GPT-2 small (vocab 50304) is 124,475,904 with 1024 positions; this table has 256.
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 124_475_904 - 768 * 768
    s = config_lib.model_config(load_config("shakespeare_char"), 65)
    # nanoGPT's CPU recipe for shakespeare_char
    assert (s.num_layers, s.num_heads, s.embed_dim, s.vocab_size) == (4, 4, 128, 65)
    sc = load_config("shakespeare_char")
    assert (sc.data.seq_len, sc.data.tokenizer, sc.data.val_fraction) == (64, "char", 0.1)
    assert sc.train.target_eval_loss == 1.88 and sc.train.eval_steps >= 20
    g = config_lib.model_config(load_config("gpt2", "small"), 50257)
    assert (g.num_layers, g.num_heads, g.embed_dim, g.mlp_dim, g.max_len) == (12, 12, 768, 3072, 1024)
    assert (g.positions, g.norm, g.mlp_activation, g.tie_embeddings, g.use_bias) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    assert g.vocab_size == 50304  # 50257 padded to a multiple of 128, as nanoGPT does
    ll = config_lib.model_config(load_config("llama", "7b"), 32000)
    assert (ll.num_layers, ll.num_heads, ll.kv_heads, ll.embed_dim, ll.mlp_dim) == (32, 32, 32, 4096, 11008)
    assert (ll.positions, ll.norm, ll.mlp_activation, ll.tie_embeddings, ll.use_bias) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    assert config_lib.model_config(load_config("llama", "1b"), 32000).kv_heads == 8  # grouped-query


def test_finalize_fills_derived_values_and_locks():
    c = config_lib.base_config()
    c.train.num_steps, c.train.batch_size = 123, 48
    f = config_lib.finalize(c)
    assert f.optim.decay_steps == 123 and f.train.eval_batch_size == 48
    assert c.optim.decay_steps == 0  # the input is not modified
    with pytest.raises(AttributeError, match="nonexistent"):
        f.train.nonexistent = 1
    with pytest.raises(AttributeError, match="num_step"):
        f.train.num_step = 1
    c.optim.decay_steps = 7
    assert config_lib.finalize(c).optim.decay_steps == 7  # explicit values are kept


def test_model_config_vocabulary_and_length_checks():
    c = config_lib.base_config()
    assert config_lib.model_config(c, 257).vocab_size == 384  # padded up to vocab_multiple=128
    c.model.vocab_multiple = 1
    assert config_lib.model_config(c, 257).vocab_size == 257
    c.model.vocab_size = 200
    with pytest.raises(BadValue, match=r"vocab_size=200 is smaller than the tokenizer's vocabulary \(257\)"):
        config_lib.model_config(c, 257)
    c.model.vocab_size = 0
    with pytest.raises(BadValue, match=r"vocab_size=0 must be positive \(leave it unset"):
        config_lib.model_config(c, 257)
    c.model.vocab_size = None  # unset: the tokenizer's
    c.data.seq_len, c.model.max_len = 512, 256
    with pytest.raises(BadValue, match=r"seq_len=512 is longer than .*max_len=256"):
        config_lib.model_config(c, 257)


def test_unknown_config_key_on_the_command_line_fails_clearly(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_jax.main",
            "--config",
            "configs/default.py:tiny",
            f"--workdir={workdir}",
            "--config.train.num_step=3",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    # One line that names the flag, the key, and the likely fix.
    assert "--config.train.num_step" in last and "no key 'num_step'" in last, proc.stderr[-2000:]
    assert 'Did you mean "num_steps"' in last
    assert not workdir.exists()  # nothing was started


def test_config_model_is_model_config_fields():
    """config.model is generated from ModelConfig: same keys, and ModelConfig(**config.model) reads it back."""
    c = config_lib.base_config()
    fields = dataclasses.fields(ModelConfig)
    assert set(c.model.keys()) == {f.name for f in fields if "section" not in f.metadata}
    # LoRA's fields live in config.lora under their short names (`lora_rank` is config.lora.rank).
    assert {f.metadata["key"] for f in fields if f.metadata.get("section") == "lora"} <= set(c.lora.keys())
    c.model.update(num_kv_heads=2, attention_bias=False, rope_scaling="linear", rope_scaling_factor=2.0)
    mc = config_lib.model_config(c, 257)
    assert (mc.kv_heads, mc.attention_use_bias, mc.rope_scaling, mc.rope_scaling_factor) == (2, False, "linear", 2.0)
    assert mc.num_kv_heads == 2 and mc.head_dim is None  # None is the one "unset"


def test_renamed_keys_fail_naming_the_new_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_jax.main", "--config", "configs/default.py:tiny", f"--workdir={tmp_path / 'r'}",
         "--config.model.rope_scaling.factor=2"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "config.model.rope_scaling.factor is now config.model.rope_scaling_factor" in proc.stderr, proc.stderr
    d = config_lib.base_config().to_dict()
    d["model"]["rope_scaling"] = {"type": "linear"}  # a config written for the old layout
    with pytest.raises(BadValue, match="config.model.rope_scaling.type is now config.model.rope_scaling"):
        config_lib.check_keys(ml_collections.ConfigDict(d))


def test_run_configs_saved_before_the_rename_still_load(tmp_path):
    """A config.json of the old layout (nested rope_scaling, 0 / -1 for unset) reads as today's."""
    old = config_lib.base_config().to_dict()
    old["model"].update(num_kv_heads=0, head_dim=0, vocab_size=0, attention_bias=-1, mlp_bias=1)
    for key in (
        "rope_scaling",
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_len",
    ):
        old["model"].pop(key)
    old["model"]["rope_scaling"] = {"type": "linear", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_len": 8192}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(old))
    c = config_lib.load_run_config(str(tmp_path))
    mc = config_lib.model_config(c, 257)
    assert (mc.rope_scaling, mc.rope_scaling_factor, mc.num_kv_heads, mc.head_dim) == ("linear", 4.0, None, None)
    assert (mc.attention_bias, mc.mlp_bias, mc.vocab_size) == (None, True, 384)


def _tiny(tmp_path, **mesh):
    c = load_config("default", "tiny")
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small text file.\n" * 50)
    c.data.update(source="text", path=str(text))
    c.mesh.update(mesh)
    return c


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=3), r"needs 3 devices but 8 are available; make the product 8 or set one axis to -1"),
        (dict(data=-1, tensor=3), r"fixed axes multiply to 3, which does not divide the 8 available devices"),
        (dict(data=2, fsdp=2, tensor=4), r"needs 16 devices but 8 are available"),
    ],
)
def test_impossible_mesh_shape_fails_clearly(tmp_path, mesh, message):
    with pytest.raises(BadValue, match=message):
        loop.train_and_evaluate(_tiny(tmp_path, **mesh), str(tmp_path / "run"))


def test_mesh_that_does_not_fit_the_model_fails_clearly(tmp_path):
    c = _tiny(tmp_path, data=1, fsdp=2, tensor=4)
    c.model.update(num_heads=2, embed_dim=36)  # 2 heads over tensor=4; width 36 over fsdp=2 is fine
    with pytest.raises(BadValue, match=r"num_heads=2 is not divisible by mesh tensor=4") as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert "config.mesh" in str(e.value)
    c = _tiny(tmp_path, data=8)
    c.train.batch_size = 12
    with pytest.raises(BadValue, match=r"batch_size=12 is not divisible by data\*fsdp\*expert=8"):
        loop.train_and_evaluate(c, str(tmp_path / "run2"))


# ----------------------------------------------------------------------------------------------
# Each data source's keys


@pytest.mark.parametrize(
    "source, key, value",
    [
        ("text", "src_lang", "fr"),
        ("text", "tfds_name", "lm1b"),
        ("stdlib", "path", "corpus.txt"),
        ("jsonl", "max_chars", 1000),
        ("parallel", "val_fraction", 0.2),
        ("parallel", "cache_dir", "/tmp/cache"),
        ("tfds", "text_key", "body"),
    ],
)
def test_a_key_of_another_source_is_an_error_naming_both_sources(source, key, value):
    c = config_lib.base_config()
    c.data.update({"source": source, key: value})
    owners = " or ".join(repr(s) for s in config_lib.SOURCE_KEYS[key])
    want = f"config.data.{key}={value!r} is a key of source={owners}, but config.data.source={source!r}; remove it"
    with pytest.raises(BadValue) as e:
        config_lib.check_keys(c)
    assert str(e.value) == want + " or set the source"


def test_every_source_takes_its_own_keys_and_others_at_their_defaults():
    assert set(config_lib.SOURCE_KEYS) <= set(config_lib.base_config().data)
    for source in config_lib.SOURCES:
        c = config_lib.base_config()
        c.data.source = source
        config_lib.check_keys(c)  # every key at its default: fine
        for key, sources in config_lib.SOURCE_KEYS.items():
            if source in sources:  # its own keys may be set
                old = c.data[key]
                c.data[key] = (
                    not old
                    if isinstance(old, bool)
                    else 3
                    if isinstance(old, int)
                    else 0.5
                    if isinstance(old, float)
                    else "x"
                )
        config_lib.check_keys(c)


def test_a_runs_config_json_leaves_out_other_sources_keys_and_reads_back_whole(tmp_path):
    c = config_lib.finalize(config_lib.base_config())
    c.unlock()
    c.data.update(source="text", path="corpus.txt", max_chars=500)
    saved = json.loads(config_lib.run_json(c))
    assert set(saved["data"]) == set(c.data) - {k for k, s in config_lib.SOURCE_KEYS.items() if "text" not in s}
    assert "src_lang" not in saved["data"] and "tfds_name" not in saved["data"] and saved["data"]["max_chars"] == 500
    (tmp_path / "config.json").write_text(config_lib.run_json(c))
    assert config_lib.load_run_config(str(tmp_path)).to_dict() == c.to_dict()
    (tmp_path / "config.json").write_text(config_lib.to_json(c))  # a run saved before: every key of every source
    assert config_lib.load_run_config(str(tmp_path)).to_dict() == c.to_dict()

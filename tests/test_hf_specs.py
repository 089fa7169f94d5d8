"""Hugging Face interop without torch: the per-architecture tensor tables on tiny hand-made arrays,
and which problem of a Hugging Face directory is reported first."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest
from flax import traverse_util

from llm_jax.interop import hf, hf_specs
from llm_jax.models.model import ModelConfig, TransformerLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small configs whose every letter has its own size, so a swapped axis cannot go unnoticed; each
# turns on every optional tensor of its table (untied head, Llama biases).
CONFIGS = {
    "gpt2": ModelConfig(vocab_size=11, num_layers=2, num_heads=2, embed_dim=6, mlp_dim=10, tie_embeddings=False),
    "llama": ModelConfig(
        vocab_size=11,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=6,
        embed_dim=10,
        mlp_dim=14,
        positions="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        use_bias=False,
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=False,
    ),
}
_LLAMA = CONFIGS["llama"]
CONFIGS.update(
    mistral=dataclasses.replace(_LLAMA, attention_bias=False, mlp_bias=False, layer_pattern="l", sliding_window=5),
    qwen2=dataclasses.replace(
        _LLAMA, attention_bias=True, attention_out_bias=False, mlp_bias=False, layer_pattern="gl", sliding_window=5
    ),
    qwen3=dataclasses.replace(_LLAMA, attention_bias=False, mlp_bias=False, qk_norm=True),
    gemma2=dataclasses.replace(
        _LLAMA,
        mlp_activation="geglu",
        mlp_bias=False,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        query_scale=16.0,
        attn_softcap=50.0,
        final_softcap=30.0,
        layer_pattern="lg",
        sliding_window=5,
    ),
)
CONFIGS["gemma3_text"] = dataclasses.replace(
    CONFIGS["gemma2"], attn_softcap=None, final_softcap=None, qk_norm=True, local_rope_theta=100.0, layer_pattern="llg"
)
# Mixtures of experts: 3 experts of size 8 (Qwen3-MoE: 7, its first layer dense, so both kinds of MLP rows).
_MOE = dict(mlp_bias=False, attention_bias=False, num_experts=3, experts_per_token=2)
CONFIGS.update(
    mixtral=dataclasses.replace(_LLAMA, **_MOE, mlp_dim=8, layer_pattern="l", sliding_window=5),
    qwen3_moe=dataclasses.replace(
        _LLAMA, **{**_MOE, "attention_bias": True}, qk_norm=True, expert_mlp_dim=7, moe_first_dense=1, norm_topk=False
    ),
)


@pytest.mark.parametrize("spec", hf_specs.SPECS, ids=lambda s: s.model_type)
def test_table_is_one_inverse_mapping_of_every_param(spec):
    """Import (to_ours) gives views of the stored tensor in our shapes; export (to_hf) inverts it; the
    table names every parameter of the model exactly once."""
    cfg = CONFIGS[spec.model_type]
    assert hf_specs.for_model(cfg) is spec
    dims = hf_specs.sizes(cfg)
    targets = traverse_util.flatten_dict(nn.meta.unbox(hf.abstract_params(TransformerLM(cfg))))
    rng = np.random.RandomState(0)
    seen = []
    for entry in spec.table:
        if not entry.when(cfg):  # an optional tensor this config does not have (see the next test)
            continue
        layers = [i for i in range(cfg.num_layers) if entry.layers(cfg, i)] if entry.per_layer else (None,)
        for layer in layers:
            keys = [hf.param_key(p, layer, False) for p in entry.paths()]
            seen += keys
            # A per-expert tensor is one row of our stacked [experts, ...] parameter.
            want = {k: targets[k].shape[1:] if entry.per_expert else targets[k].shape for k in keys}
            shape = entry.hf_shape(dims) or want[keys[0]]  # no layout: our shape
            x = rng.standard_normal(shape).astype(np.float32)
            ours = entry.to_ours(x, dims)
            for key, y in zip(keys, ours):
                assert y.shape == want[key], (entry.hf, key)
                assert np.shares_memory(y, x), f"{entry.hf}: import must not copy (a memory map stays one)"
            np.testing.assert_array_equal(entry.to_hf(ours, dims), x, err_msg=entry.hf)
    assert sorted(seen) == sorted(targets)


def test_every_table_row_is_exercised():
    """Each row of each table is present in at least one config above (a shared table's optional rows too)."""
    for spec in hf_specs.SPECS:
        users = [c for c in CONFIGS.values() if hf_specs.for_model(c).table is spec.table]
        for entry in spec.table:
            used = [c for c in users if entry.when(c)]
            assert any(entry.layers(c, i) for c in used for i in range(c.num_layers)), (spec.architecture, entry.hf)


def test_gpt2_fused_qkv_splits_in_order():
    """c_attn [e, 3*h*d] is q | k | v along its output axis, each [e, h, d] on our side."""
    entry = next(t for t in hf_specs.GPT2.table if t.hf.endswith("c_attn.weight"))
    e, h, d = 4, 2, 2
    x = np.arange(e * 3 * h * d).reshape(e, 3 * h * d)
    q, k, v = entry.to_ours(x, {"e": e, "h": h, "d": d})
    np.testing.assert_array_equal(q.reshape(e, h * d), x[:, : h * d])
    np.testing.assert_array_equal(v.reshape(e, h * d), x[:, 2 * h * d :])


def test_bad_table_rows_fail_at_definition():
    with pytest.raises(ValueError, match="same letters"):
        hf_specs.Tensor("w", "attn/query/kernel", "(h d) e -> e h")
    with pytest.raises(ValueError, match="leading axis of ours is n"):
        hf_specs.Tensor("w", ("a", "b"), "(h d) e -> e h d")


def test_export_names_the_misfit_fields():
    cfg = ModelConfig(vocab_size=11, num_layers=1, embed_dim=8, num_heads=2, positions="rope", mlp_activation="swiglu")
    with pytest.raises(hf.HFError, match=r"GPT2LMHeadModel its fields \['positions', 'mlp_activation'\].*\['norm'\]"):
        hf.hf_config_from_model(cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_roundtrip(name):
    """config.json written for a model reads back as the very same ModelConfig, as the same architecture."""
    cfg = CONFIGS[name]
    written = hf.hf_config_from_model(cfg)
    assert written["model_type"] == name
    back = hf.model_config_from_hf(written)
    # The layer pattern comes back as the shortest cycle of the layers' kinds ('llg' over 2 layers: 'l').
    assert [back.is_local(i) for i in range(cfg.num_layers)] == [cfg.is_local(i) for i in range(cfg.num_layers)]
    assert dataclasses.replace(back, vocab_multiple=cfg.vocab_multiple, layer_pattern=cfg.layer_pattern) == cfg


def test_pickled_weights_are_reported_before_the_missing_tokenizer(tmp_path):
    """Issue 10: config.json + pytorch_model.bin only -> the pickle refusal, not a request for tokenizer.json."""
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf.hf_config_from_model(CONFIGS["gpt2"])))
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(hf.HFError, match=r"pytorch_model\.bin.*never unpickles") as err:
        hf.import_run(str(src), str(tmp_path / "run"), log=lambda *_: None)
    assert "tokenizer" not in str(err.value)
    assert not (tmp_path / "run").exists()

    # The same through the command line that issue 10 tried.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "llm_jax.convert", "from_hf", "--hf_dir", str(src), "--workdir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "never unpickles" in proc.stderr and "has no tokenizer.json" not in proc.stderr


_DECODER = {
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "arch, changes, message",
    [
        ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'"),
        ("Qwen3ForCausalLM", {"layer_types": ["chunked_attention", "full_attention"]}, r"\['chunked_attention'\]"),
        ("Gemma2ForCausalLM", {"sliding_window": None}, "no sliding_window size"),
        ("MistralForCausalLM", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("Gemma2ForCausalLM", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        (
            "Gemma3ForCausalLM",
            {"rope_parameters": {"full_attention": {}, "sliding_attention": {"rope_type": "linear", "factor": 2}}},
            r"sliding_attention\.rope_type='linear'",
        ),
        ("Gemma3ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ("OlmoeForCausalLM", {}, r"architectures=\['OlmoeForCausalLM'\]"),
    ],
)
def test_unsupported_options_are_refused_by_name(arch, changes, message):
    with pytest.raises(hf.HFError, match=message):
        hf.model_config_from_hf({**_DECODER, "architectures": [arch], **changes})

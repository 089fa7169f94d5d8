"""The model summary (llm_jax/training/summary.py): totals, modules, collapsed layers, shardings, FLOPs."""

import flax.linen as nn
import jax
import ml_collections
import optax
import pytest

from llm_jax.models import family as family_lib
from llm_jax.models import lora, quant
from llm_jax.models.model import ModelConfig, count_params
from llm_jax.runtime import sharding
from llm_jax.training import summary

CFG = dict(vocab_size=256, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64, max_len=32)


def _mesh(data, fsdp, tensor):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}))


def test_summary_of_abstract_params_on_a_mesh():
    model = family_lib.build(ModelConfig(**CFG))
    mesh, rules = _mesh(2, 2, 2), sharding.logical_rules()
    d = summary.summary_dict(model, None, mesh, rules, seq_len=32)
    params = jax.eval_shape(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)))
    assert d["params"] == count_params(params) == sum(n for _, _, n in d["modules"])
    assert d["flops_per_token"] == family_lib.flops_per_token(model.cfg, 32)
    assert d["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    assert ("layers_*/attn", 3, 3 * sum(r["size"] for r in d["rows"] if "/attn/" in r["name"])) in d["modules"]
    query = next(r for r in d["rows"] if r["name"] == "layers_[0-2]/attn/query/kernel")
    assert query["count"] == 3 and query["shape"] == (32, 4, 8) and query["logical"] == ("embed", "heads", "kv")
    assert tuple(query["spec"]) == ("fsdp", "tensor", None) and query["per_device"] == 16 * 2 * 8
    # Weights split over fsdp x tensor = 4 devices; norms are replicated: a bit over a quarter per device.
    assert d["bytes"] / 4 < d["bytes_per_device"] < d["bytes"] / 3
    text = summary.summarize(model, None, mesh, rules, seq_len=32)
    assert f"{d['params']:,} parameters" in text and "mesh: data=2 x fsdp=2 x tensor=2 over 8 cpu devices" in text
    assert "layers_[0-2]/attn/query/kernel x3" in text and "embed,heads,kv -> fsdp,tensor,-" in text
    assert "layers_1" not in text  # repeated layers collapse into one row each


def test_summary_reads_the_sharding_of_real_params_and_scanned_layers():
    model = family_lib.build(ModelConfig(**CFG, scan_layers=True))
    mesh, rules = _mesh(-1, 1, 2), sharding.logical_rules()
    boxed = jax.eval_shape(lambda: family_lib.init_params(model, jax.random.key(0), 8))
    shardings = sharding.boxed_shardings(boxed, mesh, rules)
    params = jax.jit(
        lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)), out_shardings=shardings
    )()
    d = summary.summary_dict(model, params, mesh, rules=None)  # no rules: the arrays' own shardings
    kernel = next(r for r in d["rows"] if r["name"] == "layers/mlp/wi/kernel")
    assert (
        kernel["shape"] == (3, 32, 64)
        and tuple(kernel["spec"]) == (None, "fsdp", "tensor")
        and kernel["per_device"] == 3 * 32 * 32
    )
    assert ("layers/mlp", 3, 3 * (32 * 64 + 64 + 64 * 32 + 32)) in d["modules"]
    assert "layers/mlp x3" in summary.summarize(model, params, mesh)


@pytest.mark.parametrize("family", ["encdec"])
def test_summary_of_an_encoder_decoder_names_both_stacks(family):
    model = family_lib.build(ModelConfig(**CFG, family=family, num_encoder_layers=2))
    text = summary.summarize(model, seq_len=16)
    assert "2 encoder + 3 layers" in text and "encoder/layers_[0-1]/attn/query/kernel x2" in text
    assert "decoder/layers_[0-2]/cross_attn/key/kernel x3" in text and "mesh:" not in text


@pytest.mark.parametrize("kind", ["float32", "int4"])
def test_summary_memory_of_a_lora_model_trainable_frozen_and_optimizer(kind):
    # A LoRA model's summary counts the adapters as trainable and the base as frozen, at its stored
    # dtypes (int4 packed: `quant.weight_bytes`), per device under the shardings, plus the optimizer state.
    quant_kind = "none" if kind == "float32" else kind
    model = family_lib.build(ModelConfig(**CFG, lora_rank=4, weight_quant=quant_kind))
    mesh, rules = _mesh(1, 4, 2), sharding.logical_rules()
    params = jax.eval_shape(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)))
    adapters, base = lora.split(params)
    opt_state = jax.eval_shape(optax.adam(1e-3).init, adapters)
    d = summary.summary_dict(model, None, mesh, rules, seq_len=32, opt_state=opt_state)
    m = d["memory"]
    assert m["trainable"]["params"] == lora.count(adapters) > 0 and m["trainable"]["dtypes"] == ["float32"]
    assert m["trainable"]["bytes"] == 4 * lora.count(adapters)
    assert m["frozen"]["params"] == lora.count(base) == d["params"] - lora.count(adapters)
    assert m["frozen"]["bytes"] == quant.weight_bytes(base) and ("int4" in m["frozen"]["dtypes"]) == (kind == "int4")
    # The kernels and adapters split over fsdp x tensor: far less than all on one device, more than an 8th.
    for part in ("trainable", "frozen"):
        assert m[part]["bytes"] / 8 <= m[part]["bytes_per_device"] < m[part]["bytes"] / 2
    # Adam: two float32 moments per adapter (and a step count); unsharded here, so whole on each device.
    assert m["optimizer"]["bytes"] == m["optimizer"]["bytes_per_device"] == 2 * 4 * lora.count(adapters) + 4
    text = summary.summarize(model, None, mesh, rules, seq_len=32, opt_state=opt_state)
    assert f"{lora.count(adapters):,} parameters (LoRA adapters, rank 4, float32)" in text
    assert f"{lora.count(base):,} parameters (the LoRA base" in text and "optimizer state" in text


def test_summary_memory_of_full_training_is_all_trainable():
    model = family_lib.build(ModelConfig(**CFG))
    d = summary.summary_dict(model, seq_len=32)
    m = d["memory"]
    assert m["trainable"]["params"] == d["params"] and m["trainable"]["bytes"] == d["bytes"]
    assert m["frozen"] == {"params": 0, "bytes": 0, "bytes_per_device": 0, "dtypes": []} and m["optimizer"] is None
    text = summary.summarize(model, seq_len=32)
    assert f"{d['params']:,} parameters (all parameters, float32)" in text and "optimizer state" not in text

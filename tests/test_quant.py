"""Weight-only quantized inference (`saved_run.quantized`, `--quant` of generate / translate /
evaluate): close to float, laid out like float, for both families and LoRA runs.

Measured on the tiny trained run of decode_fixtures (2 layers, 32 wide, byte vocabulary; 8 prompts
and the float model's 24 greedy tokens after each): the largest logit difference relative to the
float logits' standard deviation, int8 0.0024, int4 0.141; argmax agreement at every position of
that sequence, int8 100%, int4 99.6%; greedy decoding from its own tokens, 100% of the tokens
equal for both. The bounds below leave a margin of several times that.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import runlib as R
from decode_fixtures import qa_run
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.inference import decode
from llm_jax.inference import translate as translate_lib
from llm_jax.models import family as family_lib
from llm_jax.models import lora, quant
from llm_jax.models.config import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training.saved_run import Run, check_quant, load_run, quantized

PROMPTS = [f"up {w} =" for w in ("abc", "hello", "jihgf", "bead", "cafe", "dig", "fjjh", "aaaa")]
BITS = {"int8": 8, "int4": 4}  # as `quant.weight_bytes` counts them (int4 packed, two to a byte)
BOUNDS = {"int8": (0.02, 0.98), "int4": (0.5, 0.9)}  # max |dlogit| / std(logits), argmax agreement at least


def mesh_of(data=1, fsdp=1, tensor=1):
    """A mesh over the first data x fsdp x tensor devices."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    return sharding.make_mesh(ml_collections.ConfigDict(sizes), jax.devices()[: data * fsdp * tensor])


@pytest.fixture(scope="module")
def run():
    """The tiny trained run on one device (what the numbers are measured on: compiles in seconds)."""
    workdir, _ = qa_run()
    return load_run(workdir, mesh=mesh_of())


def assert_sharded_like_float(float_params, q_params, kind: str) -> int:
    """Kernels keep the float kernels' shardings, scales the output axes' ones, every other leaf its
    own; returns the weight bytes quantization saved."""
    floats = jax.tree_util.tree_flatten_with_path(float_params)[0]
    quants = dict(jax.tree_util.tree_flatten_with_path(q_params)[0])
    split, saved = set(), 0
    for path, x in floats:
        y = quants[path]
        if path[-1].key != "kernel":
            assert y.dtype == x.dtype and y.sharding.is_equivalent_to(x.sharding, x.ndim), path
            continue
        assert y.dtype == quant.DTYPES[kind] and y.sharding.spec == x.sharding.spec, path
        scale = quants[path[:-1] + (jax.tree_util.DictKey("kernel_scale"),)]
        # The scale keeps the kernel's output axes (and their mesh axes), its input axes are 1s.
        expected = tuple(None if s == 1 and k != 1 else a for s, k, a in zip(scale.shape, x.shape, x.sharding.spec))
        assert tuple(scale.sharding.spec) + (None,) * (scale.ndim - len(scale.sharding.spec)) == expected, path
        split |= {a for a in x.sharding.spec if a}
        assert y.addressable_shards[0].data.size < y.size  # really split, never whole on one device
        saved += x.size * x.dtype.itemsize - x.size * BITS[kind] // 8 - scale.size * 4
    assert {"fsdp", "tensor"} <= split  # the check above saw both kinds of model parallelism
    return saved


def logits(r, tokens):
    with r.use_mesh():
        return np.asarray(jax.jit(r.model.apply)({"params": r.params}, tokens), np.float32)


def greedy(r, tokens, start, new=24):
    with r.use_mesh():
        out = decode.generate(r.model, r.params, tokens, start, jax.random.key(0), max_new_tokens=new)
    return np.asarray(out.tokens)


def test_bad_quant_names_the_value():
    with pytest.raises(BadValue, match=r"--quant='int3' is not a weight quantization: use none, int8 or int4"):
        check_quant("int3")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_kernels_keep_the_float_shardings(kind):
    sharded = load_run(qa_run()[0], mesh=mesh_of(data=2, fsdp=2, tensor=2))
    q = quantized(sharded, kind)
    saved = assert_sharded_like_float(sharded.params, q.params, kind)
    assert q.model.cfg.weight_quant == kind and quantized(sharded, "none") is sharded
    assert quant.weight_bytes(q.params) == quant.weight_bytes(sharded.params) - saved > 0


def test_int8_and_int4_stay_close_to_float(run):
    tokens, start = decode.left_pad([run.tokenizer.encode(p) for p in PROMPTS])
    reference = greedy(run, tokens, start)
    seq = np.concatenate([tokens, reference], axis=1)  # every position decided by the float model
    lf = logits(run, seq)
    errors = {}
    for kind, (max_err, min_agree) in BOUNDS.items():
        q = quantized(run, kind)
        lq = logits(q, seq)
        err = float(np.abs(lq - lf).max() / lf.std())
        agree = float((lq.argmax(-1) == lf.argmax(-1)).mean())
        free = float((greedy(q, tokens, start) == reference).mean())  # decoding from its own tokens
        print(f"{kind}: max|dlogit|/std {err:.4f}, argmax agreement {agree:.4f}, greedy decode agreement {free:.4f}")
        assert 0 < err < max_err and agree >= min_agree and free >= min_agree - 0.1
        errors[kind] = err
    assert errors["int4"] > 4 * errors["int8"]  # 4 bits round 18x coarser than 8


def test_lora_and_qlora_runs_are_merged_before_quantizing(run):
    cfg = dataclasses.replace(run.model.cfg, lora_rank=4, lora_targets="query,value,wi")
    model = family_lib.build(cfg)
    abstract = nn.meta.unbox(family_lib.abstract_params(model))
    adapters, _ = lora.split(abstract)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    adapters = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), adapters)
    lora_run = dataclasses.replace(run, model=model, params=lora.combine(run.params, adapters))
    seq, _ = decode.left_pad([run.tokenizer.encode(p) for p in PROMPTS[:4]])
    expected = logits(lora_run, seq)
    base = logits(run, seq)
    q = quantized(lora_run, "int8")
    assert q.model.cfg.lora_rank == 0 and not lora.split(q.params)[0]
    err = np.abs(logits(q, seq) - expected).max() / expected.std()
    assert err < BOUNDS["int8"][0] and np.abs(base - expected).max() / expected.std() > 10 * err
    # QLoRA: the base stored as int8 beside float adapters; dequantized, merged, quantized again.
    qlora_cfg = dataclasses.replace(cfg, weight_quant="int8")
    qlora = dataclasses.replace(
        lora_run, model=family_lib.build(qlora_cfg), params=lora.combine(quantized(run, "int8").params, adapters)
    )
    err = np.abs(logits(quantized(qlora, "int8"), seq) - expected).max() / expected.std()
    assert err < 2 * BOUNDS["int8"][0]


class _BytesWithBos(ByteTokenizer):
    bos_id = 1  # the decoder's start token (a control byte no sentence holds)


def test_an_encdec_run_translates_with_int8():
    cfg = ModelConfig(
        family="encdec", vocab_multiple=8, num_layers=1, num_encoder_layers=1, num_heads=2, embed_dim=32,
        mlp_dim=64, max_len=32, positions="sinusoidal", init_std=0.2,
    ).resolved(ByteTokenizer.vocab_size)  # fmt: skip
    model = family_lib.build(cfg)
    mesh, rules = mesh_of(data=2, fsdp=2, tensor=2), sharding.logical_rules()
    out_sh = sharding.boxed_shardings(family_lib.abstract_params(model), mesh, rules)
    params = jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)), out_shardings=out_sh)()
    float_run = Run("", None, _BytesWithBos(), model, params, mesh, rules, 0, cfg.max_len, {})
    q = quantized(float_run, "int8")
    assert_sharded_like_float(float_run.params, q.params, "int8")  # cross-attention included
    assert q.params["decoder"]["layers_0"]["cross_attn"]["query"]["kernel"].dtype == np.int8
    one = mesh_of()
    sentences = ["a man runs", "", "the red dog on the grass", "two women"]
    outputs = {}
    for name, r in (("float", float_run), ("int8", q)):
        r = dataclasses.replace(r, mesh=one, params=jax.device_put(r.params, NamedSharding(one, P())))
        with r.use_mesh():
            outputs[name] = translate_lib.translate(r, sentences, beam_size=2, batch_size=4)
    assert len(outputs["int8"]) == 4 and outputs["int8"][1] == ""
    assert sum(a == b for a, b in zip(outputs["int8"], outputs["float"])) >= 3


def test_generate_cli_decodes_with_int8_weights(run):
    workdir = run.workdir
    cmd = [sys.executable, "-m", "llm_jax.generate", f"--workdir={workdir}", "--max_new_tokens=12", "--format=jsonl"]
    proc = subprocess.run(
        [*cmd, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--quant=int8"],
        cwd=R.REPO, env=R.env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "int8 weights" in proc.stderr
    q = quantized(run, "int8")
    with q.use_mesh():
        expected = decode.complete(q.model, q.params, q.tokenizer, PROMPTS[:2], 12, context=q.context)
    assert [json.loads(line)["completion"] for line in proc.stdout.splitlines()] == expected
    bad = subprocess.run(
        [*cmd, "--prompt=x", "--quant=int3"], cwd=R.REPO, env=R.env(1), capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "generate: error: --quant='int3' is not a weight quantization: use none, int8 or int4"
    ]
    assert os.path.isdir(workdir)

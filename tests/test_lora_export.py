"""A LoRA run out of llm_jax (llm_jax/interop/lora_export.py): `convert merge` to a plain run, `to_hf`
merged, and `to_hf --peft` in PEFT's adapter format.

A tiny random transformers model (Llama 3 with tied embeddings; Qwen3 with QK-norm, imported with
scanned layers) is imported, LoRA-trained 2 steps on every projection with a learning rate large
enough that B is far from zero (the adapters move the logits by more than 0.1), then: the merged
run gives the adapted model's logits to 1e-5 and loads with load_run; the merged export loaded by
transformers and the PEFT adapters loaded by `peft` on the original checkpoint give them to 1e-4.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_families import _tokenizer, make_model, tokens, torch_logits  # noqa: E402

from llm_jax.interop import hf, hf_specs, lora_export  # noqa: E402
from llm_jax.models import lora  # noqa: E402
from llm_jax.runtime.errors import AlreadyExists, BadValue  # noqa: E402
from llm_jax.training import config as config_lib  # noqa: E402
from llm_jax.training import loop  # noqa: E402
from llm_jax.training.saved_run import load_run  # noqa: E402

TARGETS = "query,key,value,out,wi_0,wi_1,wo"
HF_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the same, HF's names
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lora_config(base, data):
    spec = importlib.util.spec_from_file_location("lora_config", os.path.join(ROOT, "configs", "lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"{base},tiny")
    c.data.update(path=str(data), seq_len=32)
    c.lora.update(targets=TARGETS, dropout=0.0)
    c.optim.update(lr=0.01, warmup_steps=0)  # two Adam steps move B by about 0.02: the adapters bite
    c.train.update(num_steps=2, batch_size=8, eval_every=2, checkpoint_every=2, sample_tokens=0)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


def _files(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs if f != "lock")  # fmt: skip


def _logits(run, toks):
    with run.use_mesh():
        return np.asarray(jax.jit(run.model.apply)({"params": run.params}, toks))


# Qwen3 (QK-norm, scanned layers) mostly re-covers Llama's path: slow.
@pytest.fixture(scope="module", params=["llama3", pytest.param("qwen3", marks=pytest.mark.slow)])
def lora_run(request, tmp_path_factory):
    """(name, HF source dir, base run, LoRA run, our adapted logits, base logits) of a LoRA run trained
    2 steps on an imported tiny model."""
    name, tmp = request.param, tmp_path_factory.mktemp(request.param)
    src, base, work = tmp / "src", tmp / "base", tmp / "lora"
    src.mkdir()
    make_model(src, name, vocab_size=_tokenizer(src), eos_token_id=1)  # "</s>": completions end with it
    config = hf.run_config(str(src))
    config.model.scan_layers = name == "qwen3"
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    hf.import_run(str(src), str(base), config, log=lambda *a: None)
    data = tmp / "qa.jsonl"
    lines = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(40)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert loop.train_and_evaluate(_lora_config(str(base), data), str(work))["step"] == 2
    toks = tokens()
    return name, src, base, work, toks, _logits(load_run(str(work)), toks), _logits(load_run(str(base)), toks)


def test_merged_run_and_export_give_the_adapted_logits(lora_run, tmp_path):
    name, src, base, work, toks, adapted, base_logits = lora_run
    moved = float(np.abs(adapted - base_logits).max())
    assert moved > 0.1, "the adapters must change the model for the comparisons to mean anything"
    before = _files(work), _files(base)
    out = tmp_path / "merged"
    lora_export.merge_run(str(work), str(out), log=lambda *a: None)
    assert (_files(work), _files(base)) == before  # neither the LoRA run nor its base was written

    run = load_run(str(out))
    assert not run.model.cfg.lora_rank and run.config.lora.to_dict() == config_lib.lora_section().to_dict()
    assert run.step == 0 and (out / "hf" / "config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    merged_diff = float(np.abs(_logits(run, toks) - adapted).max())

    hf_out = tmp_path / "hf_merged"
    hf.export_run(str(work), str(hf_out), log=lambda *a: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(hf_out), attn_implementation="eager").eval()
    export_diff = float(np.abs(torch_logits(back, toks) - adapted).max())
    print(
        f"\n{name}: logits up to {np.abs(adapted).max():.2f}, the adapters move them by {moved:.3f}; "
        f"merged run {merged_diff:.2e}; merged export {export_diff:.2e}"
    )
    assert merged_diff < 1e-5
    assert export_diff < 1e-4

    with pytest.raises(AlreadyExists, match="not empty"):
        lora_export.merge_run(str(work), str(out), log=lambda *a: None)
    with pytest.raises(BadValue, match="needs a LoRA run"):
        lora_export.merge_run(str(out), str(tmp_path / "again"), log=lambda *a: None)
    with pytest.raises(BadValue, match="overlaps"):
        lora_export.merge_run(str(work), str(work / "merged"), log=lambda *a: None)


def test_peft_adapters_load_in_peft_and_give_our_logits(lora_run, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is in the hf extra: pip install -e '.[hf]'")
    name, src, base, work, toks, adapted, _ = lora_run
    out = tmp_path / "peft"
    lora_export.export_peft(str(work), str(out), log=lambda *a: None)
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["target_modules"] == sorted(HF_MODULES)
    assert settings["base_model_name_or_path"] == os.path.realpath(src)

    tbase = transformers.AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(tbase, str(out)).eval()
    diff = float(np.abs(torch_logits(model, toks) - adapted).max())
    print(f"\n{name}: PEFT adapters in peft {peft.__version__}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4

    with pytest.raises(BadValue, match="needs a LoRA run"):
        lora_export.export_peft(str(base), str(tmp_path / "x"), log=lambda *a: None)


def test_peft_rows_follow_the_tables():
    """For every nn.Linear row of every table, PEFT's lora_B @ lora_A is the HF form of our A B; GPT-2's
    Conv1D and fused rows have none (its adapters are refused, naming the merged export)."""
    rng = np.random.default_rng(0)
    dims = {"e": 6, "h": 3, "k": 2, "d": 4, "m": 10, "v": 7, "x": 3, "f": 5, "r": 2}
    checked = set()
    for spec in hf_specs.SPECS:
        for entry in spec.table:
            if not entry.ours[0].endswith("/kernel") or entry.per_expert:
                continue
            if entry.layout is None:  # GPT-2's Conv1D: [in, out] as ours
                assert entry.lora_rows(1) is None, entry.hf
                continue
            shape = entry.to_ours(np.zeros(entry.hf_shape(dims)), dims)[0].shape
            for num_in in range(1, len(shape)):
                rows = entry.lora_rows(num_in)
                if spec.architecture == "GPT2LMHeadModel" and entry.per_layer:  # Conv1D, fused c_attn
                    assert rows is None, entry.hf
                    continue
                if rows is None:
                    continue
                a = rng.normal(size=(*shape[:num_in], 2))
                b = rng.normal(size=(2, *shape[num_in:]))
                want = entry.to_hf([np.asarray(lora.delta(a, b, shape, 1.0))], dims)
                got = rows[1].to_hf([b], dims) @ rows[0].to_hf([a], dims)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                checked.add(entry.hf.rsplit(".", 2)[-2])
    assert set(HF_MODULES) <= checked


@pytest.mark.parametrize("base_dtype", ["int8", "int4", "bfloat16"])
def test_merged_quantized_or_half_base_gives_the_adapted_logits(base_dtype):
    """QLoRA: the adapters are merged onto the dequantized kernels (a bfloat16 base: onto its
    bfloat16 values in float32), so the plain model gives the LoRA model's logits."""
    import dataclasses

    import flax.linen as nn
    import jax.numpy as jnp

    from llm_jax.models import family, quant
    from llm_jax.models.config import ModelConfig

    quant_kind = base_dtype if base_dtype in quant.QMAX else "none"
    sizes = dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=48, max_len=16)
    cfg = ModelConfig(
        **sizes, lora_rank=4, lora_alpha=8.0, lora_targets="query,value,out,wi,wo", weight_quant=quant_kind
    )
    model = family.build(cfg)
    params = nn.meta.unbox(
        family.init_params(family.build(dataclasses.replace(cfg, weight_quant="none")), jax.random.key(0), 8)
    )
    keys = iter(jax.random.split(jax.random.key(1), 100))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, params
    )
    if quant_kind != "none":
        params = quant.quantize(params, nn.meta.unbox(family.abstract_params(model)), quant_kind)
    else:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    toks = np.random.RandomState(0).randint(0, 61, (2, 16)).astype(np.int32)
    adapted = np.asarray(model.apply({"params": params}, toks))
    plain, merged = lora.merged(cfg, params)
    assert not plain.lora_rank and plain.weight_quant == "none"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
    got = np.asarray(family.build(plain).apply({"params": merged}, toks))
    base = np.asarray(model.apply({"params": lora.zeros_like_b(params)}, toks))
    diff = float(np.abs(got - adapted).max())
    print(f"\n{base_dtype} base: adapters move logits by {np.abs(adapted - base).max():.3f}; merged {diff:.2e}")
    assert np.abs(adapted - base).max() > 0.1
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("lora_run", ["llama3"], indirect=True)  # one architecture is enough for the commands
def test_commands_answer_bad_input_in_one_line(lora_run, tmp_path):
    """`convert merge` / `to_hf --peft` as a user runs them: the run, a wrong run, a taken directory."""
    import runlib

    name, src, base, work, *_ = lora_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    p = runlib.run_cli("llm_jax.convert", "merge", f"--workdir={work}", f"--out_workdir={taken}")
    runlib.assert_one_line_error(p, "convert", "exists and is not empty; choose a new --out_workdir")
    assert (taken / "notes.txt").read_text() == "mine"
    p = runlib.run_cli("llm_jax.convert", "to_hf", f"--workdir={base}", f"--hf_dir={tmp_path / 'p'}", "--peft")
    runlib.assert_one_line_error(p, "convert", r"to_hf --peft needs a LoRA run, and --workdir=.* is not one")
    p = runlib.run_cli("llm_jax.convert", "to_hf", f"--workdir={work}", f"--hf_dir={src}", "--peft")
    runlib.assert_one_line_error(p, "convert", r"is the directory config.lora.base=.* was imported from")
    p = runlib.run_cli("llm_jax.convert", "to_hf", f"--workdir={work}", f"--hf_dir={tmp_path / 'peft'}", "--peft")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "peft")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "llm_jax_export.json",
    ]


def test_peft_adapters_of_gemma2_without_a_run(tmp_path):
    """Gemma 2 (soft-capping, local layers, post-norms, GeGLU): random adapters on every projection of
    the imported model, written by `peft_tensors`, give our LoRA model's logits in peft."""
    peft = pytest.importorskip("peft", reason="peft is in the hf extra: pip install -e '.[hf]'")
    import dataclasses

    import flax.linen as nn
    import ml_collections

    from llm_jax.models import family
    from llm_jax.runtime import files

    src, out = tmp_path / "src", tmp_path / "peft"
    tmodel = make_model(src, "gemma2")
    model, params = hf.load_pretrained(str(src))
    cfg = dataclasses.replace(model.cfg, lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS)
    adapters, _ = lora.split(nn.meta.unbox(family.abstract_params(family.build(cfg))))
    keys = iter(jax.random.split(jax.random.key(0), 100))
    adapters = jax.tree.map(lambda s: 0.2 * jax.random.normal(next(keys), s.shape), adapters)
    toks = tokens()
    ours = np.asarray(family.build(cfg).apply({"params": lora.combine(params, adapters)}, toks))
    spec = hf_specs.for_model(model.cfg)
    tensors, modules = lora_export.peft_tensors(spec, cfg, jax.device_get(adapters))
    lora_cfg = ml_collections.ConfigDict({"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0}})
    out.mkdir()
    lora_export.safetensors_io.write_file(str(out / lora_export.ADAPTER_WEIGHTS), tensors)
    targets = lora_export.target_modules(spec, cfg, modules)
    files.write_json(str(out / lora_export.ADAPTER_CONFIG), lora_export.adapter_config(lora_cfg, targets, str(src)))
    assert targets == sorted(HF_MODULES)

    before = torch_logits(tmodel, toks)
    theirs = torch_logits(peft.PeftModel.from_pretrained(tmodel, str(out)).eval(), toks)
    diff = float(np.abs(theirs - ours).max())
    print(f"\ngemma2: adapters move logits by {np.abs(theirs - before).max():.3f}; PEFT vs ours {diff:.2e}")
    assert np.abs(theirs - before).max() > 0.1
    assert diff < 1e-4

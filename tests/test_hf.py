"""Hugging Face interop: small random transformers GPT-2 / Llama models, imported, exported, compared.

Needs the `hf` extra (torch, transformers, safetensors); skipped with the reason when missing.
Run with `-s` to see the largest logit difference per case.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF interop tests need the 'hf' extra: pip install -e .[hf]")
transformers = pytest.importorskip("transformers", reason="HF interop tests need the 'hf' extra: pip install -e .[hf]")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="HF interop tests need the 'hf' extra")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llm_jax.interop import hf  # noqa: E402
from llm_jax.runtime import sharding  # noqa: E402
from llm_jax.training import loop  # noqa: E402
from llm_jax.training.saved_run import load_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96


def make_hf(path, kind, max_shard_size=None, **kw):
    """A random float32 transformers model saved (safetensors) to `path`; returns the torch model.

    Every parameter is perturbed (norm scales and biases too), so a swapped or dropped tensor shows.
    """
    torch.manual_seed(0)
    if kind == "gpt2":
        base = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**base, **kw}))
    else:
        base = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
        )
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def tokens(batch=2, length=24, vocab=VOCAB, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


def read_tensors(d):
    files = hf.SafetensorsDir(str(d)).tensors
    return {k: np.asarray(v) for k, v in files.items()}


def assert_same_tensors(a, b, ignore=()):
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


CASES = {
    # name: (kind, transformers config, load_pretrained overrides, save kwargs)
    "gpt2-tied": ("gpt2", {}, {}, {}),
    "gpt2-untied-scan": ("gpt2", {"tie_word_embeddings": False, "n_inner": 48}, {"scan_layers": True}, {}),
    "llama-gqa-untied-mlpbias-llama3rope-scan": (
        "llama",
        {
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "mlp_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        {"scan_layers": True},
        {},
    ),
    "llama-tied-bias-linearrope-headdim-sharded-files": (
        "llama",
        {
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
            "head_dim": 16,
            "attention_bias": True,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
        {},
        {"max_shard_size": "20KB"},
    ),
}
MAX_DIFF = {}


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_torch_and_export_roundtrips(tmp_path, name):
    kind, hf_kw, overrides, save_kw = CASES[name]
    src = tmp_path / "src"
    tmodel = make_hf(src, kind, **save_kw, **hf_kw)
    if save_kw:
        assert (src / hf.INDEX_FILE).exists()
    toks = tokens()
    ref = torch_logits(tmodel, toks)

    model, params = hf.load_pretrained(str(src), **overrides)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, toks))
    assert ours.shape == (2, 24, VOCAB) and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    MAX_DIFF[name] = diff
    print(f"\n{name}: max |logit diff| llm_jax vs transformers = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff < 1e-4

    # import -> export: the same tensors, and transformers computes the same logits from them.
    out = tmp_path / "out"
    hf.save_pretrained(str(out), model.cfg, params)
    ignore = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    assert_same_tensors(read_tensors(src), read_tensors(out), ignore)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is type(tmodel)
    rt = float(np.abs(torch_logits(back, toks) - ref).max())
    assert rt <= 1e-5
    assert float(np.abs(torch_logits(back, toks) - ours).max()) < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_export_native_model(tmp_path, kind):
    """A model initialised by llm_jax (not from HF) -> save_pretrained -> from_pretrained: same logits."""
    from llm_jax.models.model import ModelConfig, TransformerLM

    arch = (
        dict(
            positions="rope",
            norm="rmsnorm",
            mlp_activation="swiglu",
            use_bias=False,
            tie_embeddings=False,
            num_kv_heads=2,
            rope_theta=500000.0,
        )
        if kind == "llama"
        else {}
    )
    cfg = ModelConfig(
        vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=32, init_std=0.1, **arch
    )
    model = TransformerLM(cfg)
    # Random everything (norm scales and biases too), drawn on the host for the model's param shapes.
    rng = np.random.RandomState(2)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (path[-1].key == "scale") + 0.2 * rng.standard_normal(x.shape).astype(np.float32),
        nn.meta.unbox(hf.abstract_params(model)),
    )
    toks = tokens(vocab=128)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, toks))
    hf.save_pretrained(str(tmp_path), cfg, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    diff = float(np.abs(torch_logits(back, toks) - ours).max())
    print(
        f"\nllm_jax {kind} exported: max |logit diff| transformers vs llm_jax = {diff:.3g} "
        f"(logits up to {np.abs(ours).max():.2f})"
    )
    assert diff < 1e-5
    again = hf.load_pretrained(str(tmp_path))[1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), params)


def test_sharded_import_on_mesh(tmp_path):
    """fsdp=2 x tensor=4 on the 8 CPU devices: every param born in its shards, logits unchanged."""
    src = tmp_path / "src"
    tmodel = make_hf(src, "llama", vocab_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    mesh = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=2, tensor=4))
    model, params = hf.load_pretrained(str(src), mesh=mesh, scan_layers=True)
    q = params["layers"]["attn"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 8)}
    emb = params["embed"]["embedding"]  # [vocab, embed]
    assert {s.data.shape for s in emb.addressable_shards} == {(32, 16)}
    # Every parameter, not only those two: the model's own logical shardings, shard by shard.
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    want = sharding.boxed_shardings(boxed, mesh, sharding.LOGICAL_RULES)
    for (path, x), w in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(w, x.ndim), (jax.tree_util.keystr(path), x.sharding, w)
        assert {s.data.shape for s in x.addressable_shards} == {w.shard_shape(x.shape)}, jax.tree_util.keystr(path)
    full = tmodel.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy().T.reshape(32, 8, 8)
    for s in q.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data)[1], full[s.index[1:]])
    toks = tokens(vocab=128)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, toks))
    diff = float(np.abs(ours - torch_logits(tmodel, toks)).max())
    print(f"\nllama on mesh fsdp=2,tensor=4: max |logit diff| = {diff:.3g}")
    assert diff < 1e-4

    bad = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=1, tensor=8))
    with pytest.raises(hf.HFError, match="does not split over mesh axes"):
        hf.load_pretrained(str(src), mesh=bad)  # 4 kv heads over 8 tensor devices


def test_refuses_pickles_and_unsupported_configs(tmp_path):
    src = tmp_path / "src"
    make_hf(src, "gpt2")
    cfg = json.loads((src / "config.json").read_text())

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(hf.HFError, match=r"pytorch_model\.bin.*never unpickles"):
        hf.load_pretrained(str(pickled))

    def bad(**changes):
        d = tmp_path / "bad"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return str(d)

    with pytest.raises(hf.HFError, match="architectures=.*OlmoeForCausalLM"):
        hf.load_pretrained(bad(architectures=["OlmoeForCausalLM"]))
    with pytest.raises(hf.HFError, match="activation_function='relu'"):
        hf.load_pretrained(bad(activation_function="relu"))
    with pytest.raises(hf.HFError, match="scale_attn_by_inverse_layer_idx"):
        hf.load_pretrained(bad(scale_attn_by_inverse_layer_idx=True))
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }
    with pytest.raises(hf.HFError, match=r"rope_scaling\.rope_type='yarn'"):
        hf.model_config_from_hf({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(hf.HFError, match="hidden_act='gelu'"):
        hf.model_config_from_hf({**llama, "hidden_act": "gelu"})
    # A checkpoint with a tensor the layout does not know is an error, not silently dropped.
    extra = tmp_path / "extra"
    make_hf(extra, "gpt2")
    tensors = read_tensors(extra)
    tensors["transformer.h.0.attn.q_norm.weight"] = np.ones(8, np.float32)
    safetensors_numpy.save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFError, match="q_norm"):
        hf.load_pretrained(str(extra))


def test_bare_backbone_names_and_misfit_shapes(tmp_path):
    """Old uploads name the backbone's tensors without 'transformer.': they import the same; a tensor
    whose shape contradicts config.json is an error naming it."""
    src = tmp_path / "src"
    tmodel = make_hf(src, "gpt2", tie_word_embeddings=False)
    bare = {k.removeprefix("transformer."): v for k, v in read_tensors(src).items()}
    assert "h.0.attn.c_attn.weight" in bare and "lm_head.weight" in bare
    safetensors_numpy.save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, params = hf.load_pretrained(str(src))
    toks = tokens()
    assert float(np.abs(np.asarray(model.apply({"params": params}, toks)) - torch_logits(tmodel, toks)).max()) < 1e-4

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "n_head": 8, "n_embd": 64}))
    with pytest.raises(hf.HFError, match=r"tensor h\.0\.attn\.c_attn\.weight is \(32, 96\).*\(64, 192\)"):
        hf.load_pretrained(str(src))


def _tokenizer_json(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.path)\n" * 50], trainer)
    return tok


def _load_config_file(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_run_import_finetune_export(tmp_path):
    """from_hf -> llm_jax.main fine-tunes (2 steps) -> to_hf -> transformers matches the trained params."""
    src, work, out0, out = tmp_path / "src", tmp_path / "run", tmp_path / "out0", tmp_path / "out"
    tok = _tokenizer_json(300)
    vocab = tok.get_vocab_size()
    tmodel = make_hf(src, "llama", vocab_size=vocab, num_hidden_layers=1, tie_word_embeddings=True)
    tok.save(str(src / "tokenizer.json"))

    config = hf.run_config(str(src))
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    hf.import_run(str(src), str(work), config)
    assert (work / "checkpoints" / "0").is_dir() and (work / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((work / "config.json").read_text())["model"]["vocab_size"] == vocab

    hf.export_run(str(work), str(out0))  # step 0: exactly the imported tensors
    assert_same_tensors(read_tensors(src), read_tensors(out0))
    assert json.loads((out0 / "config.json").read_text())["eos_token_id"] == 1

    finetune = _load_config_file("hf_finetune").get_config(f"{work},tiny")
    assert finetune.model.vocab_size == vocab and finetune.model.vocab_multiple == 1
    metrics = loop.train_and_evaluate(finetune, str(work))
    assert metrics["step"] == 2

    # The command line, as documented in llm_jax/convert.py.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    subprocess.run(
        [sys.executable, "-m", "llm_jax.convert", "to_hf", "--workdir", str(work), "--hf_dir", str(out)],
        check=True,
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
    )
    run = load_run(str(work), on_host=True)
    params, step = run.params, run.step
    assert step == 2
    changed = read_tensors(out)["model.layers.0.mlp.up_proj.weight"]
    assert not np.array_equal(changed, read_tensors(src)["model.layers.0.mlp.up_proj.weight"])
    toks = tokens(vocab=vocab)
    ours = np.asarray(jax.jit(run.model.apply)({"params": params}, toks))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert float(np.abs(torch_logits(back, toks) - ours).max()) < 1e-4
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast.encode("def f(x):") == tok.encode("def f(x):").ids
    del tmodel


def test_export_never_destroys(tmp_path, monkeypatch):
    """to_hf refuses the run itself, the directory it was imported from and another directory's files
    (each refusal changes nothing anywhere); it replaces an earlier export of the same run whole, and
    a write that fails midway (a full disk) leaves that earlier export as it was."""
    import errno

    import runlib as R

    from llm_jax.interop import hf_export, safetensors_io
    from llm_jax.runtime.errors import AlreadyExists, BadValue, FileError

    src, work, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    tok = _tokenizer_json(300)
    make_hf(src, "gpt2", vocab_size=tok.get_vocab_size(), n_layer=1)
    tok.save(str(src / "tokenizer.json"))
    hf.import_run(str(src), str(work), hf.run_config(str(src)), log=lambda m: None)
    hf.export_run(str(work), str(out), log=lambda m: None)
    assert json.loads((out / hf_export.MARKER).read_text())["step"] == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")

    def snapshots():
        return {d: R.snapshot(str(tmp_path / d)) for d in ("src", "run", "out", "notes")}

    before = snapshots()
    refusals = [
        (work, BadValue, r"is the run's --workdir"),
        (work / "hf", BadValue, r"is inside the run's --workdir"),
        (tmp_path, BadValue, r"holds the run's --workdir"),
        (src, BadValue, r"is the directory this run was imported from"),
        (tmp_path / "notes", AlreadyExists, r"is not empty \(todo\.txt\) and is not an export of .*--overwrite"),
        (tmp_path / "afile", AlreadyExists, r"is a file, not a directory"),
    ]
    for target, error, match in refusals:
        with pytest.raises(error, match=rf"^--hf_dir={target} {match}"):
            hf.export_run(str(work), str(target), overwrite=error is BadValue)  # --overwrite never allows these
        assert snapshots() == before, f"refusing {target} changed something"

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors_io, "_save", full_disk)
        with pytest.raises(FileError, match=r"No space left on device\); .*out was left as it was"):
            hf.export_run(str(work), str(out), log=lambda m: None)  # one line for the command to print
    assert snapshots() == before, "a failed export leaves the earlier one whole"
    assert sorted(os.listdir(tmp_path)) == ["afile", "notes", "out", "run", "src"], "no temporary left behind"

    logs = []
    hf.export_run(str(work), str(tmp_path / "notes"), overwrite=True, log=logs.append)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("notes.old-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "todo.txt").read_text() == "mine", "moved aside, not deleted"
    assert (
        logs[0] == f"moved what was in {tmp_path / 'notes'} to {tmp_path / aside[0]} (--overwrite; nothing was deleted)"
    )
    hf.export_run(str(work), str(out), log=lambda m: None)  # an earlier export of this run: replaced
    assert_same_tensors(read_tensors(src), read_tensors(out))
    assert not any(".old-" in n or ".tmp" in n for n in os.listdir(tmp_path) if n.startswith("out"))

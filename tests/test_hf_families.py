"""Parity of today's open architectures with transformers: Llama 3.x, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), and the mixtures of experts Mixtral and Qwen3-MoE.

For each, a small random transformers model (built offline from its config class: odd sizes,
grouped-query attention, a decoupled head_dim, every optional feature of the architecture on and
made to bite: sliding windows shorter than the generation, soft-caps low enough to squash) is
saved, imported, and must give transformers' logits to 1e-4 (float32), the same 32 greedy tokens
with the KV cache (past the sliding window), and after export the same logits again through
`from_pretrained`.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm_jax.inference import decode  # noqa: E402
from llm_jax.interop import hf  # noqa: E402

VOCAB = 101
PROMPT, NEW = 8, 32
WINDOW = 6  # shorter than PROMPT + NEW: generation runs past it
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,  # 4 * 12 != 40: decoupled from the width
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"]

# name: (config class, its fields on top of _SIZES, the ModelConfig fields the import must set)
ARCHS = {
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=True,
        ),
        dict(rope_scaling="llama3"),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), dict(layer_pattern="l", sliding_window=WINDOW)),
    "qwen2": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        dict(layer_pattern="gll", attention_bias=True, attention_out_bias=False),
    ),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True), dict(qk_norm=True, layer_pattern="g")),
    "gemma2": (
        "Gemma2Config",
        dict(
            sliding_window=WINDOW,
            query_pre_attn_scalar=10,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
        dict(layer_pattern="lg", attn_softcap=2.0, final_softcap=3.0, post_norms=True, norm_plus_one=True),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            sliding_window=WINDOW,
            layer_types=_LAYERS,
            query_pre_attn_scalar=10,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
        dict(layer_pattern="llg", qk_norm=True, local_rope_theta=100.0, rope_scaling="linear", embed_scale=True),
    ),
    # Mixture of experts: 5 experts, top 2 (renormalised), in every layer, past a sliding window.
    "mixtral": (
        "MixtralConfig",
        dict(sliding_window=WINDOW, num_local_experts=5, num_experts_per_tok=2),
        dict(num_experts=5, experts_per_token=2, norm_topk=True, layer_pattern="l", moe_first_dense=0),
    ),
    # 6 experts of their own size, top 3 not renormalised, the first layer dense.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=28, mlp_only_layers=[0], norm_topk_prob=False),
        dict(num_experts=6, experts_per_token=3, norm_topk=False, expert_mlp_dim=28, moe_first_dense=1, qk_norm=True),
    ),
}


def make_model(path, name, **overrides):
    """The random transformers model of `name`, saved to `path` (safetensors); returns it."""
    cls, fields, _ = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**_SIZES, **fields, **overrides})
    config._attn_implementation = "eager"  # the reference: soft-capping and windows exactly as written
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # norm scales and biases too: a dropped tensor shows
    model.eval()
    model.save_pretrained(path)
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def tokens(batch=2, length=24, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_greedy_generation_and_export_match_transformers(tmp_path, name):
    src = tmp_path / "src"
    tmodel = make_model(src, name)
    model, params = hf.load_pretrained(str(src))
    for field, value in ARCHS[name][2].items():
        assert getattr(model.cfg, field) == value, field

    toks = tokens()
    ref = torch_logits(tmodel, toks)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, toks))
    diff = float(np.abs(ours - ref).max())
    print(f"\n{name}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff < 1e-4

    prompt = toks[:, :PROMPT]
    with torch.no_grad():
        want = tmodel.generate(torch.as_tensor(prompt), max_new_tokens=NEW, do_sample=False)[:, PROMPT:].numpy()
    tokens_, start = decode.left_pad(prompt.tolist())
    got = decode.generate(model, params, tokens_, start, jax.random.key(0), max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)

    out = tmp_path / "out"
    hf.save_pretrained(str(out), model.cfg, params)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [type(tmodel).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(back) is type(tmodel)
    back_diff = float(np.abs(torch_logits(back, toks) - ref).max())
    print(f"{name}: {NEW} greedy tokens equal; exported -> from_pretrained: max |logit diff| = {back_diff:.2e}")
    assert back_diff < 1e-5


def _tokenizer(path):
    """A byte-level BPE tokenizer.json trained on a little code (about 300 tokens), saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.path)\n" * 50], trainer)
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "gemma2"])
def test_imported_model_fine_tunes_resumes_samples_and_exports(tmp_path, name):
    """from_hf -> llm_jax.main fine-tunes 2 steps -> resumes to 3 -> samples -> to_hf: transformers
    gives the fine-tuned model's logits and greedy tokens. (Qwen3 and Gemma 3 go through the same
    flow with a chat template and messages in tests/test_chat.py.)"""
    import importlib.util
    import os

    from llm_jax.training import loop
    from llm_jax.training.saved_run import load_run

    src, work, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    src.mkdir()
    vocab = _tokenizer(src)
    make_model(src, name, vocab_size=vocab)
    config = hf.run_config(str(src))
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    hf.import_run(str(src), str(work), config, log=lambda *a: None)

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hf_finetune.py")
    spec = importlib.util.spec_from_file_location("hf_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    finetune = module.get_config(f"{work},tiny")
    assert loop.train_and_evaluate(finetune, str(work))["step"] == 2
    finetune.train.num_steps = 3
    resumed = loop.train_and_evaluate(finetune, str(work))
    assert resumed["step"] == 3 and isinstance(resumed["sample"], str) and resumed["sample"]

    hf.export_run(str(work), str(out), log=lambda *a: None)
    run = load_run(str(work), on_host=True)
    toks = tokens(length=16) % vocab
    ours = np.asarray(jax.jit(run.model.apply)({"params": run.params}, toks))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert float(np.abs(torch_logits(back, toks) - ours).max()) < 1e-4
    prompt = toks[:, :PROMPT]
    with torch.no_grad():
        want = back.generate(torch.as_tensor(prompt), max_new_tokens=16, do_sample=False)[:, PROMPT:].numpy()
    tokens_, start = decode.left_pad(prompt.tolist())
    got = decode.generate(run.model, run.params, tokens_, start, jax.random.key(0), max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)

"""Evaluation (llm_jax/evaluation/): the lm-eval backend against lm-eval's own `hf` backend on the same
small random checkpoints (GPT-2 and Llama, each with a BPE tokenizer built offline), the perplexity
command against rolling log-likelihoods, and the same numbers on 1 and 8 devices.

Needs the `eval` extra (lm-eval, accelerate) and the `hf` extra (torch, transformers) for the
reference backend; skipped with the reason when missing. The tasks are local files in
tests/eval_tasks/ (multiple choice, generation, rolling text), so nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="evaluation tests need the 'eval' extra: pip install -e .[eval]")
torch = pytest.importorskip(
    "torch", reason="the lm-eval hf reference backend needs the 'hf' extra: pip install -e .[hf]"
)
transformers = pytest.importorskip("transformers", reason="the reference backend needs the 'hf' extra")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llm_jax.evaluation import harness, perplexity, scoring  # noqa: E402
from llm_jax.interop import hf  # noqa: E402
from llm_jax.runtime import sharding  # noqa: E402
from llm_jax.training.saved_run import load_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "eval_tasks")
MAX_LEN = 48  # short, so that the longer requests are left-truncated


def _tokenizer(kind):
    """A byte-level BPE trained here; the Llama one prepends <s> through its template, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with open(os.path.join(TASKS, "mc.jsonl"), encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text, "def f(x):\n    return x + 1\n" * 20], trainer)
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def _checkpoint(root, kind):
    """(HF directory, imported llm_jax workdir) of a random float32 model of `kind`."""
    src, work = root / f"{kind}_hf", root / f"{kind}_run"
    tok = _tokenizer(kind)
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than init, so the choices' log-likelihoods differ clearly
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (src / "tokenizer_config.json").write_text(json.dumps(special))
    config = hf.run_config(str(src))
    hf.import_run(str(src), str(work), config, log=lambda *a: None)
    return str(src), str(work)


# Llama repeats GPT-2's checks with a tokenizer that adds BOS: in the full suite (CI's 3.11 pass), not in -m "not slow".
@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def checkpoint(request, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("eval"), request.param)


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=TASKS, include_defaults=False)  # the local tasks only: quick to index


@pytest.fixture(scope="module")
def results(checkpoint, task_manager):
    """(ours, lm-eval hf backend's) results of the three local tasks, with every sample's responses."""
    src, work = checkpoint
    ref = HFLM(pretrained=src, batch_size=4, device="cpu", dtype="float32")
    return tuple(_evaluate(lm, task_manager) for lm in (harness.LlmJaxLM(load_run(work), batch_size=4), ref))


def _evaluate(model, task_manager):
    return lm_eval.simple_evaluate(
        model=model, tasks=["llm_jax_mc", "llm_jax_gen", "llm_jax_text"], task_manager=task_manager,
        log_samples=True, bootstrap_iters=0, verbosity="ERROR",
    )  # fmt: skip


def _resps(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] if isinstance(r, list) else r for r in s["resps"]] for s in samples]


def test_loglikelihoods_and_generations_equal_lm_eval_hf_backend(results):
    """Per request: the same log-likelihood (to 1e-4), the same greedy flag, the same accuracy on the
    multiple-choice task, and the same generated text, cut where HF's stops."""
    ours, ref = results
    mine, theirs = _resps(ours, "llm_jax_mc"), _resps(ref, "llm_jax_mc")
    assert len(mine) == 13 and all(len(m) == 4 for m in mine)
    a = np.array([[ll for ll, _ in m] for m in mine])
    b = np.array([[ll for ll, _ in m] for m in theirs])
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    assert [[g for _, g in m] for m in mine] == [[g for _, g in m] for m in theirs]
    assert len(set(np.round(a, 3).ravel())) > 40  # the choices really differ: a discriminating test
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["llm_jax_mc"][metric] == ref["results"]["llm_jax_mc"][metric]
    gen_ours, gen_ref = _resps(ours, "llm_jax_gen"), _resps(ref, "llm_jax_gen")
    assert gen_ours == gen_ref
    assert any(g[0] for g in gen_ours)  # something was generated


def test_rolling_loglikelihood_equals_perplexity_command(results, checkpoint, tmp_path):
    """The rolling task's bits per byte: ours = HF backend's = `llm_jax.evaluate --perplexity` over the
    same texts (the command line, as a user runs it)."""
    ours, ref = (r["results"]["llm_jax_text"]["bits_per_byte,none"] for r in results)
    assert abs(ours - ref) < 1e-6
    with open(os.path.join(TASKS, "text.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    out, work = tmp_path / "ppl.json", checkpoint[1]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "llm_jax.evaluate", "--workdir", work, "--perplexity", str(tmp_path / "doc*.txt")]
    proc = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits per byte" in proc.stdout
    got = json.loads(out.read_text())
    assert got["documents"] == 3 and got["bytes"] == sum(len(t.encode()) for t in texts)
    assert abs(got["bits_per_byte"] - ours) < 1e-6
    with open(os.path.join(work, "metrics.jsonl"), encoding="utf-8") as f:  # and a line in the run's metrics
        assert any("perplexity/bits_per_byte" in json.loads(line) for line in f)


def _mesh(data, fsdp, n):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": 1}), jax.devices()[:n])


@pytest.mark.parametrize("checkpoint", ["gpt2"], indirect=True)  # the mesh code is the same for Llama
def test_same_scores_on_1_and_8_devices_and_data_x_fsdp(checkpoint):
    """Log-likelihoods, rolling log-likelihoods and generations on one device, 8 data-parallel and
    2 data x 4 fsdp (the params sharded): the same to float rounding, the same greedy flags and texts."""
    _, work = checkpoint
    requests = [([5, 6, 7] * k, [8, 9, 10][: 1 + k % 3]) for k in range(1, 23)]  # up to 66 tokens: truncated too
    docs = [list(range(2, 2 + n)) for n in (3, 50, 120)]
    got = []
    for data, fsdp, n in ((1, 1, 1), (8, 1, 8), (2, 4, 8)):
        run = load_run(work, mesh=_mesh(data, fsdp, n))
        scorer = scoring.Scorer(run.model, run.params, run.mesh, run.rules, run.context, batch_size=8)
        lm = harness.LlmJaxLM(run, batch_size=8)
        texts = lm._generate_group(["def f(x):", "import os", "x"], {"until": ["\n"], "max_gen_toks": 6})
        got.append(
            (scoring.loglikelihoods(scorer, requests), perplexity.rolling_loglikelihoods(scorer, docs, 1), texts)
        )
    for other in got[1:]:
        np.testing.assert_allclose([x for x, _ in other[0]], [x for x, _ in got[0][0]], rtol=0, atol=1e-5)
        assert [g for _, g in other[0]] == [g for _, g in got[0][0]]
        np.testing.assert_allclose(other[1], got[0][1], rtol=1e-6)
        assert other[2] == got[0][2]


@pytest.mark.slow  # a whole (tiny) training run
def test_training_evaluates_tasks_logs_them_and_plot_draws_them(tmp_path):
    """config.train.eval_tasks: scores at every eval_tasks_every steps and at the end, in metrics.jsonl,
    in the picture's task panel; an unknown task fails before training; the bare loop refuses the key."""
    import runlib as R

    from llm_jax.evaluation import periodic
    from llm_jax.runtime.errors import BadValue
    from llm_jax.tools import plot
    from llm_jax.training import loop

    corpus = R.write_corpus(str(tmp_path / "corpus.txt"), 20_000)
    tasks = {"train.eval_tasks": os.path.join(TASKS, "llm_jax_mc.yaml"), "train.eval_tasks_every": 2}
    config = R.tiny_config(R.tiny_overrides(corpus, 3, 3, **tasks, **{"train.eval_tasks_limit": 5}))
    with pytest.raises(BadValue, match="needs the evaluation layer"):
        loop.train_and_evaluate(config, str(tmp_path / "bare"))
    bad = R.tiny_config(R.tiny_overrides(corpus, 3, 3, **{"train.eval_tasks": "llm_jax_mcq,no_such_task"}))
    with pytest.raises(BadValue, match=r"unknown lm-eval task\(s\) llm_jax_mcq, no_such_task"):
        periodic.train_and_evaluate(bad, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")  # refused before the workdir was made
    work = str(tmp_path / "run")
    summary = periodic.train_and_evaluate(config, work)
    acc = R.metric(work, "tasks/llm_jax_mc/acc")
    assert [s for s, _ in acc] == [2, 3] and all(0 <= v <= 1 for _, v in acc)
    assert summary["tasks/llm_jax_mc/acc"] == acc[-1][1]
    fig = plot.figure([work])
    panel = next(ax for ax in fig.axes if ax.get_title() == "lm-eval tasks")
    assert {line.get_label() for line in panel.get_lines()} == {"run llm_jax_mc/acc", "run llm_jax_mc/acc_norm"}


@pytest.mark.slow
@pytest.mark.shared_data
def test_eval_bench_smoke(shakespeare_path):
    """experiments/eval_bench.py on a tiny model: both backends answer every mode alike, JSON last."""
    env = {**os.environ, "PYTHONPATH": REPO, "LLM_JAX_DATA": os.path.dirname(os.path.dirname(shakespeare_path))}
    tiny = ["--docs=3", "--repeats=1", "--layers=1", "--width=32", "--heads=2", "--vocab=300", "--max_len=96"]
    cmd = [sys.executable, os.path.join(REPO, "experiments", "eval_bench.py"), *tiny, "--batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mc"]["requests"] == 12 and out["mc"]["max_abs_loglikelihood_diff"] < 1e-4
    assert out["single"]["max_abs_loglikelihood_diff"] < 1e-4 and out["gen"]["identical_generations"] == 1.0
    assert all(out[m]["llm_jax_requests_per_sec"] > 0 and out[m]["hf_requests_per_sec"] > 0 for m in ("mc", "gen"))

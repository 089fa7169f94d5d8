"""Prompt-completion fine-tuning data (config.data.source='jsonl'): parsing and its errors, the
loss mask, packing, splits, and a short training run that learns the completions."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest
from decode_fixtures import qa_run, write_upper_jsonl

from llm_jax.data import lm_data as data_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime.errors import BadValue, NotFound


def jsonl_cfg(path, **kw):
    base = dict(
        source="jsonl",
        path=str(path),
        val_path="",
        val_fraction=0.1,
        tokenizer="byte",
        vocab_size=0,
        tokenizer_path="",
        seq_len=32,
    )
    return ml_collections.ConfigDict({**base, **kw})


def test_weights_mark_completions_and_eos_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"prompt": "Q: 1+1?\nA:", "completion": " 2"},
                {"prompt": "Q: sky?\nA:", "completion": " blue", "source": "extra fields are ignored"},
                {"prompt": "Q: x?\nA:", "completion": ""},
            ]
            * 4
        )
        + "\n\n"
    )
    data = data_lib.load_data(jsonl_cfg(path), log=lambda *a: None)
    tok = data.tokenizer
    assert len(data.train_examples) == 11 and len(data.val_examples) == 1  # last 10% (at least one)
    tokens, mask, truncated = data.rows("train", 32)
    assert tokens.shape[1] == 33 and truncated == 0
    eos = tok.eos_id
    learned = tokens[mask]
    # The learned tokens are exactly each completion followed by EOS; prompts and padding are never learned.
    text = tok.decode([t if t != eos else ord("|") for t in learned])
    assert text == "|".join([" 2", " blue", ""] * 4)[: len(text)] and text.count("|") == 11
    assert not mask[tokens == ord("Q")].any()
    batch = data.train_batch(3, 4, 32, seed=0)
    assert set(batch) == {"inputs", "targets", "weights"} and batch["weights"].shape == (4, 32)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for row_t, row_w in zip(batch["targets"], batch["weights"]):
        learned_text = tok.decode([t for t, w in zip(row_t, row_w) if w and t != eos])
        assert "Q" not in learned_text and "A:" not in learned_text
    # A pure function of (seed, step), like LMData.
    np.testing.assert_array_equal(data.train_batch(3, 4, 32, seed=0)["inputs"], batch["inputs"])
    evals = data.eval_batches(2, 4, 32, seed=0)
    assert len(evals) == 2 and evals[0]["weights"].sum() > 0


def test_long_examples_keep_their_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "x" * 50, "completion": "abc"})
        + "\n"
        + json.dumps({"prompt": "p", "completion": "q"})
        + "\n"
    )
    data = data_lib.load_data(jsonl_cfg(path, val_path=str(path)), log=lambda *a: None)
    tokens, mask, truncated = data.rows("train", 16)
    assert truncated == 1
    assert data.tokenizer.decode(tokens[0][mask[0]]) == "abc" and tokens[0][-1] == data.tokenizer.eos_id


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": "b"', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing field 'completion'"),
        ('{"prompt": 3, "completion": "b"}', "field 'prompt' must be a string"),
    ],
)
def test_malformed_lines_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n")
    with pytest.raises(BadValue, match=f"bad.jsonl:3: {message}"):
        data_lib.read_jsonl_examples(str(path))


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        data_lib.load_data(jsonl_cfg(tmp_path / "missing.jsonl"))
    (tmp_path / "bytes.jsonl").write_bytes(b'{"prompt": "\xff", "completion": ""}\n')
    with pytest.raises(BadValue, match="bytes.jsonl:1: not UTF-8"):
        data_lib.read_jsonl_examples(str(tmp_path / "bytes.jsonl"))
    (tmp_path / "one.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(BadValue, match="too few"):
        data_lib.load_data(jsonl_cfg(tmp_path / "one.jsonl"))
    write_upper_jsonl(str(tmp_path / "u.jsonl"), 20)
    with pytest.raises(BadValue, match="has none"):  # a char vocabulary has no EOS to end completions
        cfg = jsonl_cfg(tmp_path / "u.jsonl")
        cfg.tokenizer = "char"
        data_lib.load_data(cfg)


def test_training_learns_completions():
    """40 steps on 'up abc =' -> ' ABC': the completion-only validation loss falls far below chance."""
    workdir, metrics = qa_run()
    chance = math.log(384)  # byte vocabulary padded to 384: the loss of the initial, near-uniform model
    assert metrics["eval/loss"] < 0.6 * chance, metrics
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [m["train/loss"] for m in map(json.loads, f) if "train/loss" in m]
    assert losses[-1] < losses[0]
    assert tok_lib.load(os.path.join(workdir, "tokenizer")).kind == "byte"

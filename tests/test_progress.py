"""Progress and ETA of long preprocessing (llm_jax/data/progress.py) and its use by the tokenizer and data code:
reports when work takes a while, silence when it does not, and the same results either way."""

import numpy as np
import pytest

from llm_jax.data import parallel as seq2seq
from llm_jax.data import progress
from llm_jax.data import tokenizer as tok_lib


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_reports_fraction_elapsed_and_eta():
    lines, clock = [], Clock()
    p = progress.Progress("tokenizing", total=1000, unit="chars", log=lines.append, every=10, clock=clock)
    clock.t = 5
    p.update(100)
    assert lines == []  # not due yet
    clock.t = 10
    p.update(150)  # 250 of 1000 in 10 s: 30 s left
    assert lines == ["tokenizing: 25% (250/1.0k chars) | 10s | eta 30s"]
    clock.t = 200
    p.update(750)
    p.close()
    assert lines[-2:] == [
        "tokenizing: 100% (1.0k/1.0k chars) | 3m20s | eta 0s",
        "tokenizing: done, 1.0k chars in 3m20s",
    ]


def test_quick_work_is_silent_and_unknown_totals_count():
    lines = []
    p = progress.Progress("quick", total=10, log=lines.append, every=60)
    p.update(10)
    p.close()
    assert lines == []
    clock = Clock()
    q = progress.Progress("reading", total=None, unit="docs", log=lines.append, every=0, clock=clock)
    clock.t = 3725
    q.update(2_500_000)
    assert lines == ["reading: 2.5M docs | 1h02m"]
    assert list(progress.track([1, 2, 3], "x", log=lines.append, every=0, size=lambda v: v)) == [1, 2, 3]
    assert lines[-2:] == ["x: 100% (6/6) | 0s | eta 0s", "x: done, 6 in 0s"]


@pytest.fixture
def report_everything(monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)


def test_sentencepiece_training_reports_merges_and_trains_the_same_model(report_everything):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(3, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(3000)]
    lines = []
    quiet = tok_lib.SentencePieceTokenizer.train(texts, 1200, prose=True)
    loud = tok_lib.SentencePieceTokenizer.train(texts, 1200, prose=True, log=lines.append)
    assert loud.proto == quiet.proto
    assert any(line.startswith("sentencepiece: merging pieces: ") and "eta" in line for line in lines)
    assert any(line.startswith("sentencepiece: reading text: ") for line in lines)
    assert lines[-1].startswith("sentencepiece: merging pieces: done")


def test_parallel_encoding_in_blocks_equals_one_block(report_everything):
    src = [f"a man number {i}" for i in range(50)] + ["", "x " * 40]
    tgt = [f"ein mann nummer {i}" for i in range(50)] + ["leer", "y"]
    tok = tok_lib.SentencePieceTokenizer.train(src + tgt, 400, prose=True)
    lines = []
    one = seq2seq.encode_split(src, tgt, tok, 16)
    blocks = seq2seq.encode_split(src, tgt, tok, 16, lines.append, "data: tokenizing train", block=7)
    assert [a.tolist() for a in one.source] == [a.tolist() for a in blocks.source]
    assert [a.tolist() for a in one.target] == [a.tolist() for a in blocks.target]
    assert (blocks.empty, blocks.too_long) == (1, 1)
    assert lines[-1] == "data: tokenizing train: done, 51 pairs in 0s"

"""Huge or hostile text (llm_jax/data/sources.py, prepare.py): a line longer than a piece is cut,
never read whole; a JSON-lines document over the bound, a lone surrogate, deep nesting, a huge
number and a truncated gzip are one line naming the file and line, and leave the prepared-data
cache as it was; gzip is decompressed once per file; SentencePiece's training text is capped inside
a text too."""

import gzip
import json
import os
import tempfile

import pytest
import runlib as R

from llm_jax.data import lm_data as data_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime.errors import BadValue
from llm_jax.training.config import base_config

QUIET = dict(log=lambda *a: None)


def _cfg(path, cache, **kw):
    c = base_config().data
    c.update(source="text", path=str(path), tokenizer="byte", val_fraction=0.2, cache_dir=str(cache))
    c.update(prepare_shard_mb=0.05, prepare_workers=1)
    c.update(kw)
    return c


def _cache_state(root):
    """R.snapshot of a cache, less its lock files (a lock records who prepares, not what was prepared)."""
    return {k: v for k, v in R.snapshot(str(root)).items() if not k.endswith(".lock")}


@pytest.fixture
def cache(tmp_path):
    """A cache already holding one prepared set (so a refusal must leave it exactly as it is)."""
    good = tmp_path / "good.txt"
    good.write_text("a good line of text\n" * 200)
    prepare_lib.prepare(_cfg(good, tmp_path / "cache"), **QUIET)
    return tmp_path / "cache"


def _refused(path, cache, match, **kw):
    before = _cache_state(cache)
    with pytest.raises(BadValue, match=match):
        prepare_lib.prepare(_cfg(path, cache, **kw), **QUIET)
    assert _cache_state(cache) == before, "a refused prepare must leave the cache as it was"


def test_a_line_longer_than_a_piece_is_cut_at_a_character_boundary(tmp_path):
    path = tmp_path / "one-line.txt"
    text = "h\u00e9llo w\u00f6rld \u2603 " * 20_000  # 2- and 3-byte characters, no line end at all
    path.write_text(text, encoding="utf-8")
    pieces = sources.plan(_cfg(path, tmp_path), 10_000)
    assert len(pieces) > 10 and max(p.hi - p.lo for p in pieces) <= 20_000
    docs = [d for p in pieces for d in sources.read_piece(p)]
    assert "".join(d.text for d in docs) == text  # every cut between two characters
    assert [d.starts_doc for d in docs].count(True) == 2  # train and validation: one document each


def test_max_chars_reads_only_what_it_takes(tmp_path):
    for i in range(3):
        (tmp_path / f"doc-{i}.txt").write_text("x" * 99 + "\n" * 1 + "y" * 100_000)
    pieces = sources.plan(_cfg(str(tmp_path / "doc-*.txt"), tmp_path, max_chars=1000), 1 << 20)
    assert max(p.hi - p.lo for p in pieces) <= 1000, "a piece reads the whole file to keep its first characters"
    texts = [d.text for p in pieces for d in sources.read_piece(p)]
    assert sum(map(len, texts)) <= 1000 + 100 and texts[0].startswith("x" * 99)


def test_a_jsonl_line_over_the_bound_is_refused(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "short"}, {"text": "also short"}, {"text": "z" * 5000}, {"text": "after"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _refused(path, cache, r"docs\.jsonl:3: a line longer than 1,000 bytes; split that document")
    # The prompt-completion reader (source='jsonl') too.
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + json.dumps({"prompt": "p" * 5000}))
    with pytest.raises(BadValue, match=r"examples\.jsonl:2: a line longer than 1,000 bytes"):
        data_lib.read_jsonl_examples(str(examples))


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "ab\\ud800cd"}', r"docs\.jsonl:2: a lone UTF-16 surrogate \\ud800 in a JSON string"),
        ('{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", r"docs\.jsonl:2: JSON nested too deeply"),
        ('{"text": "x", "n": ' + "9" * 5000 + "}", r"docs\.jsonl:2: a JSON integer of 5000 digits"),
    ],
    ids=["lone-surrogate", "deep-nesting", "huge-number"],
)
def test_hostile_json_lines_are_one_line_errors(tmp_path, cache, line, match):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine \\ud83d\\ude00 (a pair is one character)"}\n' + line + "\n")
    _refused(path, cache, match)
    # The prompt-completion reader (source='jsonl') shares the check.
    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"prompt": "p", "completion": "c"}\n' + line.replace('"text"', '"prompt"', 1) + "\n")
    with pytest.raises(BadValue, match=match.replace("docs", "examples")):
        data_lib.read_jsonl_examples(str(examples))


def _gz(path, text: str):
    with gzip.open(path, "wb") as f:
        f.write(text.encode())
    return path


def _gunzip_dirs():
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("llm_jax-gunzip-")}


def test_gzip_is_decompressed_once_per_file(tmp_path, monkeypatch):
    text = "".join(f"line {i} of a compressed corpus\n" for i in range(12_000))  # ~0.4 MB: ~8 pieces
    plain, packed = tmp_path / "corpus.txt", _gz(tmp_path / "corpus.txt.gz", text)
    plain.write_text(text)
    temporary = _gunzip_dirs()
    opened = []
    real_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    directory, manifest, _ = prepare_lib.prepare(_cfg(packed, tmp_path / "a"), **QUIET)
    assert len(manifest["splits"]["train"]["shards"]) > 4 and opened == [str(packed)]
    # The same tokens as the plain file.
    reference, _, _ = prepare_lib.prepare(_cfg(plain, tmp_path / "b"), **QUIET)
    names = sorted(n for n in os.listdir(reference) if n.endswith((".tokens", ".npy")))
    assert names == sorted(n for n in os.listdir(directory) if n.endswith((".tokens", ".npy")))
    for name in names:
        with open(os.path.join(directory, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name
    assert _gunzip_dirs() <= temporary, "the plain copy is removed"


@pytest.mark.parametrize("name", ["corpus.txt.gz", "docs.jsonl.gz"])
def test_truncated_gzip_is_one_line(tmp_path, cache, name):
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(3000)]
    path = _gz(tmp_path / name, "\n".join(lines) + "\n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, cache, rf"{name}: truncated or damaged gzip after line \d+ of its text \(Compressed file ended")


def test_sentencepiece_training_text_is_capped_inside_a_text(monkeypatch):
    seen = []

    class Enough(Exception):
        pass

    def fake_train(spm, log, sentence_iterator, **kwargs):
        seen.extend(sentence_iterator)
        raise Enough

    monkeypatch.setattr(tok_lib, "_train_spm", fake_train)
    with pytest.raises(Enough):  # one text (a whole file) of 100,000 lines; the cap is 1,000 characters
        tok_lib.SentencePieceTokenizer.train(["a line\n" * 100_000], 64, max_chars=1000)
    assert sum(map(len, seen)) == 1000

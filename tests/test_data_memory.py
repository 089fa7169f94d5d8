"""Memory flat in the corpus size (issue 26, point 8), checked by what the code holds rather than
by a measured figure (that one is experiments/data_throughput.py's `--memory`):

- the trainer reads a window's tokens from the shard files and maps none of them: a mapped page
  counts as the process's own once touched, and the kernel maps whole large folios around each
  touch, so random windows over a large corpus made a memory-mapped reader grow with it;
- a prepare task encodes its text in bounded slices (the same ids as the whole text) and writes
  them as it goes, never gathering a whole task's ids;
- locating a character offset scans small blocks (their positions are int64, 8 bytes a byte).
"""

import os

import numpy as np
import pytest

from llm_jax.data import lm_data as data_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.training.config import base_config

TEXT = "".join(f"line {i}: the quick brown fox, ünïcödé {i % 7} 🦊\n" for i in range(3000))


def _cfg(path, cache, **kw):
    c = base_config().data
    c.update(source="text", path=path, tokenizer="char", val_fraction=0.2, cache_dir=str(cache), prepare_shard_mb=0.02)
    c.update(kw)
    return c


def _mapped(suffix: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip().endswith(suffix)]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux: reads /proc/self/maps")
def test_token_files_are_read_not_mapped(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    data = data_lib.load_data(_cfg(str(path), tmp_path / "cache"), log=lambda *a: None)
    assert len(data.train_tokens.shards) > 1
    whole = np.asarray(data.train_tokens)
    batches = [data.train_batch(step, 8, 32, seed=0) for step in range(20)]
    data.eval_batches(3, 8, 32, seed=0)
    assert _mapped(".tokens") == [], "token shards are memory-mapped"
    # The windows are still the stream's: a window that crosses shards included.
    starts = np.random.default_rng([0, 0]).integers(0, len(whole) - 33, size=8)
    np.testing.assert_array_equal(batches[0]["inputs"], np.stack([whole[s : s + 32] for s in starts]))
    crossing = int(data.train_tokens.offsets[1]) - 5
    np.testing.assert_array_equal(data.train_tokens.read(crossing, 10), whole[crossing : crossing + 10])


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_a_task_encodes_bounded_slices_with_the_ids_of_the_whole_text(tmp_path, monkeypatch, kind):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    cfg = _cfg(str(path), tmp_path / "cache", tokenizer=kind, prepare_shard_mb=1.0, val_fraction=0.1)
    tokenizer = prepare_lib.build_tokenizer(cfg, [TEXT])
    tok_lib.save_whole(tokenizer, str(tmp_path / "task" / "tokenizer"))
    pieces = sources.plan(cfg, prepare_lib._piece_bytes(cfg))
    monkeypatch.setattr(prepare_lib, "_ENCODE_CHARS", 1000)
    encoded = []
    encode = type(tokenizer).encode_array
    monkeypatch.setattr(type(tokenizer), "encode_array", lambda self, t: encoded.append(len(t)) or encode(self, t))
    info = prepare_lib._run_task((0, pieces, str(tmp_path / "task")))
    line = max(map(len, TEXT.splitlines(keepends=True)))
    assert len(encoded) > 10 and max(encoded) <= 1000 + line, encoded
    for split in ("train", "val"):
        docs = [d.text for p in pieces for d in sources.read_piece(p) if d.split == split]
        want = np.concatenate([tokenizer.encode_array(t) for t in docs] + ([[tokenizer.eos_id]] * (kind == "byte")))
        got = np.fromfile(tmp_path / "task" / f"{split}-00000.tokens", prepare_lib._dtype(tokenizer))
        np.testing.assert_array_equal(got, want)
        assert info[split]["tokens"] == len(want)


def test_char_offsets_scan_small_blocks(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(sources, "_OFFSET_BLOCK", 777)  # blocks that cut characters
    chars = [0, 1, 999, 50_000, len(TEXT) - 1, len(TEXT)]
    want = [len(TEXT[:c].encode("utf-8")) for c in chars]
    assert sources.char_offsets(str(path), chars) == want

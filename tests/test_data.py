"""Tokenizers (round trips, save/load), deterministic per-process batches, text sources and their errors."""

import os
import sysconfig

import numpy as np
import pytest

from llm_jax.data import lm_data as data_lib
from llm_jax.data import parallel, sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.protocol import DataSource, rows_of
from llm_jax.runtime.errors import BadValue, NotFound, Unavailable
from llm_jax.training.config import base_config

TEXTS = [
    "def f(x):\n    return x  # done\n",
    "  leading spaces\n\ttab\n\nblank line above and a trailing space ",
    "héllo wörld, 世界 🙂\n",
    "a\nb\nc",
    "",
]


@pytest.fixture(scope="module")
def code_docs():
    """A few standard-library modules: small real text present on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            docs.append(f.read())
    return docs


@pytest.fixture(scope="module")
def sp_tokenizer(code_docs):
    return tok_lib.SentencePieceTokenizer.train(code_docs, vocab_size=600)


def _hf_tokenizer():
    import tokenizers  # a dependency of llm_jax: never skipped
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, hello there\n", "def f(x): return x\n"] * 20, trainer)
    return tok_lib.HFTokenizer(tok.to_str(), eos_id=tok.token_to_id("<eos>"))


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
    tok = tok_lib.ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode_array(text), ids)
        assert tok.encode_array(text).dtype == np.int32
    assert tok.decode([104, 105, 256]) == "hi"  # end-of-document is not text


def test_char_tokenizer():
    tok = tok_lib.CharTokenizer.train("hello world\n")
    assert tok.chars == ["\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 9 and tok.eos_id is None
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    for text in ("hello world\n", "low\nrow", ""):
        assert tok.decode(tok.encode(text)) == text
        np.testing.assert_array_equal(tok.encode_array(text) if text else np.zeros(0, np.int32), tok.encode(text))
    with pytest.raises(BadValue, match=r"character 'z' is not in this run's character vocabulary"):
        tok.encode("hello z")
    with pytest.raises(BadValue, match=r"character '€' is not in this run's character vocabulary"):
        tok.encode_array("hello €")  # the vectorised path gives the same clear error
    with pytest.raises(BadValue, match="empty text"):
        tok_lib.CharTokenizer.train("")


def test_sentencepiece_round_trip(sp_tokenizer, code_docs):
    tok = sp_tokenizer
    assert tok.vocab_size == 600 and tok.eos_id == 3
    for text in TEXTS + [code_docs[0][:3000]]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
        # The corpus is tokenized line by line (encode_array): it must decode to the same text,
        # not gain a space at the start of every line.
        assert tok.decode(tok.encode_array(text)) == text, repr(text)
    # It really compresses code (BPE pieces, not bytes).
    sample = code_docs[1][:5000]
    assert len(tok.encode_array(sample)) < 0.6 * len(sample.encode("utf-8"))


def test_hf_tokenizer_round_trip():
    tok = _hf_tokenizer()
    assert tok.kind == "hf" and tok.eos_id is not None
    for text in ("hello world, hello there\n", "déjà vu 🙂"):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["byte", "char", "sentencepiece", "hf"])
def test_tokenizer_save_and_load(kind, tmp_path, sp_tokenizer):
    tok = {
        "byte": tok_lib.ByteTokenizer,
        "char": lambda: tok_lib.CharTokenizer.train("hello world, déjà vu\n"),
        "sentencepiece": lambda: sp_tokenizer,
        "hf": _hf_tokenizer,
    }[kind]()
    tok.save(str(tmp_path))
    assert os.path.exists(tmp_path / tok_lib.META)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes leave no temp files
    back = tok_lib.load(str(tmp_path))
    assert type(back) is type(tok)
    assert (back.kind, back.vocab_size, back.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    text = "hello world, déjà vu\n"
    assert back.encode(text) == tok.encode(text)
    assert back.decode(back.encode(text)) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(NotFound, match="no tokenizer in"):
        tok_lib.load(str(tmp_path))
    (tmp_path / tok_lib.META).write_text('{"kind": "morse"}')
    with pytest.raises(BadValue, match="unknown tokenizer kind 'morse'"):
        tok_lib.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Batches: a pure function of the step; per-process rows concatenate to the global batch


@pytest.fixture(scope="module")
def lm_data():
    stream = np.arange(5000, dtype=np.int32)  # token i is i: every window shows where it came from
    return data_lib.LMData(tok_lib.ByteTokenizer(), stream, stream[:700] + 10_000)


def test_train_batch_is_a_pure_function_of_the_step(lm_data):
    b = lm_data.train_batch(3, 8, 16, seed=0)
    assert b["inputs"].shape == b["targets"].shape == (8, 16)
    # Windows of consecutive tokens; targets are the inputs shifted by one.
    np.testing.assert_array_equal(np.diff(b["inputs"], axis=1), 1)
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
    assert b["targets"].max() < 5000
    np.testing.assert_array_equal(lm_data.train_batch(3, 8, 16, seed=0)["inputs"], b["inputs"])
    assert not np.array_equal(lm_data.train_batch(4, 8, 16, seed=0)["inputs"], b["inputs"])
    assert not np.array_equal(lm_data.train_batch(3, 8, 16, seed=1)["inputs"], b["inputs"])
    # The iterator form, started at a step (a resumed run), yields the same batches.
    it = data_lib.batches(lm_data, 3, 8, 16, seed=0)
    np.testing.assert_array_equal(next(it)["inputs"], b["inputs"])
    np.testing.assert_array_equal(next(it)["inputs"], lm_data.train_batch(4, 8, 16, seed=0)["inputs"])


@pytest.mark.parametrize("procs", [2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(lm_data, procs):
    glob = lm_data.train_batch(5, 16, 8, seed=2)
    parts = [lm_data.train_batch(5, 16, 8, seed=2, process_index=i, process_count=procs) for i in range(procs)]
    assert all(p["inputs"].shape == (16 // procs, 8) for p in parts)
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), glob[key])
    ev = lm_data.eval_batches(3, 16, 8, seed=2)
    ev_parts = [lm_data.eval_batches(3, 16, 8, seed=2, process_index=i, process_count=procs) for i in range(procs)]
    for j in range(3):
        np.testing.assert_array_equal(np.concatenate([p[j]["inputs"] for p in ev_parts]), ev[j]["inputs"])


def test_eval_batches_are_fixed_and_from_the_validation_split(lm_data):
    a = lm_data.eval_batches(4, 8, 16, seed=0)
    b = lm_data.eval_batches(4, 8, 16, seed=0)
    assert len(a) == 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        assert x["inputs"].min() >= 10_000  # validation tokens only
    assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])


def test_split_too_short_is_a_clear_error():
    d = data_lib.LMData(tok_lib.ByteTokenizer(), np.arange(100, dtype=np.int32), np.arange(10, dtype=np.int32))
    d.check(8)
    with pytest.raises(BadValue, match=r"validation split has 10 tokens, fewer than seq_len\+2=18"):
        d.check(16)


# ----------------------------------------------------------------------------------------------
# Sources


def _data_cfg(**kw):
    c = base_config().data
    c.update(kw)
    return c


def test_text_source_split_by_position(tmp_path):
    text = "".join(f"line {i}: héllo\n" for i in range(100))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    d = data_lib.load_data(
        _data_cfg(source="text", path=str(path), val_fraction=0.1, tokenizer="byte"), log=lambda *a: None
    )
    cut = int(len(text) * 0.9)
    # Byte tokens of the first 90% (then end-of-document), and of the last 10%.
    np.testing.assert_array_equal(d.train_tokens, list(text[:cut].encode()) + [256])
    np.testing.assert_array_equal(d.val_tokens, list(text[cut:].encode()) + [256])


def test_saved_tokenizer_is_reused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabc\n" * 20)
    tok_dir = tmp_path / "tok"
    tok_lib.CharTokenizer.train("cba\nxyz").save(str(tok_dir))  # a run's tokenizer with more chars
    d = data_lib.load_data(
        _data_cfg(source="text", path=str(path), tokenizer="char"), tokenizer_dir=str(tok_dir), log=lambda *a: None
    )
    assert d.tokenizer.vocab_size == 7  # loaded, not rebuilt from this text (which has 4 chars)


@pytest.mark.shared_data
def test_shakespeare_char_split_matches_nanogpt(shakespeare_path):
    d = data_lib.load_data(
        _data_cfg(source="text", path=shakespeare_path, tokenizer="char", val_fraction=0.1), log=lambda *a: None
    )
    # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train / 111,540 val tokens.
    assert d.tokenizer.vocab_size == 65
    assert (len(d.train_tokens), len(d.val_tokens)) == (1_003_854, 111_540)


def test_stdlib_source():
    pieces = sources.plan(_data_cfg(source="stdlib", max_chars=50_000, val_fraction=0.1), 1 << 20)
    docs = [d for p in pieces for d in sources.read_piece(p)]
    train = [d.text for d in docs if d.split == "train"]
    val = [d.text for d in docs if d.split == "val"]
    assert sum(map(len, train)) == 50_000
    assert 0 < sum(map(len, val)) <= 5_000
    assert any("def " in d for d in train) and any("def " in d for d in val)
    # Validation files are not training files (split by file, stably).
    assert not {p.path for p in pieces if p.split == "val"} & {p.path for p in pieces if p.split == "train"}


@pytest.mark.parametrize(
    "content, kind, message",
    [
        (None, FileNotFoundError, r"does not exist or is not a file"),
        (b"", ValueError, r"is empty; give a file with text in it"),
        (b"  \n\t\n", ValueError, r"is empty; give a file with text in it"),
        (b"caf\xe9 latin-1\n", ValueError, r"is not UTF-8 text \(bad byte at offset 3\); convert it to UTF-8"),
    ],
)
def test_text_file_errors(tmp_path, content, kind, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(kind, match=message) as e:
        data_lib.load_data(_data_cfg(source="text", path=str(path)), log=lambda *a: None)
    assert str(path) in str(e.value)  # the message names the file


def test_source_config_errors(tmp_path):
    with pytest.raises(BadValue, match=r"config.data.path is empty: give a text file with --config.data.path=FILE"):
        data_lib.load_data(_data_cfg(source="text", path=""))
    with pytest.raises(NotFound, match=r"'\S*nothing-\*\.txt' matches no file"):
        data_lib.load_data(_data_cfg(source="text", path=str(tmp_path / "nothing-*.txt")))
    with pytest.raises(BadValue, match=r"config.data.source='web'"):
        data_lib.load_data(_data_cfg(source="web"))
    with pytest.raises(BadValue, match=r"config.data.tokenizer='words'"):
        data_lib.build_tokenizer(_data_cfg(tokenizer="words"), ["x"])
    with pytest.raises(BadValue, match=r"config.data.packing='rows'"):
        data_lib.LMData(tok_lib.ByteTokenizer(), np.arange(10), np.arange(10), packing="rows")


def test_tfds_offline_is_a_clear_error(tmp_path):
    cfg = _data_cfg(source="tfds", tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(Unavailable, match=r"tfds dataset 'tiny_shakespeare' .* is not available") as e:
        data_lib.load_data(cfg)
    assert "tfds build tiny_shakespeare --file_format=array_record" in str(e.value)
    assert "--config.data.source=text" in str(e.value)


# ----------------------------------------------------------------------------------------------
# The data-source protocol (llm_jax/data/protocol.py) and the one tokenizer load-or-build


def test_rows_of_blocks_concatenate_to_the_global_batch():
    batch = {"inputs": np.arange(12).reshape(6, 2), "targets": np.arange(6)}
    blocks = [rows_of(batch, i, 3) for i in range(3)]
    assert [b["targets"].tolist() for b in blocks] == [[0, 1], [2, 3], [4, 5]]
    for k in batch:  # process order, contiguous: what sharding.host_to_global assembles
        np.testing.assert_array_equal(np.concatenate([b[k] for b in blocks]), batch[k])
    np.testing.assert_array_equal(rows_of(np.arange(8), 1, 2), [4, 5, 6, 7])
    np.testing.assert_array_equal(rows_of(np.arange(8), 0, 1), np.arange(8))


def test_every_data_source_offers_the_protocol(lm_data):
    tok = tok_lib.ByteTokenizer()
    for data in (lm_data, data_lib.PromptCompletionData(tok, [], []), parallel.ParallelData(tok, None, None, 8)):
        assert isinstance(data, DataSource), type(data).__name__
    assert not isinstance(tok, DataSource)


def test_load_or_build_prefers_the_saved_then_the_cached_tokenizer(tmp_path):
    built = []

    def build():
        built.append(1)
        return tok_lib.CharTokenizer("abc")

    saved = str(tmp_path / "run_tok")
    tok_lib.save_whole(tok_lib.ByteTokenizer(), saved)
    assert tok_lib.load_or_build(saved, build).kind == "byte" and built == []  # a resumed run's own
    assert tok_lib.load_or_build(str(tmp_path / "none"), build).kind == "char" and built == [1]
    cache = str(tmp_path / "cache" / "char-x")
    os.makedirs(os.path.dirname(cache))
    for _ in range(2):  # built once, then read back from the cache
        assert tok_lib.load_or_build(None, build, cache_dir=cache).chars == ["a", "b", "c"]
    assert built == [1, 1] and tok_lib.saved_in(cache)

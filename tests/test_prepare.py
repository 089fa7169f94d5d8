"""The prepare step (llm_jax/data/prepare.py) and training from its files: deterministic, resumable after
a kill, never reused with another tokenizer; a tfds dataset built here trains end to end without
TensorFlow; a run's memory does not grow with the corpus; batches are the same whether one process
or two build them."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import runlib as R
import tensorflow_datasets as tfds

from llm_jax.data import lm_data as data_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime.errors import BadValue, FileError
from llm_jax.training import loop
from llm_jax.training.config import base_config

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 text files (standard-library modules, ~0.6 MB): a glob of documents."""
    d = tmp_path_factory.mktemp("corpus")
    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:24]
    for i, name in enumerate(names):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            (d / f"doc-{i:02d}.txt").write_text(f.read(), encoding="utf-8")
    return str(d / "doc-*.txt")


def _cfg(path, cache, **kw):
    c = base_config().data
    c.update(source="text", path=path, tokenizer="char", val_fraction=0.2, cache_dir=str(cache), prepare_shard_mb=0.05)
    c.update(kw)
    return c


def _files(directory):
    """{relative path: bytes} of every file under `directory`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_prepare_is_deterministic_parallel_and_reused(corpus, tmp_path):
    a, manifest, tokenizer = prepare_lib.prepare(_cfg(corpus, tmp_path / "a", prepare_workers=2), **QUIET)
    b, _, _ = prepare_lib.prepare(_cfg(corpus, tmp_path / "b", prepare_workers=1), **QUIET)
    assert os.path.basename(a) == os.path.basename(b)
    files = _files(a)
    assert files == _files(b), "two processes and one write the same files, byte for byte"
    assert sum(name.endswith(".tokens") for name in files) > 6  # really sharded
    # The token stream is the documents tokenized in order, each followed by nothing (char: no EOS).
    pieces = sources.plan(_cfg(corpus, tmp_path), 1 << 30)
    docs = [d for p in pieces for d in sources.read_piece(p)]
    texts = {s: "".join(d.text for d in docs if d.split == s) for s in ("train", "val")}
    data = data_lib.load_data(_cfg(corpus, tmp_path / "a"), **QUIET)
    np.testing.assert_array_equal(np.asarray(data.train_tokens), tokenizer.encode_array(texts["train"]))
    np.testing.assert_array_equal(np.asarray(data.val_tokens), tokenizer.encode_array(texts["val"]))
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"] == 24
    # Document starts: where each training file's text begins in the stream.
    starts = data.train_tokens.doc_starts(0, len(data.train_tokens))
    lengths = [len(d.text) for p in pieces for d in sources.read_piece(p) if d.split == "train"]
    np.testing.assert_array_equal(starts, np.cumsum([0] + lengths[:-1]))
    # Reused: a later load prepares nothing.
    log = []
    data_lib.load_data(_cfg(corpus, tmp_path / "a"), log=log.append)
    assert not [line for line in log if line.startswith("prepare:")], log


def test_killed_prepare_resumes(corpus, tmp_path):
    cache = tmp_path / "cache"
    flags = [
        "--config=configs/default.py", "--config.data.source=text", f"--config.data.path={corpus}",
        "--config.data.tokenizer=char", "--config.data.val_fraction=0.2", f"--config.data.cache_dir={cache}",
        "--config.data.prepare_shard_mb=0.05", "--config.data.prepare_workers=1",
    ]  # fmt: skip
    env = {**R.env(1), "LLM_JAX_PREPARE_TASK_DELAY": "0.3"}
    p = subprocess.Popen([sys.executable, "-m", "llm_jax.prepare", *flags], cwd=R.REPO, env=env)
    deadline = time.time() + 120
    while len(glob.glob(str(cache / "data" / "*.partial" / "task-*.json"))) < 3:
        assert p.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (partial,) = glob.glob(str(cache / "data" / "*.partial"))
    assert not glob.glob(str(cache / "data" / "*" / prepare_lib.MANIFEST)), "nothing looks complete"
    with open(os.path.join(partial, "train-00999.tokens.tmp4242"), "wb") as f:  # as if killed mid-write
        f.write(b"\0" * 10)
    log = []
    directory, _, _ = prepare_lib.prepare(_cfg(corpus, cache), log=log.append)
    assert any("resuming" in line and "shards already written" in line for line in log), log
    assert not os.path.exists(partial)
    fresh, _, _ = prepare_lib.prepare(_cfg(corpus, tmp_path / "fresh"), **QUIET)
    assert _files(directory) == _files(fresh)


def test_files_of_another_tokenizer_are_never_reused(corpus, tmp_path):
    directory, _, char_tok = prepare_lib.prepare(_cfg(corpus, tmp_path), **QUIET)
    with pytest.raises(BadValue, match=r"holds tokens made with tokenizer .* but this run's tokenizer is"):
        prepare_lib.read_manifest(directory, tok_lib.ByteTokenizer())
    # Another tokenizer (config, vocabulary size, or a resumed run's own) is another prepared set.
    sp600 = prepare_lib.prepare(_cfg(corpus, tmp_path, tokenizer="sentencepiece", vocab_size=600), **QUIET)[0]
    sp640 = prepare_lib.prepare(_cfg(corpus, tmp_path, tokenizer="sentencepiece", vocab_size=640), **QUIET)[0]
    run_tok = tmp_path / "run_tokenizer"
    tok_lib.CharTokenizer(char_tok.chars + ["\u00e9"]).save(str(run_tok))
    resumed = prepare_lib.prepare(_cfg(corpus, tmp_path), tokenizer_dir=str(run_tok), **QUIET)
    assert len({directory, sp600, sp640, resumed[0]}) == 4
    assert resumed[2].vocab_size == char_tok.vocab_size + 1
    # A changed corpus is another set too (sizes and modification times are part of the key).
    changed = sorted(glob.glob(corpus))[0]
    with open(changed, "a", encoding="utf-8") as f:
        f.write("\n# one more line\n")
    assert prepare_lib.prepare(_cfg(corpus, tmp_path), **QUIET)[0] != directory


def _cache_state(root):
    """R.snapshot of a cache, less its lock files (a lock records who prepares, not what was prepared)."""
    return {k: v for k, v in R.snapshot(str(root)).items() if not k.endswith(".lock")}


def _rewrite_keeping_size_and_mtime(path, offset, data: bytes):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_content_edited_in_place_is_a_new_set(tmp_path):
    # An edit that keeps the file's size and modification time (cp -p, rsync -t, touch -r).
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    first, _, tokenizer = prepare_lib.prepare(_cfg(str(path), tmp_path / "cache", tokenizer="byte"), **QUIET)
    _rewrite_keeping_size_and_mtime(path, 0, b"THE")
    second, _, _ = prepare_lib.prepare(_cfg(str(path), tmp_path / "cache", tokenizer="byte"), **QUIET)
    assert second != first, "stale tokens reused"
    data = data_lib.load_data(_cfg(str(path), tmp_path / "cache", tokenizer="byte"), **QUIET)
    np.testing.assert_array_equal(data.train_tokens.read(0, 3), tokenizer.encode_array("THE"))
    # A large file is sampled (head, tail, spread blocks) unless verify='full' reads every byte.
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (5 << 20))
    fast, full = (_cfg(str(big), tmp_path, tokenizer="byte", verify=v) for v in ("fast", "full"))
    before = (sources.identity(fast), sources.identity(full))
    _rewrite_keeping_size_and_mtime(big, (5 << 20) - 10, b"y")  # in the tail: both see it
    after = (sources.identity(fast), sources.identity(full))
    assert before[0] != after[0] and before[1] != after[1]
    _rewrite_keeping_size_and_mtime(big, (1 << 20) + 70_000, b"z")  # between two samples: only 'full' sees it
    assert sources.identity(fast) == after[0] and sources.identity(full) != after[1]


def test_a_damaged_set_is_refused_on_open(corpus, tmp_path):
    directory, _, _ = prepare_lib.prepare(_cfg(corpus, tmp_path), **QUIET)
    shard = sorted(glob.glob(os.path.join(directory, "train-*.tokens")))[1]
    with open(shard, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(shard) // 2)
    before = _cache_state(tmp_path)
    with pytest.raises(
        FileError, match=r"train-00001\.tokens/\.docs\.npy hold \d+ bytes .* the prepared set is damaged"
    ):
        data_lib.load_data(_cfg(corpus, tmp_path), **QUIET)
    assert _cache_state(tmp_path) == before


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, monkeypatch):
    # A tokenizer whose vocab_size undercounts its ids: uint16 shards would wrap 65,536 + i to i.
    path = tmp_path / "corpus.txt"
    path.write_text("some text to tokenize\n" * 100)
    prepare_lib.prepare(_cfg(str(path), tmp_path / "cache", tokenizer="byte"), **QUIET)  # the cache in use
    path.write_text("other text to tokenize\n" * 100)
    before = _cache_state(tmp_path / "cache")
    encode = tok_lib.ByteTokenizer.encode_array
    monkeypatch.setattr(tok_lib.ByteTokenizer, "encode_array", lambda self, text: encode(self, text) + 65536)
    with pytest.raises(
        BadValue, match=r"byte tokenizer gave token id 65\d+, outside its vocabulary of 257 .*corpus\.txt"
    ):
        prepare_lib.prepare(_cfg(str(path), tmp_path / "cache", tokenizer="byte"), **QUIET)
    assert _cache_state(tmp_path / "cache") == before


def test_two_processes_build_the_same_batches(corpus, tmp_path):
    """Two processes, each reading only its rows from the prepared files, build the global batch."""
    cfg = _cfg(corpus, tmp_path, packing="documents")
    data = data_lib.load_data(cfg, **QUIET)
    script = (
        "import sys, numpy as np, ml_collections as mc; from llm_jax.data import lm_data as D\n"
        "cfg = mc.ConfigDict(__import__('json').loads(sys.argv[1])); i = int(sys.argv[2])\n"
        "d = D.load_data(cfg, log=lambda *a: None)\n"
        "b = [d.train_batch(s, 8, 64, 0, i, 2) for s in (0, 5)] + d.eval_batches(2, 8, 64, 0, i, 2)\n"
        "np.savez(sys.argv[3], **{f'{n}_{k}': v for n, x in enumerate(b) for k, v in x.items()})\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(cfg.to_dict()), str(i), str(tmp_path / f"p{i}.npz")],
            cwd=R.REPO,
            env=R.env(1),
        )
        for i in range(2)
    ]
    assert [p.wait() for p in procs] == [0, 0]
    parts = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    whole = [data.train_batch(s, 8, 64, 0) for s in (0, 5)] + data.eval_batches(2, 8, 64, 0)
    for n, batch in enumerate(whole):
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "weights"}
        for k, v in batch.items():
            np.testing.assert_array_equal(np.concatenate([p[f"{n}_{k}"] for p in parts]), v)
    # The trainer's iterator (grain, prefetching) yields exactly train_batch(step) from any start step.
    it = data_lib.batches(data, 3, 8, 64, 0, num_steps=6)
    for step in range(3, 6):
        got = next(it)
        for k, v in data.train_batch(step, 8, 64, 0).items():
            np.testing.assert_array_equal(got[k], v)


# ----------------------------------------------------------------------------------------------
# tfds: a dataset built here (array_record, no TensorFlow) prepares and trains


class LlmJaxTinyDocs(tfds.core.GeneratorBasedBuilder):
    """Numbered documents of code-like text; train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 300), "validation": self._generate_examples(300, 340)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"text": f"def f{i}(x):\n    return x * {i % 7} + {i}\n" * (1 + i % 5)}


def test_tfds_dataset_prepares_and_trains_without_tensorflow(tmp_path):
    data_dir = str(tmp_path / "tfds")
    LlmJaxTinyDocs(data_dir=data_dir, file_format="array_record").download_and_prepare()
    over = {
        "data.source": "tfds", "data.tfds_name": "llm_jax_tiny_docs", "data.tfds_data_dir": data_dir,
        "data.max_chars": 0,  # the tiny config's limit of the text sources; tfds has max_docs
        "data.cache_dir": str(tmp_path / "cache"), "data.packing": "documents", "train.num_steps": 4,
        "train.eval_every": 4, "train.sample_tokens": 0,
    }  # fmt: skip
    config = R.tiny_config(over)
    os.environ.setdefault("LLM_JAX_CPU_PEAK_FLOPS", "1e11")
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["step"] == 4 and np.isfinite(summary["eval/loss"])
    (manifest,) = glob.glob(str(tmp_path / "cache" / "data" / "tfds-byte-*" / prepare_lib.MANIFEST))
    with open(manifest) as f:
        splits = json.load(f)["splits"]
    assert (splits["train"]["docs"], splits["val"]["docs"]) == (300, 40)
    ident = sources.identity(config.data)  # keyed by the version tfds picked: a new version is a new set
    assert (ident["version"], ident["full_name"]) == ("1.0.0", "llm_jax_tiny_docs/1.0.0")
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------------------------
# Memory: a run over a corpus 10x larger has the same resident memory


def _write_corpus(directory, megabytes):
    os.makedirs(directory)
    text = open(os.path.join(os.path.dirname(os.__file__), "typing.py"), encoding="utf-8").read()
    for i in range(megabytes * 4):  # files of 256 KB
        body = (f"# file {i}\n" + text) * (1 + (1 << 18) // len(text))
        with open(os.path.join(directory, f"f{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(body[: 1 << 18])
    return os.path.join(directory, "*.txt")


def _peak_rss_mb(workdir, path, cache):
    over = R.tiny_overrides(path, 20, 20, **{"data.cache_dir": cache, "data.tokenizer": "byte"})
    p = R.start(workdir, over, devices=1)
    _, status, usage = os.wait4(p.pid, 0)
    assert status == 0, R.output(p)[-3000:]
    return usage.ru_maxrss / 1024  # KB -> MB (Linux)


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_corpus(tmp_path):
    cache = str(tmp_path / "cache")
    paths = {mb: _write_corpus(str(tmp_path / f"c{mb}"), mb) for mb in (4, 40)}
    for path in paths.values():  # prepared first (as by `python -m llm_jax.prepare`): the runs only read
        prepare_lib.prepare(_cfg(path, cache, tokenizer="byte", prepare_shard_mb=8), **QUIET)
    _peak_rss_mb(str(tmp_path / "warm-up"), paths[4], cache)  # fills the compilation cache: both runs then load it
    rss = {mb: _peak_rss_mb(str(tmp_path / f"run{mb}"), path, cache) for mb, path in paths.items()}
    print(f"peak RSS of the run, MB: {rss}")
    # Reading the 40 MB corpus into memory as before would add >150 MB (text + int32 tokens).
    assert rss[40] - rss[4] < 20, rss

"""Prepare: a source tokenized once, in parallel, into sharded token files that every later run and
every host reads through memory maps.

    python -m llm_jax.prepare --config configs/X.py [--config.data.KEY=VALUE ...] [--workdir DIR]

The trainer calls `prepare` itself on first use, so this command is only needed to prepare ahead
(e.g. once, before a multi-host run). Where prepared data lives: `config.data.cache_dir`, default
`$LLM_JAX_CACHE`, else `~/.cache/llm_jax`; give every host the same (shared) directory, or each
host prepares its own identical copy. One prepared set, `<cache>/data/<source>-<tokenizer>-<key>/`:

    manifest.json                written last: the set is complete if and only if it exists
    tokenizer/                   the tokenizer that made the tokens
    {train,val}-NNNNN.tokens     raw little-endian token ids, uint16 (vocabulary <= 65,536) or uint32
    {train,val}-NNNNN.docs.npy   int64 offsets within the shard where a document starts
    task-NNNNN.json              what shard NNNNN holds: tokens and documents per split, text bytes

A split's token stream is its shards in order; a document's tokens are followed by the tokenizer's
EOS where it has one. `<key>` hashes the format version, the source as it is now (paths, sizes,
modification times and content hashes, sampled or whole as `config.data.verify` says; a tfds
dataset's version and record counts), the config values that shape the text and the tokenizer's
fingerprint: a changed corpus or tokenizer is a new set, never stale tokens. Opening a set checks
each shard's size against the manifest (a set cut short by a copy is refused, never read as
garbage); preparing checks that every token id is below the tokenizer's vocabulary (so it fits
the shard's dtype: uint16 would wrap an id above 65,535). Tokenizers
trained from the data (char, sentencepiece) are cached beside, in `<cache>/tokenizers/`.

Work is split into tasks of about `config.data.prepare_shard_mb` of text, one shard pair each,
run by `config.data.prepare_workers` processes (0: one per core). A task writes its files under
temporary names, renames them, then writes its task json: a killed prepare resumes with the tasks
whose json exists. Everything happens in `<set>.partial/`, renamed to `<set>/` once the manifest is
written, under a file lock (a second preparer of the same set waits, then reuses it).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time

import numpy as np

from llm_jax.data import progress as progress_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, FileError, UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
# Below this much text the tasks run in this process: starting worker processes costs seconds.
_IN_PROCESS_BYTES = 16 << 20


def cache_root(cfg) -> str:
    """Where prepared data and trained tokenizers live (see the module docstring)."""
    root = cfg.cache_dir or os.environ.get("LLM_JAX_CACHE") or os.path.join("~", ".cache", "llm_jax")
    return os.path.abspath(os.path.expanduser(root))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Tokenizers


def build_tokenizer(cfg, train_texts) -> tok_lib.Tokenizer:
    """A new tokenizer of the configured kind, trained on `train_texts` (an iterable of the training
    split's texts, read lazily) where it needs to be."""
    if cfg.tokenizer == "byte":
        return tok_lib.ByteTokenizer()
    if cfg.tokenizer == "char":
        codes = set()
        for t in train_texts:  # unique code points per text: one pass, vectorised
            codes.update(np.unique(np.frombuffer(t.encode("utf-32-le"), np.uint32)).tolist())
        if not codes:
            raise BadValue("cannot build a character vocabulary from empty text")
        return tok_lib.CharTokenizer(map(chr, codes))
    if cfg.tokenizer == "sentencepiece":
        return tok_lib.SentencePieceTokenizer.train(train_texts, cfg.vocab_size, max_chars=cfg.tokenizer_train_chars)
    if cfg.tokenizer == "hf":
        if not cfg.tokenizer_path:
            raise BadValue("config.data.tokenizer='hf' needs config.data.tokenizer_path=.../tokenizer.json")
        directory, name = os.path.split(cfg.tokenizer_path)
        if name == tok_lib.HFTokenizer.FILE:  # with the files beside it: special tokens, chat template
            return tok_lib.HFTokenizer.from_dir(directory)
        return tok_lib.HFTokenizer.from_file(cfg.tokenizer_path)
    raise BadValue(f"config.data.tokenizer={cfg.tokenizer!r}: use 'byte', 'char', 'sentencepiece' or 'hf'")


def train_texts(pieces: list[sources.Piece]):
    """The training split's texts, in order, read one piece at a time."""
    for piece in pieces:
        for doc in sources.read_piece(piece):
            if doc.split == "train":
                yield doc.text


def resolve_tokenizer(cfg, ident: dict, root: str, tokenizer_dir: str | None, log) -> tok_lib.Tokenizer:
    """The run's own tokenizer (`tokenizer_dir`, when resuming), a fixed one (byte, hf), or one
    trained from the data, cached by source and tokenizer config (trained once, by one process)."""
    if cfg.tokenizer not in ("char", "sentencepiece"):
        return tok_lib.load_or_build(tokenizer_dir, lambda: build_tokenizer(cfg, []))
    spec = {"format": FORMAT_VERSION, "source": ident, "kind": cfg.tokenizer}
    if cfg.tokenizer == "sentencepiece":
        spec.update(vocab_size=cfg.vocab_size, train_chars=cfg.tokenizer_train_chars)
    directory = os.path.join(root, "tokenizers", f"{cfg.tokenizer}-{_hash(spec)}")

    def train() -> tok_lib.Tokenizer:
        t0 = time.time()
        tokenizer = build_tokenizer(cfg, train_texts(sources.plan(cfg, _piece_bytes(cfg))))
        log(f"prepare: trained the {cfg.tokenizer} tokenizer in {time.time() - t0:.1f}s -> {directory}")
        return tokenizer

    return tok_lib.load_or_build(tokenizer_dir, train, cache_dir=directory, on_wait=_waiting(directory, log))


def _waiting(directory: str, log):
    """What a process says when another one holds the lock of what it is about to prepare."""
    return lambda: log(f"prepare: waiting for another process preparing {directory}")


# ----------------------------------------------------------------------------------------------
# Preparing


def prepare(cfg, tokenizer_dir: str | None = None, log=print) -> tuple[str, dict, tok_lib.Tokenizer]:
    """(directory, manifest, tokenizer) of the prepared set for `cfg` (config.data), prepared now if
    it is not complete yet (resuming what an interrupted prepare left)."""
    root = cache_root(cfg)
    ident = sources.identity(cfg)
    with sources.gunzipped_once():  # a .gz file is decompressed once, by the first plan that reads it
        tokenizer = resolve_tokenizer(cfg, ident, root, tokenizer_dir, log)
        directory = _prepared(cfg, ident, root, tokenizer, log)
    return directory, read_manifest(directory, tokenizer), tokenizer


def _prepared(cfg, ident: dict, root: str, tokenizer: tok_lib.Tokenizer, log) -> str:
    """The directory of the set for (source, tokenizer), built now (under its lock) if incomplete."""
    key = _hash(
        {
            "format": FORMAT_VERSION,
            "source": ident,
            "tokenizer": tok_lib.fingerprint(tokenizer),
            "shard_mb": cfg.prepare_shard_mb,
        }
    )
    directory = os.path.join(root, "data", f"{cfg.source}-{tokenizer.kind}-{key}")
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        with files.locked(directory + ".lock", _waiting(directory, log)):
            if not os.path.exists(os.path.join(directory, MANIFEST)):
                _build(cfg, directory, tokenizer, log)
    return directory


def read_manifest(directory: str, tokenizer: tok_lib.Tokenizer) -> dict:
    """A complete set's manifest, refused if it was made by another format or tokenizer."""
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise BadValue(
            f"{directory} was prepared in format {manifest.get('format')}, this code reads format {FORMAT_VERSION}; "
            "delete it (or point config.data.cache_dir elsewhere) to prepare it again"
        )
    want = tok_lib.fingerprint(tokenizer)
    if manifest.get("tokenizer") != want:
        raise BadValue(
            f"{directory} holds tokens made with tokenizer {manifest.get('tokenizer')}, but this run's tokenizer is "
            f"{want}; they cannot be reused. Delete that directory, or use the tokenizer it was made with"
        )
    _check_shards(directory, manifest)
    return manifest


def _check_shards(directory: str, manifest: dict) -> None:
    """Each shard's files hold what the manifest says (a stat and an .npy header per shard)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = os.path.join(directory, shard["name"])
            want = shard["tokens"] * itemsize
            size = os.path.getsize(path + ".tokens") if os.path.isfile(path + ".tokens") else None
            docs = np.load(path + ".docs.npy", mmap_mode="r").shape[0] if os.path.isfile(path + ".docs.npy") else None
            if size != want or docs != shard["docs"]:
                raise FileError(
                    f"{path}.tokens/.docs.npy hold {size} bytes / {docs} documents, but {MANIFEST} says {want} bytes "
                    f"({shard['tokens']} tokens of {np.dtype(manifest['dtype']).name}) / {shard['docs']}: the prepared "
                    f"set is damaged (a copy cut short?); delete {directory} to prepare it again"
                )


def _piece_bytes(cfg) -> int:
    if cfg.prepare_shard_mb <= 0:
        raise BadValue(f"config.data.prepare_shard_mb={cfg.prepare_shard_mb} must be positive")
    return max(1, int(cfg.prepare_shard_mb * (1 << 20)))


def _tasks(pieces: list[sources.Piece], piece_bytes: int) -> list[list[sources.Piece]]:
    """Consecutive pieces grouped into tasks of about `piece_bytes` of text (stream order kept)."""
    tasks, cur, size = [], [], 0
    for p in pieces:
        cur.append(p)
        size += p.nbytes
        if size >= piece_bytes:
            tasks.append(cur)
            cur, size = [], 0
    return tasks + [cur] if cur else tasks


def _build(cfg, directory: str, tokenizer: tok_lib.Tokenizer, log) -> None:
    """Runs the tasks not done yet into `<directory>.partial`, writes the manifest, renames."""
    partial = directory + ".partial"
    fresh = not os.path.exists(partial)
    os.makedirs(partial, exist_ok=True)
    try:
        _build_in(cfg, directory, partial, tokenizer, log)
    except UserError:  # bad data: the key (source content, tokenizer) must change, so nothing here is reused
        if fresh:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _build_in(cfg, directory: str, partial: str, tokenizer: tok_lib.Tokenizer, log) -> None:
    for name in os.listdir(partial):  # a killed task's half-written files
        if ".tmp" in name:
            path = os.path.join(partial, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not tok_lib.saved_in(os.path.join(partial, "tokenizer")):
        tok_lib.save_whole(tokenizer, os.path.join(partial, "tokenizer"))
    tasks = _tasks(sources.plan(cfg, _piece_bytes(cfg)), _piece_bytes(cfg))
    todo = [i for i in range(len(tasks)) if not os.path.exists(_task_json(partial, i))]
    if len(todo) < len(tasks):
        log(f"prepare: resuming {partial}: {len(tasks) - len(todo)} of {len(tasks)} shards already written")
    _run_tasks([(i, tasks[i], partial) for i in todo], cfg.prepare_workers, log)
    infos = []
    for i in range(len(tasks)):
        with open(_task_json(partial, i)) as f:
            infos.append(json.load(f))
    manifest = _manifest(infos, tokenizer, cfg)
    for split in SPLITS:
        if not manifest["splits"][split]["tokens"]:
            raise BadValue(
                f"the {split} split of source={cfg.source!r} holds no tokens; give more text or change "
                "config.data.val_fraction"
            )
    files.write_json(os.path.join(partial, MANIFEST), manifest, indent=1)
    files.replace(partial, directory)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    log(
        f"prepare: {directory}: {tr['tokens']:,} train / {va['tokens']:,} val tokens, {tr['docs']:,} / {va['docs']:,} "
        f"documents in {len(tasks)} shards"
    )


def _manifest(infos: list[dict], tokenizer: tok_lib.Tokenizer, cfg) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [info[split] for info in infos if info.get(split, {}).get("tokens")]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "docs": sum(s["docs"] for s in shards),
            "shards": shards,
        }
    return {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "path": cfg.path if cfg.source == "text" else cfg.tfds_name if cfg.source == "tfds" else "",
        "tokenizer": tok_lib.fingerprint(tokenizer),
        "dtype": _dtype(tokenizer).str,
        "text_bytes": sum(info["text_bytes"] for info in infos),
        "splits": splits,
    }


def _run_tasks(work: list[tuple], workers: int, log) -> None:
    """Runs `_run_task` over `work` in `workers` processes (0: one per core, and none at all for
    less than 16 MB of text); logs progress."""
    todo_bytes = sum(p.nbytes for _, pieces, _ in work for p in pieces)
    if workers <= 0:
        workers = (os.cpu_count() or 1) if todo_bytes >= _IN_PROCESS_BYTES else 1
    workers = min(workers, len(work))
    quiet = todo_bytes < _IN_PROCESS_BYTES
    progress = progress_lib.Progress("prepare", todo_bytes, "bytes of text", None if quiet else log, every=5.0)
    if workers <= 1:
        for w in work:
            progress.update(_run_task(w)["text_bytes"])
        progress.close()
        return
    log(f"prepare: {todo_bytes / 2**20:,.0f} MB of text in {len(work)} shards over {workers} worker processes")
    # 'spawn': the trainer has JAX's threads running, which a fork would copy mid-flight.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for info in pool.imap_unordered(_run_task, work):
            progress.update(info["text_bytes"])
    progress.close()


# ----------------------------------------------------------------------------------------------
# One task (in a worker process or here)

_TOKENIZERS: dict[str, tok_lib.Tokenizer] = {}


def _dtype(tokenizer: tok_lib.Tokenizer) -> np.dtype:
    return np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")


def _task_json(directory: str, index: int) -> str:
    return os.path.join(directory, f"task-{index:05d}.json")


def _run_task(work: tuple) -> dict:
    """Tokenizes one task's pieces into `{train,val}-NNNNN` shards; its task json is written last."""
    index, pieces, directory = work
    tok_dir = os.path.join(directory, "tokenizer")
    if tok_dir not in _TOKENIZERS:
        _TOKENIZERS[tok_dir] = tok_lib.load(tok_dir)
    tokenizer = _TOKENIZERS[tok_dir]
    eos = None if tokenizer.eos_id is None else np.asarray([tokenizer.eos_id], np.int32)
    parts = {s: [] for s in SPLITS}
    starts = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for piece in pieces:
        for doc in sources.read_piece(piece):
            if doc.starts_doc:
                starts[doc.split].append(sizes[doc.split])
            ids = [_checked(tokenizer.encode_array(doc.text), tokenizer, piece)] if doc.text else []
            if doc.ends_doc and eos is not None:
                ids.append(eos)
            parts[doc.split] += ids
            sizes[doc.split] += sum(len(x) for x in ids)
    info = {"text_bytes": sum(p.nbytes for p in pieces)}
    for split in SPLITS:
        if not sizes[split]:
            continue
        name = f"{split}-{index:05d}"
        tokens = np.concatenate(parts[split]).astype(_dtype(tokenizer))
        files.write_bytes(os.path.join(directory, name + ".tokens"), tokens.tobytes())
        buf = _npy_bytes(np.asarray(starts[split], np.int64))
        files.write_bytes(os.path.join(directory, name + ".docs.npy"), buf)
        info[split] = {"name": name, "tokens": int(sizes[split]), "docs": len(starts[split])}
    files.write_json(_task_json(directory, index), info, indent=None)
    time.sleep(float(os.environ.get("LLM_JAX_PREPARE_TASK_DELAY", 0)))  # tests: time to kill a prepare midway
    return info


def _checked(ids: np.ndarray, tokenizer: tok_lib.Tokenizer, piece: sources.Piece) -> np.ndarray:
    """`ids`, refused if one is outside the tokenizer's vocabulary (it would not fit the embedding,
    and the shard's uint16 would silently wrap an id above 65,535)."""
    bad = np.flatnonzero((ids < 0) | (ids >= tokenizer.vocab_size))
    if len(bad):
        raise BadValue(
            f"the {tokenizer.kind} tokenizer gave token id {int(ids[bad[0]])}, outside its vocabulary of "
            f"{tokenizer.vocab_size} (shards hold {_dtype(tokenizer)}), for text of {piece.path}; its vocab_size "
            "must count every id it produces (added tokens included): fix or replace the tokenizer"
        )
    return ids


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()

"""Text sources, planned as pieces that prepare workers read in parallel.

A source (`config.data.source`) is first *identified* (cheap: paths, sizes, modification times and
a hash of each file's content, sampled or whole as `config.data.verify` says; a tfds dataset's
version and record counts), which is what the prepared-data cache is keyed by, and only when it
must be prepared *planned* into `Piece`s: byte ranges of UTF-8 files, line ranges of JSON-lines
files, record ranges of a tfds split. `read_piece` turns one piece into documents, anywhere
(a worker process needs nothing but the piece).

- `stdlib`: the standard library's own `.py` files (each a document), split by file: a stable hash
  of the path sends `val_fraction` of them to validation.
- `text`: `config.data.path` is a UTF-8 file, a glob, or a comma-separated list of both. One plain
  file is one document split by position (the first `1 - val_fraction` trains, as nanoGPT splits
  Shakespeare); several files are one document each, split by file like `stdlib` (if no file
  hashes to validation, the last one validates). `.jsonl` files
  hold one document per line (field `config.data.text_key`), split per document by a hash of its
  place in the file. `.gz` files are read through gzip: while preparing (`gunzipped_once`), each
  is decompressed once into a temporary plain copy that every later scan and worker reads.
- `tfds`: a tensorflow-datasets dataset already prepared as array_record, read through
  `tfds.data_source` (never TensorFlow); its train and validation splits are given by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np

from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, FileError, NotFound, Unavailable

# Directories of the standard library left out of the default corpus: tests, the IDE, vendored
# packages and generated tables are not the code a model should learn from.
_STDLIB_SKIP = (
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "turtledemo",
    "__pycache__",
)
_TFDS_RECORDS_PER_PIECE = 20_000
_BLOCK = 1 << 24  # bytes read at a time when scanning a large file
_OFFSET_BLOCK = 1 << 20  # ... when locating characters (their offsets are int64: 8 bytes per byte read)
# A JSON-lines document longer than this is refused (never read whole into a worker); text without a
# line end for a whole piece is cut at a character boundary instead.
MAX_LINE_BYTES = 64 << 20
# verify='fast' hashes a file's first and last MB and _SAMPLES blocks of _SAMPLE bytes spread between
# them (a file up to 3 MB whole): milliseconds for any size.
_HEAD = 1 << 20
_SAMPLE, _SAMPLES = 1 << 16, 16


@dataclasses.dataclass(frozen=True)
class Piece:
    """A unit of reading. kind 'file': bytes [lo, hi) of a UTF-8 file (the first `chars` characters
    when chars >= 0), one part of one document; 'jsonl': the lines starting in [lo, hi), a document
    each; 'tfds': records [lo, hi) of a tfds split. `nbytes` estimates its text, for planning."""

    kind: str
    split: str  # 'train' | 'val'; '' for jsonl (decided per document)
    path: str
    lo: int
    hi: int
    nbytes: int
    starts_doc: bool = True
    ends_doc: bool = True
    chars: int = -1
    errors: str = "strict"  # UTF-8 decoding: the standard library tolerates a stray byte ('replace')
    read: str = ""  # the file read for `path`: its plain copy when `path` is .gz (`gunzipped_once`)
    args: tuple = ()  # jsonl: (text_key, val_fraction, name); tfds: (name, split name, data_dir, text_key)


@dataclasses.dataclass(frozen=True)
class Doc:
    split: str
    text: str
    starts_doc: bool = True
    ends_doc: bool = True


# ----------------------------------------------------------------------------------------------
# Identity: what the prepared-data cache is keyed by


def identity(cfg) -> dict:
    """A JSON-able description of the source as it is now (files' sizes, mtimes and content hashes;
    a tfds dataset's version and record counts) plus every config value that shapes the text: any
    change gives a new cache key."""
    shaping = {k: cfg[k] for k in ("source", "val_fraction", "max_chars")}
    full = cfg.get("verify", "fast") == "full"
    if cfg.source == "stdlib":
        files = [(rel, *_stat(path), content_hash(path, full)) for rel, path in stdlib_files()]
        return {**shaping, "stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version, "files": files}
    if cfg.source == "text":
        files = [(path, *_stat(path), content_hash(path, full)) for path in expand_paths(cfg.path)]
        return {**shaping, "text_key": cfg.text_key, "files": files}
    if cfg.source == "tfds":
        found = {s: tfds_source(cfg, s) for s in (cfg.tfds_train_split, cfg.tfds_val_split)}
        info = next(iter(found.values())).dataset_info  # which version tfds picked (the newest, if not named)
        data_dir = os.path.abspath(cfg.tfds_data_dir) if cfg.tfds_data_dir else ""
        return {
            **shaping, "tfds": cfg.tfds_name, "data_dir": data_dir, "splits": {s: len(v) for s, v in found.items()},
            "version": str(info.version), "full_name": info.full_name, "text_key": cfg.tfds_text_key,
            "max_docs": cfg.max_docs,
        }  # fmt: skip
    raise BadValue(f"config.data.source={cfg.source!r} is not a stream of documents: use 'stdlib', 'text' or 'tfds'")


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def content_hash(path: str, full: bool = False) -> str:
    """A hash of a file's bytes (as stored: a .gz file's compressed bytes): all of them (`full`), else
    its head, its tail and blocks spread between them. Size and modification time miss a file
    rewritten in place with its times kept (`cp -p`, `rsync -t`, `touch -r`); this sees such an edit
    unless (sampled) it falls between the samples, which config.data.verify='full' rules out."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if full or size <= 2 * _HEAD + _SAMPLES * _SAMPLE:
                while block := f.read(_BLOCK):
                    h.update(block)
                return h.hexdigest()
            step = (size - 2 * _HEAD - _SAMPLE) // (_SAMPLES - 1)
            spans = [(0, _HEAD), *((_HEAD + i * step, _SAMPLE) for i in range(_SAMPLES)), (size - _HEAD, _HEAD)]
            for offset, n in spans:
                f.seek(offset)
                h.update(f.read(n))
    except OSError as e:
        raise FileError(f"config.data.path={path!r} cannot be read: {e}") from e
    return "sampled:" + h.hexdigest()


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, path) of every .py file of the standard library outside tests, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if not any(part in _STDLIB_SKIP for part in rel.split(os.sep)[:-1]):
            out.append((rel, path))
    if not out:
        raise NotFound(f"found no .py files under the standard library at {root}")
    return out


def expand_paths(spec: str) -> list[str]:
    """config.data.path (a file, a glob, or a comma-separated list of them) -> existing files, in
    order (each glob sorted); errors name the part that matched nothing."""
    if not spec:
        raise BadValue("config.data.path is empty: give a text file with --config.data.path=FILE")
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if glob.has_magic(part):
            found = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not found:
                raise NotFound(f"config.data.path: {part!r} matches no file; check the pattern")
            out += found
        elif part:
            if not os.path.isfile(part):
                raise NotFound(f"config.data.path={part!r} does not exist or is not a file; give a readable text file")
            out.append(part)
    return list(dict.fromkeys(os.path.abspath(p) for p in out))


def tfds_source(cfg, split: str):
    """`tfds.data_source` of one split (array_record, no TensorFlow); offline or unprepared: a clear error."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise ImportError("config.data.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets") from e
    name, data_dir = cfg.tfds_name, cfg.tfds_data_dir or None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # What tfds raises offline (measured, tfds 4.9): an unknown name DatasetNotFoundError; a dataset not
    # prepared NotImplementedError (no array_record files: it looks for TFRecord); a version not
    # prepared AssertionError; a missing file FileNotFoundError. A permission error or a bug surfaces.
    except (tfds.core.DatasetNotFoundError, NotImplementedError, AssertionError, FileNotFoundError) as e:
        raise Unavailable(
            f"tfds dataset {name!r} (split {split!r}, data_dir={data_dir!r}) is not available: "
            f"{type(e).__name__}: {e}\n"
            f"It must be downloaded and prepared as array_record first, on a machine with network access:\n"
            f"  tfds build {name} --file_format=array_record" + (f" --data_dir={data_dir}" if data_dir else "") + "\n"
            "or train on a local file instead: --config.data.source=text --config.data.path=FILE"
        ) from None


# ----------------------------------------------------------------------------------------------
# Plans


def plan(cfg, piece_bytes: int) -> list[Piece]:
    """The source as pieces of at most about `piece_bytes` of text, in stream order (a .gz file's
    pieces read its plain copy inside `gunzipped_once`)."""
    pieces = _plan(cfg, piece_bytes)
    return [dataclasses.replace(p, read=_readable(p.path)) if p.path.endswith(".gz") else p for p in pieces]


def _plan(cfg, piece_bytes: int) -> list[Piece]:
    if cfg.source == "stdlib":
        named = [(rel, path) for rel, path in stdlib_files()]
        return _whole_files(named, cfg, piece_bytes, errors="replace")
    if cfg.source == "text":
        paths = expand_paths(cfg.path)
        if len(paths) == 1 and not _is_jsonl(paths[0]):
            return _one_file(paths[0], cfg, piece_bytes)
        if cfg.max_chars > 0 and any(map(_is_jsonl, paths)):
            raise BadValue("config.data.max_chars does not apply to JSON-lines files; set it to 0")
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        named = [(os.path.relpath(p, root), p) for p in paths]
        plain = [(rel, p) for rel, p in named if not _is_jsonl(p)]
        pieces = _whole_files(plain, cfg, piece_bytes) if plain else []
        for rel, p in named:
            if _is_jsonl(p):
                pieces += _jsonl_pieces(p, rel, cfg, piece_bytes)
        return pieces
    if cfg.source == "tfds":
        pieces = []
        for split, name in (("train", cfg.tfds_train_split), ("val", cfg.tfds_val_split)):
            n = len(tfds_source(cfg, name))
            n = n if cfg.max_docs <= 0 else min(n, cfg.max_docs)
            args = (cfg.tfds_name, name, cfg.tfds_data_dir or "", cfg.tfds_text_key)
            for lo in range(0, n, _TFDS_RECORDS_PER_PIECE):
                hi = min(n, lo + _TFDS_RECORDS_PER_PIECE)
                pieces.append(Piece("tfds", split, "", lo, hi, nbytes=(hi - lo) * 1000, args=args))
        return pieces
    raise BadValue(f"config.data.source={cfg.source!r} is not a stream of documents: use 'stdlib', 'text' or 'tfds'")


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _split_of(name: str, val_fraction: float) -> str:
    # A stable hash of the name: the same documents are held out on every machine and every run.
    return "val" if zlib.crc32(name.encode()) % 1000 < val_fraction * 1000 else "train"


def _whole_files(named: list[tuple[str, str]], cfg, piece_bytes: int, errors: str = "strict") -> list[Piece]:
    """One document per file, split by file; with max_chars, the first max_chars characters of the
    training files in order (a tenth of that of validation), cut as `_truncate` always cut them."""
    budget = {"train": cfg.max_chars, "val": max(cfg.max_chars // 10, 1)} if cfg.max_chars > 0 else None
    splits = [_split_of(rel, cfg.val_fraction) for rel, _ in named]
    if "val" not in splits and len(named) > 1 and cfg.val_fraction > 0:
        splits[-1] = "val"  # few files, none hashed to validation: the last one validates
    pieces = []
    for (_, path), split in zip(named, splits):
        if budget is None:
            pieces += _ranges(path, split, 0, _size(path), piece_bytes, errors)
            continue
        if budget[split] <= 0:
            continue
        take = min(count_chars(path), budget[split])
        budget[split] -= take
        pieces += _ranges(path, split, 0, char_offsets(path, [take])[0], piece_bytes, errors)
    return pieces


def _one_file(path: str, cfg, piece_bytes: int) -> list[Piece]:
    """One file split by characters: [0, cut) trains, [cut, end) validates (end = max_chars if set)."""
    if _size(path) < (1 << 20):  # small enough to check whole: the clear errors come before any work
        text = _read_text(path, "strict")
        if not text.strip():
            raise BadValue(f"config.data.path={path!r} is empty; give a file with text in it")
    total = count_chars(path)
    cut = int(total * (1.0 - cfg.val_fraction))
    end = total
    if cfg.max_chars > 0:
        end, cut = min(total, cfg.max_chars), min(cut, int(cfg.max_chars * (1.0 - cfg.val_fraction)))
    cut_b, end_b = char_offsets(path, [cut, end])
    return _ranges(path, "train", 0, cut_b, piece_bytes) + _ranges(path, "val", cut_b, end_b, piece_bytes)


def _ranges(path: str, split: str, lo: int, hi: int, piece_bytes: int, errors: str = "strict") -> list[Piece]:
    """Bytes [lo, hi) of one document as pieces cut just after a newline (so UTF-8 characters,
    and the lines SentencePiece encodes one by one, are not cut); a line longer than a piece is
    cut at a character boundary, so no piece (no worker's read) is over twice `piece_bytes`."""
    cuts = [lo]
    with _open(path) as f:
        while hi - cuts[-1] > piece_bytes:
            at = cuts[-1] + piece_bytes
            f.seek(at)
            line = f.readline(piece_bytes)  # bounded: a file of one huge line is never read whole
            if line.endswith(b"\n"):
                nxt = f.tell()
            elif len(line) == piece_bytes:  # no line end within a piece: the next character's first byte
                nxt = at + next((i for i, b in enumerate(line[:4]) if b & 0xC0 != 0x80), 0)
            else:
                nxt = hi
            if nxt >= hi:
                break
            cuts.append(nxt)
    cuts.append(hi)
    return [
        Piece("file", split, path, a, b, b - a, starts_doc=i == 0, ends_doc=i == len(cuts) - 2, errors=errors)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]


def _jsonl_pieces(path: str, name: str, cfg, piece_bytes: int) -> list[Piece]:
    size = _size(path)
    args = (cfg.text_key, cfg.val_fraction, name)
    if _readable(path).endswith(".gz"):  # no random access into gzip: one piece
        return [Piece("jsonl", "", path, 0, size, size, args=args)]
    return [
        Piece("jsonl", "", path, lo, min(size, lo + piece_bytes), min(size, lo + piece_bytes) - lo, args=args)
        for lo in range(0, size, piece_bytes)
    ]


def _size(path: str) -> int:
    """Bytes of text in a file (a .gz file's uncompressed size)."""
    if not _readable(path).endswith(".gz"):
        return os.path.getsize(_readable(path))
    with _open(path) as f:
        return f.seek(0, os.SEEK_END)


# ----------------------------------------------------------------------------------------------
# gzip, decompressed once per file

_PLAIN: dict[str, str] = {}  # .gz path -> its plain copy, inside `gunzipped_once`
_PLAIN_DIR: list[str] = []  # inside `gunzipped_once`: [the copies' temporary directory, '' until the first]


@contextlib.contextmanager
def gunzipped_once():
    """Within it, each .gz file that planning meets is decompressed once, into a temporary
    directory removed at the end, and every later read (the plan's scans, each piece in any worker
    process) reads that plain copy: a piece seeks to its bytes instead of decompressing all that
    comes before it. Re-entrant (an inner one uses the outer one's copies)."""
    if _PLAIN_DIR:
        yield
        return
    _PLAIN_DIR.append("")
    try:
        yield
    finally:
        if directory := _PLAIN_DIR.pop():
            shutil.rmtree(directory, ignore_errors=True)
        _PLAIN.clear()


def _readable(path: str) -> str:
    """The file to read for `path`: its plain copy (made now) for a .gz file inside `gunzipped_once`."""
    if not path.endswith(".gz") or not _PLAIN_DIR:
        return path
    if path not in _PLAIN:
        _PLAIN_DIR[0] = _PLAIN_DIR[0] or tempfile.mkdtemp(prefix="llm_jax-gunzip-")  # made for the first .gz
        _PLAIN[path] = _gunzip(path, os.path.join(_PLAIN_DIR[0], f"{len(_PLAIN)}.txt"))
    return _PLAIN[path]


def _gunzip(path: str, out: str) -> str:
    """`path` decompressed into `out`; a truncated or damaged file is one line naming where it ends."""
    lines = 0
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        try:
            while block := src.read(1 << 18):  # small blocks: the line count of an error is close
                dst.write(block)
                lines += block.count(b"\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise BadValue(
                f"{path}: truncated or damaged gzip after line {lines} of its text ({e}); compress it again "
                "(gzip -t checks a file) or give the plain file"
            ) from None
    return out


def _open(path: str):
    return files.open_bytes(_readable(path))


def _open_piece(piece: Piece):
    return files.open_bytes(piece.read or piece.path)


# ----------------------------------------------------------------------------------------------
# Reading


def _decode(raw: bytes, path: str, offset: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise BadValue(
            f"config.data.path={path!r} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it to UTF-8"
        ) from None


def _read_text(path: str, errors: str) -> str:
    try:
        with _open(path) as f:
            return _decode(f.read(), path, 0, errors)
    except OSError as e:
        raise FileError(f"config.data.path={path!r} cannot be read: {e}") from e


def count_chars(path: str) -> int:
    """Characters of a UTF-8 file, counted in blocks (bytes that do not continue a character)."""
    n = 0
    with _open(path) as f:
        while block := f.read(_BLOCK):
            n += int(np.count_nonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80))
    return n


def char_offsets(path: str, chars: list[int]) -> list[int]:
    """Byte offsets where the given (ascending) character counts end."""
    out, seen, base = [], 0, 0
    want = iter(chars)
    target = next(want, None)
    with _open(path) as f:
        while target is not None and (block := f.read(_OFFSET_BLOCK)):
            starts = np.flatnonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80)
            while target is not None and target < seen + len(starts):
                out.append(base + int(starts[target - seen]))
                target = next(want, None)
            seen, base = seen + len(starts), base + len(block)
    while target is not None:  # at (or past) the end of the file
        out.append(base)
        target = next(want, None)
    return out


def read_piece(piece: Piece) -> Iterator[Doc]:
    """The documents (or parts of one) a piece holds, in order."""
    if piece.kind == "file":
        with _open_piece(piece) as f:
            f.seek(piece.lo)
            text = _decode(f.read(piece.hi - piece.lo), piece.path, piece.lo, piece.errors)
        if piece.chars >= 0:
            text = text[: piece.chars]
        yield Doc(piece.split, text, piece.starts_doc, piece.ends_doc)
    elif piece.kind == "jsonl":
        yield from _read_jsonl(piece)
    elif piece.kind == "tfds":
        name, split_name, data_dir, key = piece.args
        source = tfds_source(SimpleNamespace(tfds_name=name, tfds_data_dir=data_dir), split_name)
        for i in range(piece.lo, piece.hi):
            text = source[i][key]
            yield Doc(piece.split, text.decode("utf-8") if isinstance(text, bytes) else str(text))
    else:
        raise ValueError(f"unknown piece kind {piece.kind!r}")


def json_line(line: str, where):
    """The JSON value of one line of a JSONL file; None for a blank line (skipped). `where` names
    the line in the error (anything whose str() does: only made into text on an error). Refused
    besides invalid JSON: nesting deeper than Python's recursion, an integer of more digits than
    anyone means (Python refuses 4,300), a lone UTF-16 surrogate (which no text encodes)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line, parse_int=lambda digits: _json_int(digits, where))
    except json.JSONDecodeError as e:
        raise BadValue(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadValue(f"{where}: JSON nested too deeply to read; flatten that line's value") from None
    if _SURROGATE_ESCAPE.search(line):  # only an escape can write one: strict UTF-8 decoding refuses them
        _check_surrogates(obj, where)
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # after decoding, a pair is one character: any left is lone


def _json_int(digits: str, where) -> int:
    if len(digits) > 1000:
        raise BadValue(f"{where}: a JSON integer of {len(digits)} digits; write it as a string")
    return int(digits)


def _check_surrogates(obj, where) -> None:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str) and (m := _SURROGATE.search(x)):
            raise BadValue(
                f"{where}: a lone UTF-16 surrogate \\u{ord(m.group()):04x} in a JSON string (half of a character, "
                "e.g. an emoji cut in two); fix or drop that line"
            )
        stack += x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()


class _Line:
    """'FILE:LINE' of a byte offset in a file, counted only when an error prints it."""

    def __init__(self, piece: Piece, offset: int):
        self.piece, self.offset = piece, offset

    def __str__(self) -> str:
        n = 0
        with _open_piece(self.piece) as f:
            left = self.offset
            while left > 0 and (block := f.read(min(_BLOCK, left))):
                n, left = n + block.count(b"\n"), left - len(block)
        return f"{self.piece.path}:{n + 1}"


def _read_jsonl(piece: Piece) -> Iterator[Doc]:
    """Lines starting in [lo, hi) (the line cut by `lo` belongs to the piece before)."""
    key, val_fraction, name = piece.args
    with _open_piece(piece) as f:
        if piece.lo > 0:
            f.seek(piece.lo - 1)
            f.readline()  # up to the first line that starts at or after lo
        while (offset := f.tell()) < piece.hi:
            raw = f.readline(MAX_LINE_BYTES + 1)  # bounded: a huge line is refused, never read whole
            if not raw:
                break
            where = _Line(piece, offset)
            if len(raw) > MAX_LINE_BYTES:
                raise BadValue(
                    f"{where}: a line longer than {MAX_LINE_BYTES:,} bytes; split that document over several lines"
                )
            obj = json_line(_decode(raw, piece.path, offset, "strict"), where)
            if obj is None:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise BadValue(
                    f"{where}: expected a JSON object with a string field {key!r} (config.data.text_key); "
                    f"got {type(obj).__name__}" + (f" with fields {sorted(obj)}" if isinstance(obj, dict) else "")
                )
            yield Doc(_split_of(f"{name}:{offset}", val_fraction), obj[key])

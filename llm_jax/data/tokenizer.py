"""Tokenizers: bytes, characters, SentencePiece trained from the data, HF `tokenizer.json`.

All share one small interface (`encode`, `decode`, `vocab_size`, `eos_id`, `save`) and are saved
into the run directory (`workdir/tokenizer/`), so a run is always decoded with the tokenizer it was
trained with. `load(dir)` reads any of them back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from llm_jax.data import progress
from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, NotFound

META = "llm_jax_tokenizer.json"


class Tokenizer:
    kind: str = ""
    vocab_size: int = 0
    eos_id: int | None = None
    bos_id: int | None = None  # the decoder's start token (encoder-decoder models)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        files.write_text(os.path.join(directory, META), json.dumps(self._meta(), indent=1))

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, ids 0..255; 256 is end-of-document. Needs no training."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_array(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids):
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text (nanoGPT's shakespeare_char)."""

    kind = "char"
    eos_id = None

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise BadValue("cannot build a character vocabulary from empty text")
        return cls(text)

    def encode(self, text):
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise BadValue(
                f"character {e.args[0]!r} is not in this run's character vocabulary "
                f"({self.vocab_size} chars); use text made of the training characters"
            ) from None

    def encode_array(self, text):
        # Vectorised lookup through code points: ~50x faster than a dict per char on 1 MB.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(ord(c) for c in self.chars) + 1, -1, np.int32)
        table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size, dtype=np.int32)
        ids = table[np.minimum(codes, len(table) - 1)]
        bad = (ids < 0) | (codes >= len(table))
        if bad.any():
            self.encode(text[int(np.argmax(bad))])  # raises the clear error
        return ids

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def _meta(self):
        return {**super()._meta(), "chars": "".join(self.chars)}


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece (BPE or unigram) trained on a sample of the training text."""

    kind = "sentencepiece"
    MODEL = "spm.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe", max_chars: int = 5_000_000,
        prose: bool = False, log=None,
    ):  # fmt: skip
        """Trains on the lines of `texts` (at most `max_chars` characters). The default keeps every
        character as written (code, poetry); `prose=True` uses SentencePiece's usual settings for
        sentences (NFKC normalisation, whitespace runs folded, a word-start marker on the first
        word), as machine translation does. `log`: where progress and an ETA go while the text is
        read and the pieces are merged (reported only for work that takes a while)."""
        import sentencepiece as spm

        total = min(max_chars, sum(map(len, texts))) if isinstance(texts, (list, tuple)) else max_chars
        reading = progress.Progress("sentencepiece: reading text", total, "chars", log)

        def lines():
            n = 0
            for t in texts:
                for line in t.splitlines():
                    if line.strip():
                        yield line
                        n += len(line)
                        reading.update(len(line))
                if n >= max_chars:
                    break
            reading.close()

        if prose:
            style = dict(normalization_rule_name="nmt_nfkc")
        else:
            style = dict(
                remove_extra_whitespaces=False,  # code and poetry need their spaces
                # No "▁" prepended to each encoded string: the corpus is encoded line by line
                # (encode_array), and a dummy prefix would put a space at the start of every line.
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                normalization_rule_name="identity",
                user_defined_symbols=["\n", "\t"],
            )
        proto = io.BytesIO()
        _train_spm(
            spm, log,
            sentence_iterator=lines(), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,  # never an unknown token: any text round-trips
            split_digits=True,
            hard_vocab_limit=False,  # a small corpus gets the vocabulary it can fill, not an error
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, **style,
        )  # fmt: skip
        return cls(proto.getvalue())

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts):
        return self.sp.encode(list(texts))

    def encode_array(self, text):
        # Line by line: SentencePiece's own splitting, but no single multi-MB string in C++.
        lines = text.splitlines(keepends=True)
        ids = self.sp.encode(lines)
        return np.fromiter((i for seq in ids for i in seq), dtype=np.int32)

    def decode(self, ids):
        # Ids past the vocabulary (the model's padded rows, never trained as targets) are dropped.
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def save(self, directory):
        super().save(directory)
        files.write_bytes(os.path.join(directory, self.MODEL), self.proto)


def _train_spm(spm, log, **kwargs) -> None:
    """`SentencePieceTrainer.train(**kwargs)`, reporting the BPE merges (towards ~`vocab_size`) to `log`.

    The library logs only from C++ to file descriptor 2; for the duration of the training that
    descriptor points at a pipe read here (its "merges=N" lines are the progress; errors are passed
    on to `log`). Without a `log` it trains with its log off.
    """
    if log is None:
        spm.SentencePieceTrainer.train(minloglevel=2, **kwargs)
        return
    merging = progress.Progress("sentencepiece: merging pieces", kwargs["vocab_size"], "pieces", log)

    def read(fd: int) -> None:
        with os.fdopen(fd, errors="replace") as f:
            for line in f:
                if m := re.search(r"merges=(\d+)", line):  # BPE logs every 100 merges
                    merging.set(int(m.group(1)))
                elif line[:1] in "EF":  # glog's error and fatal lines
                    log(f"sentencepiece: {line.rstrip()}")

    r, w = os.pipe()
    reader = threading.Thread(target=read, args=(r,), daemon=True)
    reader.start()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        spm.SentencePieceTrainer.train(minloglevel=0, **kwargs)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
        reader.join()
    merging.close()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (no transformers needed)."""

    kind = "hf"
    FILE = "tokenizer.json"

    def __init__(self, json_str: str, eos_id: int | None = None):
        from tokenizers import Tokenizer as _Tok

        self.json_str = json_str
        self.tok = _Tok.from_str(json_str)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: str, eos_id: int | None = None):
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), eos_id)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)

    def _meta(self):
        return {**super()._meta(), "eos_id": self.eos_id}

    def save(self, directory):
        super().save(directory)
        files.write_text(os.path.join(directory, self.FILE), self.json_str)


def saved_in(directory: str | None) -> bool:
    """Whether `directory` holds a tokenizer saved by `Tokenizer.save` (its META file is written first)."""
    return bool(directory) and os.path.exists(os.path.join(directory, META))


def save_whole(tokenizer: Tokenizer, directory: str) -> None:
    """`tokenizer.save(directory)` as one rename: the (missing or empty) directory appears with all
    its files or not at all, so a process killed midway never leaves half a tokenizer."""
    with files.atomic_path(directory) as tmp:
        tokenizer.save(tmp)


def load_or_build(
    saved_dir: str | None, build: Callable[[], Tokenizer], cache_dir: str | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Tokenizer:  # fmt: skip
    """The tokenizer a run uses: the run's own when `saved_dir` holds one (a resumed run), else the
    one in `cache_dir` (built there by `build()` once, by one process, while the others wait;
    `on_wait()` is called before waiting), else a new one from `build()`."""
    if saved_in(saved_dir):
        return load(saved_dir)
    if cache_dir is None:
        return build()
    if not saved_in(cache_dir):
        with files.locked(cache_dir + ".lock", on_wait):
            if not saved_in(cache_dir):  # another process may have built it while we waited
                save_whole(build(), cache_dir)
    return load(cache_dir)


def load(directory: str) -> Tokenizer:
    """Reads back a tokenizer saved by `Tokenizer.save`."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        raise NotFound(f"no tokenizer in {directory} (expected {META})")
    with open(path) as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "sentencepiece":
        with open(os.path.join(directory, SentencePieceTokenizer.MODEL), "rb") as f:
            return SentencePieceTokenizer(f.read())
    if kind == "hf":
        return HFTokenizer.from_file(os.path.join(directory, HFTokenizer.FILE), meta.get("eos_id"))
    raise BadValue(f"{path}: unknown tokenizer kind {kind!r}")


def fingerprint(tokenizer: Tokenizer) -> dict:
    """Identifies a tokenizer (kind, vocab size, hash of its files): saved with every checkpoint."""
    h = hashlib.sha256(json.dumps(tokenizer._meta(), sort_keys=True).encode())
    for attr in ("proto", "json_str"):  # SentencePiece model / HF tokenizer.json
        v = getattr(tokenizer, attr, None)
        if v is not None:
            h.update(v if isinstance(v, bytes) else v.encode())
    return {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size), "sha256": h.hexdigest()[:16]}

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

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt to continue, with what the tokenizer puts in front of one (HF: BOS by its rule)."""
        return self.encode(text)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the EOS, if any (HF tokenizers may name several)."""
        return () if self.eos_id is None else (self.eos_id,)

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

        def lines():  # at most max_chars in all: the cap holds inside a text too (one text may be a whole file)
            n = 0
            for t in texts:
                for line in t.splitlines():
                    if line.strip():
                        line = line[: max_chars - n]
                        yield line
                        n += len(line)
                        reading.update(len(line))
                    if n >= max_chars:
                        reading.close()
                        return
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
    """A Hugging Face tokenizer: `tokenizer.json` through the `tokenizers` library (no transformers
    needed), with the files beside it that say how the checkpoint uses it (`SIDE_FILES`): its named
    special tokens, its BOS/EOS rule and its chat template (rendered by llm_jax/data/chat.py). The
    side files are kept verbatim, saved with the run and written back on export.

    `encode` is the text alone (training text, chat renderings, which carry their own special
    tokens); `encode_prompt` adds what transformers' `tokenizer(text)` adds in front (Llama 3's
    <|begin_of_text|>, Gemma's <bos>, nothing for Qwen). That BOS/EOS rule is tokenizer.json's
    post-processor alone: transformers 5 ignores tokenizer_config.json's `add_bos_token` /
    `add_eos_token` when a tokenizer.json is present, and so does this class. `stop_ids`: every end-of-sequence id the
    checkpoint names (tokenizer_config.json's eos_token, config.json's and generation_config.json's
    eos_token_id, e.g. Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Qwen's <|im_end|>). `decode`
    never returns special tokens' text.
    """

    kind = "hf"
    FILE = "tokenizer.json"
    SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    # The named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
    SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(
        self, json_str: str, eos_id: int | None = None, side_files: dict | None = None, stop_ids: Sequence[int] = ()
    ):
        from tokenizers import Tokenizer as _Tok

        self.json_str, self.side_files = json_str, dict(side_files or {})
        self.tok = _Tok.from_str(json_str)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = self._side_json("tokenizer_config.json")
        # tokenizer_config.json's special tokens win over special_tokens_map.json's, as in transformers.
        named = {**self._side_json("special_tokens_map.json"), **config}
        self.special_tokens = {k: _token_text(named[k]) for k in self.SPECIAL_KEYS if named.get(k) is not None}
        self.bos_id = self.special_id("bos_token")
        self.eos_id = eos_id if eos_id is not None else self.special_id("eos_token")
        ids = [self.eos_id, self.special_id("eos_token"), *stop_ids]
        self._stop_ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
        # transformers >= 4.5x saves the template as chat_template.jinja, older ones inside tokenizer_config.json.
        jinja = self.side_files.get("chat_template.jinja")
        self.chat_template = jinja or _default_template(config.get("chat_template"))

    def _side_json(self, name: str) -> dict:
        text = self.side_files.get(name)
        if text is None:
            return {}
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadValue(f"{name} of the tokenizer is not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise BadValue(f"{name} of the tokenizer holds a {type(out).__name__}, not a JSON object")
        return out

    def special_id(self, key: str) -> int | None:
        """The id of the named special token `key` ('bos_token', 'pad_token', ...), or None."""
        text = self.special_tokens.get(key)
        return None if text is None else self.tok.token_to_id(text)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    @classmethod
    def from_file(cls, path: str, eos_id: int | None = None):
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), eos_id)

    @classmethod
    def from_dir(cls, directory: str, eos_id: int | None = None, stop_ids: Sequence[int] = ()) -> "HFTokenizer":
        """tokenizer.json of `directory` and whichever of the SIDE_FILES lie beside it."""
        side = {}
        for name in cls.SIDE_FILES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    side[name] = f.read()
        with open(os.path.join(directory, cls.FILE), encoding="utf-8") as f:
            return cls(f.read(), eos_id, side, stop_ids)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character offsets in `text`."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_special(self, text: str) -> list[int]:
        """What transformers' `tokenizer(text).input_ids` gives: the text with BOS / EOS by the rule."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_prompt(self, text):
        ids = self.encode_special(text)
        if ids and ids[-1] in self.stop_ids and self.encode(text)[-1:] != ids[-1:]:
            ids = ids[:-1]  # a prompt is continued, not ended (add_eos_token=True)
        return ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def _meta(self):
        meta = {**super()._meta(), "eos_id": self.eos_id}
        if self.stop_ids != ((self.eos_id,) if self.eos_id is not None else ()):
            meta["stop_ids"] = list(self.stop_ids)
        return meta

    def save(self, directory):
        super().save(directory)
        files.write_text(os.path.join(directory, self.FILE), self.json_str)
        for name, text in self.side_files.items():
            files.write_text(os.path.join(directory, name), text)


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _default_template(value) -> str | None:
    """tokenizer_config.json's chat_template: one template, or a list of named ones ('default' is used)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value


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
        return HFTokenizer.from_dir(directory, meta.get("eos_id"), meta.get("stop_ids", ()))
    raise BadValue(f"{path}: unknown tokenizer kind {kind!r}")


def fingerprint(tokenizer: Tokenizer) -> dict:
    """Identifies a tokenizer (kind, vocab size, hash of its files): saved with every checkpoint.

    An HF tokenizer's side files (chat template, special-token names) are left out: they do not
    change which id is which, so a template can be added to a run (workdir/tokenizer/
    chat_template.jinja) without it refusing its own checkpoints."""
    h = hashlib.sha256(json.dumps(tokenizer._meta(), sort_keys=True).encode())
    for attr in ("proto", "json_str"):  # SentencePiece model / HF tokenizer.json
        v = getattr(tokenizer, attr, None)
        if v is not None:
            h.update(v if isinstance(v, bytes) else v.encode())
    return {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size), "sha256": h.hexdigest()[:16]}

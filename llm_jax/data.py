"""Input pipeline: a text source -> tokenizer -> one token stream per split -> per-host batches.

Sources (`config.data.source`):
- `stdlib`: the Python standard library's own `.py` files, present wherever Python is: the offline
  default (a tiny code model).
- `text`: a local UTF-8 text file (`config.data.path`), split by position: the first
  `1 - val_fraction` for training, the rest for validation (as nanoGPT splits Shakespeare).
- `tfds`: a tensorflow-datasets catalogue dataset (`config.data.tfds_name`) read through
  `tfds.data_source` (array_record files, no TensorFlow import). It must already be prepared in
  `config.data.tfds_data_dir`; offline, an unprepared dataset is a clear error.
- `jsonl`: prompt-completion examples for fine-tuning (`PromptCompletionData`, at the end of this
  file): loss on the completion tokens only.

Batches are windows of `seq_len + 1` tokens at positions drawn from a generator seeded with
`(seed, step)`: the batch of step N is a pure function of N, so the iterator's whole state is the
step number (saved in every checkpoint) and a resumed run sees exactly the batches it would have.
Each process computes only its own rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
import time
import zlib
from collections.abc import Iterator

import numpy as np

from llm_jax import progress as progress_lib
from llm_jax import tokenizer as tok_lib

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


@dataclasses.dataclass
class Splits:
    """Raw text of the training and validation splits (lists of documents)."""

    train: list[str]
    val: list[str]


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, source) for every .py file of the standard library outside tests."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if any(part in _STDLIB_SKIP for part in rel.split(os.sep)[:-1]):
            continue
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        docs.append((rel, text))
    if not docs:
        raise FileNotFoundError(f"found no .py files under the standard library at {root}")
    return docs


def read_text_file(path: str) -> str:
    """A UTF-8 text file, with errors that name the path and what to do."""
    if not path:
        raise ValueError("config.data.path is empty: give a text file with --config.data.path=FILE")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.path={path!r} does not exist or is not a file; give a readable text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"config.data.path={path!r} cannot be read: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"config.data.path={path!r} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"config.data.path={path!r} is empty; give a file with text in it")
    return text


def tfds_documents(name: str, split: str, data_dir: str | None, text_key: str, max_docs: int, log=None) -> list[str]:
    """Text documents of a prepared tfds dataset, via array_record data sources (no TensorFlow);
    progress and an ETA go to `log` while a large split is read."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise ImportError("config.data.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets") from e
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not prepared" / unknown names
        raise RuntimeError(
            f"tfds dataset {name!r} (split {split!r}, data_dir={data_dir!r}) is not available: "
            f"{type(e).__name__}: {e}\n"
            f"It must be downloaded and prepared as array_record first, on a machine with network access:\n"
            f"  tfds build {name} --file_format=array_record" + (f" --data_dir={data_dir}" if data_dir else "") + "\n"
            "or train on a local file instead: --config.data.source=text --config.data.path=FILE"
        ) from None
    n = len(source) if max_docs <= 0 else min(len(source), max_docs)
    docs = []
    for i in progress_lib.track(range(n), f"data: reading tfds {name} [{split}]", total=n, unit="docs", log=log):
        text = source[i][text_key]
        docs.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return docs


def load_splits(cfg, log=None) -> Splits:
    """Reads the configured source into train/validation documents (progress of long reads to `log`)."""
    if cfg.source == "stdlib":
        docs = stdlib_documents()
        # Split by file, stably (hash of the path): validation is unseen files, not the tail of one.
        val = [t for rel, t in docs if zlib.crc32(rel.encode()) % 1000 < cfg.val_fraction * 1000]
        train = [t for rel, t in docs if zlib.crc32(rel.encode()) % 1000 >= cfg.val_fraction * 1000]
        if cfg.max_chars > 0:
            train = _truncate(train, cfg.max_chars)
            val = _truncate(val, max(cfg.max_chars // 10, 1))
        return Splits(train, val)
    if cfg.source == "text":
        text = read_text_file(cfg.path)
        cut = int(len(text) * (1.0 - cfg.val_fraction))
        if cfg.max_chars > 0:
            text, cut = text[: cfg.max_chars], min(cut, int(cfg.max_chars * (1.0 - cfg.val_fraction)))
        return Splits([text[:cut]], [text[cut:]])
    if cfg.source == "tfds":
        train = tfds_documents(
            cfg.tfds_name, cfg.tfds_train_split, cfg.tfds_data_dir or None, cfg.tfds_text_key, cfg.max_docs, log
        )
        val = tfds_documents(
            cfg.tfds_name, cfg.tfds_val_split, cfg.tfds_data_dir or None, cfg.tfds_text_key, cfg.max_docs, log
        )
        return Splits(train, val)
    raise ValueError(f"config.data.source={cfg.source!r}: use 'stdlib', 'text' or 'tfds'")


def _truncate(docs: list[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        if n >= max_chars:
            break
        out.append(d[: max_chars - n])
        n += len(out[-1])
    return out


def build_tokenizer(cfg, train_docs: list[str], log=None) -> tok_lib.Tokenizer:
    """A new tokenizer of the configured kind, trained on the training split where it needs to be
    (SentencePiece reports its progress to `log`)."""
    if cfg.tokenizer == "byte":
        return tok_lib.ByteTokenizer()
    if cfg.tokenizer == "char":
        return tok_lib.CharTokenizer.train("".join(train_docs))
    if cfg.tokenizer == "sentencepiece":
        return tok_lib.SentencePieceTokenizer.train(
            train_docs, cfg.vocab_size, max_chars=cfg.tokenizer_train_chars, log=log
        )
    if cfg.tokenizer == "hf":
        if not cfg.tokenizer_path:
            raise ValueError("config.data.tokenizer='hf' needs config.data.tokenizer_path=.../tokenizer.json")
        return tok_lib.HFTokenizer.from_file(cfg.tokenizer_path)
    raise ValueError(f"config.data.tokenizer={cfg.tokenizer!r}: use 'byte', 'char', 'sentencepiece' or 'hf'")


# Tokenizers whose encode_array works line by line: a document cut after a newline encodes the same.
_LINEWISE = ("byte", "char", "sentencepiece")


def _line_chunks(text: str, size: int = 1 << 22):
    """`text` in pieces of about `size` characters, each ending after a newline (or at the end)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def tokenize(docs: list[str], tokenizer: tok_lib.Tokenizer, log=None, what: str = "data: tokenizing") -> np.ndarray:
    """Documents -> one int32 stream, documents separated by EOS where the tokenizer has one.

    Progress and an ETA go to `log` when it takes a while (a large document is encoded in pieces
    cut after newlines, where the tokenizer allows it, so that it shows progress too).
    """
    parts = []
    sep = None if tokenizer.eos_id is None else np.asarray([tokenizer.eos_id], np.int32)
    progress = progress_lib.Progress(what, sum(map(len, docs)), "chars", log)
    for d in docs:
        for piece in _line_chunks(d) if tokenizer.kind in _LINEWISE else (d,):
            parts.append(tokenizer.encode_array(piece))
            progress.update(len(piece))
        if sep is not None:
            parts.append(sep)
    progress.close()
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


@dataclasses.dataclass
class LMData:
    """Token streams of both splits plus the tokenizer that made them."""

    tokenizer: tok_lib.Tokenizer
    train_tokens: np.ndarray  # [n_train] int32
    val_tokens: np.ndarray  # [n_val] int32

    def check(self, seq_len: int) -> None:
        for name, toks in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(toks) < seq_len + 2:
                raise ValueError(
                    f"the {name} split has {len(toks)} tokens, fewer than seq_len+2={seq_len + 2}; "
                    "use more data, a smaller config.data.seq_len or a different config.data.val_fraction"
                )

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global training batch of `step`: inputs/targets [rows, seq_len]."""
        starts = np.random.default_rng([seed, step]).integers(
            0, len(self.train_tokens) - seq_len - 1, size=global_batch
        )
        rows = global_batch // process_count
        return windows(self.train_tokens, starts[process_index * rows : (process_index + 1) * rows], seq_len)

    def eval_batches(
        self,
        num_batches: int,
        global_batch: int,
        seq_len: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> list[dict[str, np.ndarray]]:
        """A fixed set of validation batches (the same every evaluation, so evals compare)."""
        rng = np.random.default_rng([seed, 2**31 - 1])
        rows = global_batch // process_count
        out = []
        for _ in range(num_batches):
            starts = rng.integers(0, len(self.val_tokens) - seq_len - 1, size=global_batch)
            out.append(windows(self.val_tokens, starts[process_index * rows : (process_index + 1) * rows], seq_len))
        return out


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Next-token pairs from windows of `tokens` beginning at `starts`: inputs/targets [len(starts), seq_len]."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = tokens[idx]
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}


def batches(
    data: LMData,
    start_step: int,
    global_batch: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
        yield data.train_batch(step, global_batch, seq_len, seed, process_index, process_count)
        step += 1


def load_data(cfg, tokenizer_dir: str | None = None, log=print) -> LMData:
    """Reads the source, builds (or loads from `tokenizer_dir`) the tokenizer, tokenizes both splits."""
    if cfg.source == "jsonl":
        return load_prompt_completion_data(cfg, tokenizer_dir, log)
    if cfg.source == "parallel":
        from llm_jax import seq2seq

        return seq2seq.load_parallel_data(cfg, tokenizer_dir, log)
    t0 = time.time()
    splits = load_splits(cfg, log)
    if not any(d.strip() for d in splits.train):
        raise ValueError(f"the training split of source={cfg.source!r} is empty; check config.data")
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, tok_lib.META)):
        tokenizer = tok_lib.load(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(cfg, splits.train, log)
    train = tokenize(splits.train, tokenizer, log, "data: tokenizing train")
    val = tokenize(splits.val, tokenizer, log, "data: tokenizing validation")
    log(
        f"data: {cfg.source} -> {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}), "
        f"{len(train):,} train / {len(val):,} val tokens in {time.time() - t0:.1f}s"
    )
    return LMData(tokenizer, train, val)


# ----------------------------------------------------------------------------------------------
# Prompt-completion fine-tuning: source='jsonl'


def read_jsonl_examples(path: str, key: str = "config.data.path") -> list[tuple[str, str]]:
    """(prompt, completion) of every non-empty line of a JSONL file; errors name the line and field."""
    if not path:
        raise ValueError(f'{key} is empty: give a JSONL file of {{"prompt": ..., "completion": ...}} lines')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path!r} does not exist or is not a file; give a JSONL file")
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text; convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{where}: expected a JSON object with 'prompt' and 'completion', got {type(obj).__name__}"
                )
            for field in ("prompt", "completion"):
                if field not in obj:
                    raise ValueError(f"{where}: missing field {field!r} (the object has {sorted(obj)})")
                if not isinstance(obj[field], str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {type(obj[field]).__name__}")
            examples.append((obj["prompt"], obj["completion"]))
    if not examples:
        raise ValueError(f"{key}={path!r} holds no examples; each line needs a 'prompt' and a 'completion'")
    return examples


def pack_examples(
    examples: list[tuple[np.ndarray, np.ndarray]], width: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Packs tokenized (prompt, completion + EOS) examples, in order, into rows of `width` tokens.

    Returns (tokens [rows, width] int32, mask [rows, width] bool: True on completion and EOS
    tokens, the only ones learned; False on prompts and padding, number of examples truncated).
    Whole examples go into a row while they fit; the rest of the row is padding. An example longer
    than a row keeps its last `width` tokens: the completion and the context nearest to it.
    """
    rows, masks, truncated = [], [], 0
    row, mask = [], []

    def flush():
        if row:
            rows.append(np.pad(np.concatenate(row), (0, width - sum(map(len, row))), constant_values=pad_id))
            masks.append(np.pad(np.concatenate(mask), (0, width - sum(map(len, mask)))))
            row.clear()
            mask.clear()

    for prompt, completion in examples:
        toks = np.concatenate([prompt, completion]).astype(np.int32)
        learn = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(completion), bool)])
        if len(toks) > width:
            toks, learn, truncated = toks[-width:], learn[-width:], truncated + 1
        if sum(map(len, row)) + len(toks) > width:
            flush()
        row.append(toks)
        mask.append(learn)
    flush()
    return np.stack(rows), np.stack(masks), truncated


@dataclasses.dataclass
class PromptCompletionData:
    """Prompt-completion examples (fine-tuning), with the interface of `LMData`.

    Each example is `prompt` then `completion` then EOS, tokenized separately (as the generate CLI
    encodes a prompt); examples are packed in file order into rows of seq_len + 1 tokens, and the
    batch's `weights` [rows, seq_len] are 1 only where the target is a completion token or its EOS,
    so `train.token_loss` learns (and evaluates) the completions alone. Training rows are drawn
    with replacement by a generator seeded with (seed, step); evaluation takes the validation rows
    in order.
    """

    tokenizer: tok_lib.Tokenizer
    train_examples: list  # [(prompt ids, completion ids + EOS)] int32 arrays
    val_examples: list
    _packed: dict = dataclasses.field(default_factory=dict, repr=False)

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, mask [rows, seq_len + 1], examples truncated) of 'train' or 'val', packed once per seq_len."""
        if (split, seq_len) not in self._packed:
            examples = self.train_examples if split == "train" else self.val_examples
            self._packed[split, seq_len] = pack_examples(examples, seq_len + 1)
        return self._packed[split, seq_len]

    def check(self, seq_len: int) -> None:
        for name, split in (("training", "train"), ("validation", "val")):
            tokens, _, truncated = self.rows(split, seq_len)
            if truncated == len(self.train_examples if split == "train" else self.val_examples):
                raise ValueError(
                    f"every {name} example is longer than seq_len+1={seq_len + 1} tokens, so all lose the start "
                    "of their prompt; raise config.data.seq_len (and config.model.max_len)"
                )

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`: inputs/targets/weights [rows, seq_len]."""
        tokens, mask, _ = self.rows("train", seq_len)
        idx = np.random.default_rng([seed, step]).integers(0, len(tokens), size=global_batch)
        rows = global_batch // process_count
        return _shifted(tokens, mask, idx[process_index * rows : (process_index + 1) * rows])

    def eval_batches(
        self,
        num_batches: int,
        global_batch: int,
        seq_len: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> list[dict[str, np.ndarray]]:
        """The validation rows in order (wrapping around if there are fewer than asked), the same every time."""
        tokens, mask, _ = self.rows("val", seq_len)
        rows = global_batch // process_count
        out = []
        for b in range(num_batches):
            idx = (b * global_batch + np.arange(global_batch)) % len(tokens)
            out.append(_shifted(tokens, mask, idx[process_index * rows : (process_index + 1) * rows]))
        return out


def _shifted(tokens: np.ndarray, mask: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` of packed tokens/mask [n, seq_len + 1] -> inputs, targets, weights [len(idx), seq_len]."""
    return {"inputs": tokens[idx, :-1], "targets": tokens[idx, 1:], "weights": mask[idx, 1:].astype(np.float32)}


def load_prompt_completion_data(cfg, tokenizer_dir: str | None = None, log=print) -> PromptCompletionData:
    """source='jsonl': reads `cfg.path` (and `cfg.val_path`, or the last `val_fraction` of the
    examples), builds or loads the tokenizer, tokenizes every example."""
    t0 = time.time()
    train = read_jsonl_examples(cfg.path)
    if cfg.val_path:
        val = read_jsonl_examples(cfg.val_path, "config.data.val_path")
    else:
        n_val = max(1, int(len(train) * cfg.val_fraction))
        if n_val >= len(train):
            raise ValueError(
                f"config.data.path={cfg.path!r} has {len(train)} examples: too few to hold out "
                f"val_fraction={cfg.val_fraction} for validation; add examples or give config.data.val_path"
            )
        train, val = train[:-n_val], train[-n_val:]
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, tok_lib.META)):
        tokenizer = tok_lib.load(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(cfg, [p + c for p, c in train], log)
    if tokenizer.eos_id is None:
        raise ValueError(
            f"config.data.source='jsonl' ends each completion with EOS, but the {tokenizer.kind!r} tokenizer has none; "
            "use config.data.tokenizer='byte' or 'sentencepiece'"
        )
    eos = np.asarray([tokenizer.eos_id], np.int32)

    def encode(examples):
        return [(tokenizer.encode_array(p), np.concatenate([tokenizer.encode_array(c), eos])) for p, c in examples]

    data = PromptCompletionData(tokenizer, encode(train), encode(val))
    n_tokens = sum(len(p) + len(c) for p, c in data.train_examples)
    log(
        f"data: jsonl -> {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}), {len(train):,} train / "
        f"{len(val):,} val examples ({n_tokens:,} train tokens) in {time.time() - t0:.1f}s"
    )
    return data

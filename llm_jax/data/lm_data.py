"""Input pipeline: prepared token files -> windows -> per-process batches, a pure function of (seed, step).

Every language-modelling source (`stdlib`, `text`, `tfds`: llm_jax/data/sources.py) is tokenized
once by llm_jax/data/prepare.py into sharded token files; `load_data` prepares them on first use and
opens them here (`TokenFiles`: each window read from its shard file), so a run's memory does not
grow with the corpus and every process reads only the windows of its own rows. `jsonl`
(prompt-completion fine-tuning, small by nature) is read whole: `PromptCompletionData`, at the end
of this file, with prompt-completion lines or conversations (`{"messages": [...]}` lines, rendered
by the tokenizer's chat template, the assistant turns learned).

Batches are windows of `seq_len + 1` tokens at positions drawn from a generator seeded with
`(seed, step)`: the batch of step N is a pure function of N, so the iterator's whole state is the
step number (saved in every checkpoint) and a resumed run sees exactly the batches it would have.
Each process computes only its own rows of the global batch. Validation uses a fixed set of
windows of the validation split.

`config.data.packing='documents'`: a window that spans documents also carries `segment_ids` (one
per document in the row), `positions` that restart at 0 where a document starts, and `weights` that
drop the one target per boundary that belongs to the next document; the model then never attends
across a document boundary (llm_jax/models/model.py), so each document is learned as if it were alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import weakref
from collections.abc import Iterator

import numpy as np

from llm_jax.data import chat as chat_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.prepare import build_tokenizer  # noqa: F401  (part of this module's interface)
from llm_jax.data.protocol import DataSource, rows_of
from llm_jax.runtime.errors import BadValue, NotFound

PACKING = ("none", "documents")


# ----------------------------------------------------------------------------------------------
# Token streams: one split's tokens and where its documents start


class ArrayTokens:
    """A split held in memory (tests, small data): tokens [n] and document starts [d] (offsets)."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None):
        self.tokens = np.asarray(tokens)
        self.starts = np.zeros(1, np.int64) if doc_starts is None else np.asarray(doc_starts, np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def __array__(self, dtype=None, copy=None):
        return self.tokens if dtype is None else self.tokens.astype(dtype)

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int32 [n]."""
        return self.tokens[start : start + n].astype(np.int32)

    def doc_starts(self, start: int, n: int) -> np.ndarray:
        """Offsets (int64, ascending) in [start, start + n) where a document starts."""
        return self.starts[np.searchsorted(self.starts, start) : np.searchsorted(self.starts, start + n)]


class TokenFiles:
    """A prepared split: a window's tokens are read from its shard file (`os.pread`), document
    starts through a memory map; shards are opened on first use. Reading, not mapping, the tokens
    keeps memory flat in the corpus size: a mapped page counts as the process's own once touched,
    and the kernel maps whole large folios around each touch (measured: 320 random windows of a
    568 MB shard set added 166 MiB resident through a memory map), none through `pread`."""

    def __init__(self, directory: str, shards: list[dict], dtype: str):
        self.directory, self.shards, self.dtype = directory, shards, np.dtype(dtype)
        self.offsets = np.cumsum([0] + [s["tokens"] for s in shards], dtype=np.int64)
        self._tokens: dict[int, int] = {}  # shard -> open file descriptor of its tokens
        self._starts: dict[int, np.ndarray] = {}
        weakref.finalize(self, _close_all, self._tokens)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def _shard(self, i: int) -> tuple[int, np.ndarray]:
        if i not in self._tokens:
            path = os.path.join(self.directory, self.shards[i]["name"])
            self._starts[i] = np.load(path + ".docs.npy", mmap_mode="r")
            self._tokens[i] = os.open(path + ".tokens", os.O_RDONLY)
        return self._tokens[i], self._starts[i]

    def _read_shard(self, i: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of shard i, in the shard's dtype."""
        fd, size = self._shard(i)[0], self.dtype.itemsize
        want, at, parts = (hi - lo) * size, lo * size, []
        while want:  # one read returns at most ~2 GB
            part = os.pread(fd, min(want, 1 << 30), at)
            if not part:
                path = os.path.join(self.directory, self.shards[i]["name"] + ".tokens")
                raise BadValue(
                    f"{path} holds {os.fstat(fd).st_size:,} bytes, fewer than the {self.shards[i]['tokens']:,} tokens "
                    f"x {size} bytes its manifest counts; delete {self.directory} to prepare it again"
                )
            parts.append(part)
            want, at = want - len(part), at + len(part)
        return np.frombuffer(b"".join(parts), self.dtype)  # (one part: joined without a copy)

    def _spans(self, start: int, n: int):
        """(shard, local start, local end, global offset of the shard) covering [start, start + n)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        end = start + n
        while start < end and i < len(self.shards):
            base = int(self.offsets[i])
            stop = min(end, int(self.offsets[i + 1]))
            yield i, start - base, stop - base, base
            start, i = stop, i + 1

    def read(self, start: int, n: int) -> np.ndarray:
        parts = [self._read_shard(i, lo, hi) for i, lo, hi, _ in self._spans(start, n)]
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int32)

    def doc_starts(self, start: int, n: int) -> np.ndarray:
        out = []
        for i, lo, hi, base in self._spans(start, n):
            s = self._shard(i)[1]
            out.append(np.asarray(s[np.searchsorted(s, lo) : np.searchsorted(s, hi)], np.int64) + base)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def _doc_bounds(stream) -> np.ndarray:
    """Where each document of a stream starts, then the stream's end: [d + 1] int64."""
    starts = np.asarray(stream.doc_starts(0, len(stream)), np.int64)
    if not len(starts) or starts[0] != 0:  # tokens before the first recorded start are a document too
        starts = np.concatenate([[0], starts])
    return np.concatenate([starts, [len(stream)]])


@functools.lru_cache(maxsize=4)
def long_spans(stream, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents with at least seq_len + 1 tokens: (their first tokens [m], the cumulative count of
    window starts inside them [m + 1], from 0); a window may start at the first n - seq_len
    tokens of a document of n."""
    bounds = _doc_bounds(stream)
    first, length = bounds[:-1], np.diff(bounds)
    keep = length >= seq_len + 1
    return first[keep], np.concatenate([[0], np.cumsum(length[keep] - seq_len)]).astype(np.int64)


def _as_stream(tokens):
    return tokens if isinstance(tokens, (ArrayTokens, TokenFiles)) else ArrayTokens(tokens)


# ----------------------------------------------------------------------------------------------
# Windows and batches


def windows(tokens, starts: np.ndarray, seq_len: int, packing: str = "none") -> dict[str, np.ndarray]:
    """Next-token pairs from windows of `tokens` (a stream or an array) beginning at `starts`:
    inputs/targets [len(starts), seq_len]; with packing='documents' also segment_ids, positions
    (int32) and weights (float32) of the same shape."""
    stream = _as_stream(tokens)
    chunk = np.stack([stream.read(int(s), seq_len + 1) for s in starts])
    batch = {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}
    if packing == "documents":
        segs, pos = zip(*(_segments(stream.doc_starts(int(s) + 1, seq_len) - int(s), seq_len + 1) for s in starts))
        segs, pos = np.stack(segs), np.stack(pos)
        batch["segment_ids"], batch["positions"] = segs[:, :-1], pos[:, :-1]
        # The target of the last token of a document is the first of the next: not learned (no
        # attention can see the document it opens).
        batch["weights"] = (segs[:, 1:] == segs[:, :-1]).astype(np.float32)
    elif packing != "none":
        raise BadValue(f"config.data.packing={packing!r}: use one of {PACKING}")
    return batch


def _segments(rel_starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Document starts within a window (offsets in 1..n-1, ascending) -> segment ids [n] (1, 2, ...)
    and positions [n] that restart at 0 at each start."""
    idx = np.arange(n)
    count = np.searchsorted(rel_starts, idx, side="right")  # starts at or before each token
    first = np.concatenate([[0], rel_starts])[count]  # where each token's document begins (in the window)
    return (count + 1).astype(np.int32), (idx - first).astype(np.int32)


@dataclasses.dataclass
class LMData:
    """Token streams of both splits (prepared files or arrays) plus the tokenizer that made them."""

    tokenizer: tok_lib.Tokenizer
    train_tokens: ArrayTokens | TokenFiles | np.ndarray  # [n_train]
    val_tokens: ArrayTokens | TokenFiles | np.ndarray  # [n_val]
    packing: str = "none"
    directory: str = ""  # the prepared set read (empty for arrays)
    long_documents: bool = False  # every window inside one document (see `window_starts`)

    def __post_init__(self):
        self.train_tokens, self.val_tokens = _as_stream(self.train_tokens), _as_stream(self.val_tokens)
        if self.packing not in PACKING:
            raise BadValue(f"config.data.packing={self.packing!r}: use one of {PACKING}")

    def check(self, seq_len: int) -> None:
        for name, toks in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(toks) < seq_len + 2:
                raise BadValue(
                    f"the {name} split has {len(toks)} tokens, fewer than seq_len+2={seq_len + 2}; "
                    "use more data, a smaller config.data.seq_len or a different config.data.val_fraction"
                )
            if self.long_documents and not long_spans(toks, seq_len)[1][-1]:
                longest = int(np.max(np.diff(_doc_bounds(toks))))
                raise BadValue(
                    f"config.data.long_documents: no {name} document has seq_len+1={seq_len + 1} tokens (the "
                    f"longest has {longest}); use a shorter config.data.seq_len or longer documents"
                )

    def window_starts(self, tokens, rng: np.random.Generator, n: int, seq_len: int) -> np.ndarray:
        """`n` window starts drawn by `rng`: anywhere in the stream, or with `long_documents` only
        where the whole window of seq_len + 1 tokens lies inside one document (each possible start of
        every document that long equally likely): long-context training sees whole long texts, no
        document boundary and no short document filling the window."""
        if not self.long_documents:
            return rng.integers(0, len(tokens) - seq_len - 1, size=n)
        first, cum = long_spans(tokens, seq_len)
        u = rng.integers(0, cum[-1], size=n)
        doc = np.searchsorted(cum, u, side="right") - 1
        return first[doc] + u - cum[doc]

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global training batch of `step`: inputs/targets [rows, seq_len]."""
        starts = self.window_starts(self.train_tokens, np.random.default_rng([seed, step]), global_batch, seq_len)
        return windows(self.train_tokens, rows_of(starts, process_index, process_count), seq_len, self.packing)

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
        out = []
        for _ in range(num_batches):
            starts = self.window_starts(self.val_tokens, rng, global_batch, seq_len)
            out.append(windows(self.val_tokens, rows_of(starts, process_index, process_count), seq_len, self.packing))
        return out


def batches(
    data: DataSource,
    start_step: int,
    global_batch: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_steps: int | None = None,
    prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """The training batches of steps start_step, start_step + 1, ... (up to num_steps), each still
    `data.train_batch(step, ...)`: built `prefetch` steps ahead in a background thread by a grain
    `MapDataset` over the step numbers, so the next batch is read while the device computes."""

    def batch_of(step):
        return data.train_batch(int(step), global_batch, seq_len, seed, process_index, process_count)

    stop = num_steps if num_steps is not None else 2**62
    try:
        import grain
    except ImportError:  # grain is a dependency; without it, the same batches without prefetch
        return map(batch_of, range(start_step, stop))
    steps = grain.MapDataset.range(start_step, stop).map(batch_of)
    if prefetch <= 0:
        return iter(steps)
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def load_data(cfg, tokenizer_dir: str | None = None, log=print) -> DataSource:
    """The configured data: prepared token files (prepared now on first use), with the tokenizer
    from `tokenizer_dir` when given (a resumed run), else the configured one."""
    if cfg.source == "jsonl":
        return load_prompt_completion_data(cfg, tokenizer_dir, log)
    if cfg.source == "parallel":
        from llm_jax.data import parallel as seq2seq

        return seq2seq.load_parallel_data(cfg, tokenizer_dir, log)
    t0 = time.time()
    directory, manifest, tokenizer = prepare_lib.prepare(cfg, tokenizer_dir, log)
    split = {s: TokenFiles(directory, manifest["splits"][s]["shards"], manifest["dtype"]) for s in ("train", "val")}
    long_docs = bool(cfg.get("long_documents", False))
    data = LMData(tokenizer, split["train"], split["val"], cfg.packing, directory, long_docs)
    log(
        f"data: {cfg.source} -> {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}), "
        f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens ({directory}) "
        f"in {time.time() - t0:.1f}s"
    )
    return data


def batch_options(cfg) -> dict[str, bool]:
    """Which optional arrays the batches of the configured source (`config.data`) carry, as the
    keyword arguments of a family's `batch_spec` / `random_batch`: `weights` (jsonl prompt-completion
    learns the completions only; packed documents drop the target across each boundary; parallel
    text weighs out padding; preference pairs learn the responses only) and `packed` (segment ids
    and positions: packing='documents', or parallel text, whose pairs are always packed). jsonl and
    preference rows are never packed by document."""
    documents = cfg.packing == "documents" and cfg.source not in ("jsonl", "parallel", "preference")
    weighted = cfg.source in ("jsonl", "parallel", "preference") or documents
    return {"weights": weighted, "packed": cfg.source == "parallel" or documents}


# ----------------------------------------------------------------------------------------------
# Prompt-completion fine-tuning: source='jsonl'


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A `{"messages": [...]}` line of a fine-tuning JSONL file, rendered later with the chat template."""

    messages: list  # [{"role", "content"}, ...], checked by chat.check_messages
    where: str  # "FILE:LINE", for errors


def jsonl_objects(path: str, key: str, what: str):
    """(where "FILE:LINE", object) of every non-empty line of a JSONL file, each line read bounded
    (a huge line is never read whole), decoded as UTF-8 and checked to be a JSON object; `key` (the
    config key of the path) and `what` (the fields a line holds) name the fix in errors."""
    if not path:
        raise BadValue(f"{key} is empty: give a JSONL file of {what} lines")
    if not os.path.isfile(path):
        raise NotFound(f"{key}={path!r} does not exist or is not a file; give a JSONL file")
    bound = sources.MAX_LINE_BYTES
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(bound + 1), b""), 1):
            where = f"{path}:{n}"
            if len(raw) > bound:
                raise BadValue(f"{where}: a line longer than {bound:,} bytes; split that example or leave it out")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadValue(f"{where}: not UTF-8 text; convert the file to UTF-8") from None
            obj = sources.json_line(line, where)
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise BadValue(f"{where}: expected a JSON object with {what}, got {type(obj).__name__}")
            yield where, obj


def read_jsonl_examples(path: str, key: str = "config.data.path") -> list[tuple[str, str] | Conversation]:
    """The examples of every non-empty line of a JSONL file: (prompt, completion) of a
    {"prompt", "completion"} line, a Conversation of a {"messages": [{"role", "content"}, ...]}
    line; errors name the line and field."""
    examples = []
    what = '{"prompt": ..., "completion": ...} or {"messages": [...]}'
    for where, obj in jsonl_objects(path, key, what):
        if "messages" in obj:
            examples.append(Conversation(chat_lib.check_messages(obj["messages"], f"{where}: messages"), where))
            continue
        for field in ("prompt", "completion"):
            if field not in obj:
                raise BadValue(f"{where}: missing field {field!r} (the object has {sorted(obj)})")
            if not isinstance(obj[field], str):
                raise BadValue(f"{where}: field {field!r} must be a string, got {type(obj[field]).__name__}")
        examples.append((obj["prompt"], obj["completion"]))
    if not examples:
        raise BadValue(f"{key}={path!r} holds no examples; each line needs a 'prompt' and a 'completion'")
    return examples


def pack_examples(
    examples: list[tuple[np.ndarray, np.ndarray]], width: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Packs tokenized examples, (ids [n] int32, learn [n] bool) each, in order, into rows of `width` tokens.

    Returns (tokens [rows, width] int32, mask [rows, width] bool: True on the learned tokens (a
    completion and its EOS, an assistant turn and its end-of-turn token); False on prompts, user
    turns and padding, number of examples truncated). Whole examples go into a row while they fit;
    the rest of the row is padding. An example longer than a row keeps its last `width` tokens: the
    (last) answer and the context nearest to it.
    """
    rows, masks, truncated = [], [], 0
    row, mask = [], []

    def flush():
        if row:
            rows.append(np.pad(np.concatenate(row), (0, width - sum(map(len, row))), constant_values=pad_id))
            masks.append(np.pad(np.concatenate(mask), (0, width - sum(map(len, mask)))))
            row.clear()
            mask.clear()

    for toks, learn in examples:
        toks, learn = np.asarray(toks, np.int32), np.asarray(learn, bool)
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
    """Prompt-completion examples (fine-tuning), a `DataSource` (llm_jax/data/protocol.py) like `LMData`.

    Each example is `prompt` then `completion` then EOS, tokenized separately (as the generate CLI
    encodes a prompt), or a conversation rendered whole with the tokenizer's chat template
    (llm_jax/data/chat.py) whose assistant turns, each with its end-of-turn token, are learned.
    Examples are packed in file order into rows of seq_len + 1 tokens, and the batch's `weights`
    [rows, seq_len] are 1 only where the target is a learned token, so the loss
    (`llm_jax.models.loss.token_loss`) learns (and evaluates) the answers alone. Training rows are drawn
    with replacement by a generator seeded with (seed, step); evaluation takes the validation rows
    in order.
    """

    tokenizer: tok_lib.Tokenizer
    train_examples: list  # [(ids int32 [n], learn bool [n])]
    val_examples: list
    _packed: dict = dataclasses.field(default_factory=dict, repr=False)
    log: object = dataclasses.field(default=print, repr=False)  # where `check` reports truncated examples

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, mask [rows, seq_len + 1], examples truncated) of 'train' or 'val', packed once per seq_len."""
        if (split, seq_len) not in self._packed:
            examples = self.train_examples if split == "train" else self.val_examples
            self._packed[split, seq_len] = pack_examples(examples, seq_len + 1)
        return self._packed[split, seq_len]

    def check(self, seq_len: int) -> None:
        for name, split in (("training", "train"), ("validation", "val")):
            tokens, mask, truncated = self.rows(split, seq_len)
            if truncated == len(self.train_examples if split == "train" else self.val_examples):
                raise BadValue(
                    f"every {name} example is longer than seq_len+1={seq_len + 1} tokens, so all lose the start "
                    "of their prompt; raise config.data.seq_len (and config.model.max_len)"
                )
            n = len(self.train_examples if split == "train" else self.val_examples)
            if truncated:
                self.log(
                    f"data: {truncated} of {n} {name} examples are longer than seq_len+1={seq_len + 1} tokens and "
                    "keep only their last tokens (the answer and the context nearest to it); raise config.data.seq_len "
                    "to keep them whole"
                )
            if not mask[:, 1:].any():
                raise BadValue(
                    f"no {name} example has a token to learn (a completion, an EOS or an assistant turn) within "
                    f"seq_len+1={seq_len + 1} tokens; give conversations with assistant turns, or raise "
                    "config.data.seq_len"
                )

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`: inputs/targets/weights [rows, seq_len]."""
        tokens, mask, _ = self.rows("train", seq_len)
        idx = np.random.default_rng([seed, step]).integers(0, len(tokens), size=global_batch)
        return _shifted(tokens, mask, rows_of(idx, process_index, process_count))

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
        out = []
        for b in range(num_batches):
            idx = (b * global_batch + np.arange(global_batch)) % len(tokens)
            out.append(_shifted(tokens, mask, rows_of(idx, process_index, process_count)))
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
            raise BadValue(
                f"config.data.path={cfg.path!r} has {len(train)} examples: too few to hold out "
                f"val_fraction={cfg.val_fraction} for validation; add examples or give config.data.val_path"
            )
        train, val = train[:-n_val], train[-n_val:]
    texts = ["".join(m["content"] for m in e.messages) if isinstance(e, Conversation) else e[0] + e[1] for e in train]
    tokenizer = tok_lib.load_or_build(tokenizer_dir, lambda: build_tokenizer(cfg, texts))
    chat = None
    if any(isinstance(e, Conversation) for e in train + val):
        where = f"the tokenizer of this run ({tokenizer_dir or cfg.tokenizer_path or cfg.tokenizer})"
        fix = f"save it as {os.path.join(tokenizer_dir or 'WORKDIR/tokenizer', 'chat_template.jinja')}"
        chat = chat_lib.chat_for(tokenizer, where=where, fix=fix)
    elif tokenizer.eos_id is None:
        raise BadValue(
            f"config.data.source='jsonl' ends each completion with EOS, but the {tokenizer.kind!r} tokenizer has none; "
            "use config.data.tokenizer='byte' or 'sentencepiece'"
        )

    def encode(examples):
        return [encode_example(tokenizer, chat, e) for e in examples]

    data = PromptCompletionData(tokenizer, encode(train), encode(val), log=log)
    n_tokens = sum(len(ids) for ids, _ in data.train_examples)
    log(
        f"data: jsonl -> {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}), {len(train):,} train / "
        f"{len(val):,} val examples ({n_tokens:,} train tokens) in {time.time() - t0:.1f}s"
    )
    return data


def encode_example(tokenizer, chat, example) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], learn bool [n]) of a (prompt, completion) pair (completion + EOS learned) or
    of a Conversation (its assistant turns learned); a conversation's error names its line."""
    if isinstance(example, Conversation):
        try:
            return chat_lib.encode_conversation(tokenizer, chat, example.messages)
        except chat_lib.ChatError as e:
            raise chat_lib.ChatError(f"{example.where}: {e}") from None
    # The prompt as generate encodes one (an HF tokenizer's BOS in front), so training matches use.
    prompt = np.asarray(tokenizer.encode_prompt(example[0]), np.int32)
    completion = tokenizer.encode_array(example[1])
    ids = np.concatenate([prompt, completion, [tokenizer.eos_id]]).astype(np.int32)
    return ids, np.arange(len(ids)) >= len(prompt)

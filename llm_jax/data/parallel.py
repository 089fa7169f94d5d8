"""Parallel data for sequence-to-sequence training (`config.data.source = 'parallel'`).

Files: `{data.path}/{split}.{lang}`, plain or `.gz`, UTF-8, one sentence per line, line i of the
source file the translation of line i of the target file (Multi30k's layout: `train.en.gz`,
`train.de.gz`, `val.en.gz`, ...). Rules, never a silent shift of pairs:
- files of different line counts are an error naming both files and counts;
- a pair with an empty side is left out (counted in the log line);
- a pair with more than `data.seq_len - 1` tokens on either side is left out of training and
  evaluation (counted; raise `data.seq_len` to keep it); `llm_jax.translate` cuts such a source
  to the model's `max_len` with a warning instead.

One joint SentencePiece vocabulary is trained on both sides of the training split (saved with the
run). Pairs are packed: several per row of `seq_len` source and `seq_len` target slots,
first-fit-decreasing by length, with segment ids (1, 2, ...; 0 = padding) and positions restarting
in every pair, so padding does not dominate the compute and attention never crosses a pair
(llm_jax/models/encdec.py). The batch of step N is a pure function of (seed, N): epoch e visits the pairs
in the order of a permutation seeded by (seed, e), a step packs the next `pairs_per_step` of them,
so a resumed run sees exactly the batches it would have. The rare pair that does not fit its
step's rows waits for the next epoch (counted).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from llm_jax.data import progress as progress_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.protocol import rows_of
from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, FileError, NotFound

BATCH_KEYS = ("source", "source_positions", "source_segments", "inputs", "targets", "positions", "segments")


def split_path(directory: str, split: str, lang: str) -> str:
    """`{directory}/{split}.{lang}`, or its `.gz`; errors name both names tried."""
    plain = os.path.join(directory, f"{split}.{lang}")
    for path in (plain, plain + ".gz"):
        if os.path.isfile(path):
            return path
    raise NotFound(
        f"no {plain} or {plain}.gz: config.data.path={directory!r} must hold {split}.{lang}[.gz] "
        f"(set config.data.path, src_lang, tgt_lang or the split names)"
    )


def read_lines(path: str) -> list[str]:
    """The lines of a plain or gzipped UTF-8 text file, without line ends."""
    try:
        with files.open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise FileError(f"{path} cannot be read ({e}); give a readable text or .gz file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadValue(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def read_pairs(directory: str, split: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of a split, aligned line by line."""
    src_path, tgt_path = split_path(directory, split, src_lang), split_path(directory, split, tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise BadValue(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: line i of one must translate line i "
            "of the other; fix the files (no pair is guessed)"
        )
    return src, tgt


@dataclasses.dataclass
class Encoded:
    """A split's usable pairs, tokenized, and what was left out."""

    source: list[np.ndarray]  # int32 ids, no EOS
    target: list[np.ndarray]  # int32 ids, no BOS / EOS
    raw_source: list[str]
    raw_target: list[str]
    empty: int  # pairs with an empty side
    too_long: int  # pairs over seq_len - 1 tokens on a side


def encode_split(src: list[str], tgt: list[str], tokenizer, seq_len: int, log=None, what: str = "data: tokenizing",
                 block: int = 8192) -> Encoded:  # fmt: skip
    """Tokenizes the pairs (SentencePiece's batch API, `block` pairs at a time, progress and an ETA
    to `log` when it takes a while) and applies the rules of the module docstring."""
    keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() and t.strip()]
    src_ids, tgt_ids = [], []
    progress = progress_lib.Progress(what, len(keep), "pairs", log)
    for b in range(0, len(keep), block):
        rows = keep[b : b + block]
        src_ids += tokenizer.encode_batch([src[i] for i in rows])
        tgt_ids += tokenizer.encode_batch([tgt[i] for i in rows])
        progress.update(len(rows))
    progress.close()
    fits = [j for j in range(len(keep)) if len(src_ids[j]) <= seq_len - 1 and len(tgt_ids[j]) <= seq_len - 1]
    return Encoded(
        source=[np.asarray(src_ids[j], np.int32) for j in fits],
        target=[np.asarray(tgt_ids[j], np.int32) for j in fits],
        raw_source=[src[keep[j]] for j in fits],
        raw_target=[tgt[keep[j]] for j in fits],
        empty=len(src) - len(keep),
        too_long=len(keep) - len(fits),
    )


def pack(source: list[np.ndarray], target: list[np.ndarray], rows: int, width: int, bos: int, eos: int,
         pad: int = 0) -> tuple[dict[str, np.ndarray], list[int]]:  # fmt: skip
    """Packs pairs into `rows` rows of `width` source and `width` target slots, first-fit-decreasing.

    Returns the batch ([rows, width] arrays: source, inputs = BOS + target, targets = target + EOS,
    positions and segments of both, weights) and the indices of the pairs that did not fit.
    """
    batch = {
        k: np.full((rows, width), pad if k in ("source", "inputs", "targets") else 0, np.int32) for k in BATCH_KEYS
    }
    batch["weights"] = np.zeros((rows, width), np.float32)
    used_src, used_tgt, count = np.zeros(rows, int), np.zeros(rows, int), np.zeros(rows, int)
    left_out = []
    for i in sorted(range(len(source)), key=lambda i: -max(len(source[i]), len(target[i]) + 1)):
        s, t = source[i], target[i]
        n_s, n_t = len(s), len(t) + 1
        free = np.nonzero((used_src + n_s <= width) & (used_tgt + n_t <= width))[0]
        if not len(free):
            left_out.append(i)
            continue
        r = free[0]
        a, b = used_src[r], used_tgt[r]
        count[r] += 1
        batch["source"][r, a : a + n_s] = s
        batch["source_positions"][r, a : a + n_s] = np.arange(n_s)
        batch["source_segments"][r, a : a + n_s] = count[r]
        batch["inputs"][r, b : b + n_t] = np.concatenate([[bos], t])
        batch["targets"][r, b : b + n_t] = np.concatenate([t, [eos]])
        batch["positions"][r, b : b + n_t] = np.arange(n_t)
        batch["segments"][r, b : b + n_t] = count[r]
        batch["weights"][r, b : b + n_t] = 1.0
        used_src[r] += n_s
        used_tgt[r] += n_t
    return batch, left_out


@dataclasses.dataclass
class ParallelData:
    """Packed translation pairs of both splits plus the joint tokenizer (a `DataSource`, llm_jax/data/protocol.py)."""

    tokenizer: tok_lib.Tokenizer
    train: Encoded
    val: Encoded
    seq_len: int
    fill: float = 0.9  # pairs per step aim at this fraction of the target slots

    def pairs_per_step(self, global_batch: int) -> int:
        """How many pairs one step packs: enough to fill about `fill` of the target slots."""
        mean = np.mean([max(len(s), len(t) + 1) for s, t in zip(self.train.source, self.train.target)])
        return max(1, min(len(self.train.source), int(global_batch * self.seq_len * self.fill / mean)))

    def check(self, seq_len: int) -> None:
        for name, split in (("training", self.train), ("validation", self.val)):
            if not split.source:
                raise BadValue(
                    f"the {name} split has no usable pair ({split.empty} with an empty side, {split.too_long} longer "
                    f"than seq_len-1={seq_len - 1} tokens); check config.data.path or raise config.data.seq_len"
                )

    def train_batch(self, step: int, global_batch: int, seq_len: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:  # fmt: skip
        """This process's rows of the global packed batch of `step`."""
        k = self.pairs_per_step(global_batch)
        per_epoch = len(self.train.source) // k
        epoch, j = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.train.source))[j * k : (j + 1) * k]
        src, tgt = [self.train.source[i] for i in order], [self.train.target[i] for i in order]
        batch, _ = pack(src, tgt, global_batch, seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id)
        return rows_of(batch, process_index, process_count)

    def eval_batches(self, num_batches: int, global_batch: int, seq_len: int, seed: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:  # fmt: skip
        """The validation pairs packed batch after batch (the same every evaluation): the whole split
        when `num_batches` batches hold it, else as many pairs as they hold."""
        out, remaining = [], list(range(len(self.val.source)))
        while remaining and len(out) < num_batches:
            src, tgt = [self.val.source[i] for i in remaining], [self.val.target[i] for i in remaining]
            batch, left = pack(src, tgt, global_batch, seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id)
            out.append(rows_of(batch, process_index, process_count))
            remaining = [remaining[i] for i in left]
        return out


def joint_vocabulary(cfg, src: list[str], tgt: list[str], log=print) -> tok_lib.SentencePieceTokenizer:
    """One SentencePiece vocabulary for both languages, trained on the training pairs as prose."""
    if cfg.tokenizer != "sentencepiece":
        raise BadValue(f"config.data.tokenizer={cfg.tokenizer!r}: source='parallel' uses 'sentencepiece'")
    log(f"data: training a joint {cfg.vocab_size}-piece SentencePiece vocabulary on {len(src):,} pairs")
    return tok_lib.SentencePieceTokenizer.train(
        src + tgt, cfg.vocab_size, max_chars=cfg.tokenizer_train_chars, prose=True, log=log
    )


def load_parallel_data(cfg, tokenizer_dir: str | None = None, log=print) -> ParallelData:
    """Reads both splits, trains (or loads from `tokenizer_dir`) the joint vocabulary, tokenizes."""
    t0 = time.time()
    if not cfg.path:
        raise BadValue("config.data.source='parallel' needs config.data.path: a directory of {split}.{lang}[.gz]")
    train_src, train_tgt = read_pairs(cfg.path, cfg.train_split, cfg.src_lang, cfg.tgt_lang)
    val_src, val_tgt = read_pairs(cfg.path, cfg.val_split, cfg.src_lang, cfg.tgt_lang)
    tokenizer = tok_lib.load_or_build(tokenizer_dir, lambda: joint_vocabulary(cfg, train_src, train_tgt, log))
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise BadValue(f"the {tokenizer.kind!r} tokenizer has no BOS/EOS ids, which the decoder needs")
    data = ParallelData(
        tokenizer,
        encode_split(train_src, train_tgt, tokenizer, cfg.seq_len, log, "data: tokenizing train"),
        encode_split(val_src, val_tgt, tokenizer, cfg.seq_len, log, "data: tokenizing validation"),
        cfg.seq_len,
    )
    log(
        f"data: parallel {cfg.src_lang}->{cfg.tgt_lang} -> {tokenizer.kind} (vocab {tokenizer.vocab_size}), "
        f"{len(data.train.source):,} train / {len(data.val.source):,} val pairs (left out: train {data.train.empty} "
        f"empty, {data.train.too_long} over {cfg.seq_len - 1} tokens; val {data.val.empty} empty, "
        f"{data.val.too_long} too long) in {time.time() - t0:.1f}s"
    )
    return data

"""Preference pairs for DPO / SimPO (`config.data.source='preference'`): a JSONL file whose lines
each hold a prompt, a chosen and a rejected response.

Line forms (errors name FILE:LINE and the field):
- `{"prompt": str, "chosen": str, "rejected": str}`: each row is the prompt (encoded as `generate`
  encodes one), the response and EOS; the response and its EOS are learned;
- `{"chosen": [messages], "rejected": [messages]}`: two whole conversations, rendered with the
  checkpoint's chat template (llm_jax/data/chat.py) as `{"messages"}` fine-tuning renders them; the
  messages both share at the start are the prompt, the assistant turns after it are learned;
- `{"prompt": [messages], "chosen": ..., "rejected": ...}`: the prompt as a conversation, each
  response an assistant reply (a string, a message or a list of messages) appended to it.

Each pair becomes two rows of `seq_len + 1` tokens, chosen then rejected, side by side in every
batch (rows 2i and 2i + 1: `models/preference.py` reads them as [pairs, 2]); the `weights` are 1 on
the targets that are response tokens only. A pair longer than a row keeps its start (the prompt,
which both rows share, and the responses' beginnings) and is counted in a warning; a pair whose
rows keep no response token is dropped, also counted. Training pairs are drawn with replacement by
a generator seeded with (seed, step), so the batch of a step is a pure function of it, as for
prompt-completion data (llm_jax/data/lm_data.py); evaluation takes the validation pairs in order.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from llm_jax.data import chat as chat_lib
from llm_jax.data import lm_data
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.protocol import rows_of
from llm_jax.runtime.errors import BadValue

FIELDS = '{"prompt", "chosen", "rejected"} (strings, or a conversation) or {"chosen": [...], "rejected": [...]}'


@dataclasses.dataclass(frozen=True)
class Pair:
    """One line: the chosen and rejected examples in lm_data's forms ((prompt, response) strings or
    a Conversation), and for conversations the assistant turns they share (not learned)."""

    chosen: tuple[str, str] | lm_data.Conversation
    rejected: tuple[str, str] | lm_data.Conversation
    shared_turns: int
    where: str  # "FILE:LINE"


def _replies(value, where: str) -> list:
    """A response given with a conversation prompt: a string, one message or a list of them."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return chat_lib.check_messages([value] if isinstance(value, dict) else value, where)


def _shared_assistant_turns(chosen: list, rejected: list) -> int:
    """The assistant turns among the leading messages both conversations share."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += a["role"] == "assistant"
    return shared


def parse_pair(obj: dict, where: str) -> Pair:
    """A line's object -> Pair; a BadValue naming `where` and the field for anything else."""
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise BadValue(f"{where}: missing field {field!r} (the object has {sorted(obj)}); a line needs {FIELDS}")
    prompt, chosen, rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    if isinstance(prompt, str):
        for field in ("chosen", "rejected"):
            if not isinstance(obj[field], str):
                raise BadValue(
                    f"{where}: field {field!r} must be a string when 'prompt' is one, got {type(obj[field]).__name__}"
                )
        return Pair((prompt, chosen), (prompt, rejected), 0, where)
    if prompt is None:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise BadValue(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations (lists)")
        chosen = chat_lib.check_messages(chosen, f"{where}: chosen")
        rejected = chat_lib.check_messages(rejected, f"{where}: rejected")
    else:
        head = chat_lib.check_messages(prompt, f"{where}: prompt")
        chosen = head + _replies(chosen, f"{where}: chosen")
        rejected = head + _replies(rejected, f"{where}: rejected")
    if chosen == rejected:
        raise BadValue(f"{where}: 'chosen' and 'rejected' are the same conversation; a pair needs two responses")
    shared = _shared_assistant_turns(chosen, rejected)
    return Pair(lm_data.Conversation(chosen, where), lm_data.Conversation(rejected, where), shared, where)


def read_pairs(path: str, key: str = "config.data.path") -> list[Pair]:
    """The pairs of every non-empty line of a preference JSONL file."""
    pairs = [parse_pair(obj, where) for where, obj in lm_data.jsonl_objects(path, key, FIELDS)]
    if not pairs:
        raise BadValue(f"{key}={path!r} holds no preference pairs; each line needs {FIELDS}")
    return pairs


def encode_pair(tokenizer, chat, pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen ids, chosen learn, rejected ids, rejected learn), each [n] int32 / bool."""
    out = []
    for example in (pair.chosen, pair.rejected):
        if isinstance(example, lm_data.Conversation):
            try:
                ids, learn = chat_lib.encode_conversation(tokenizer, chat, example.messages, pair.shared_turns)
            except chat_lib.ChatError as e:
                raise chat_lib.ChatError(f"{pair.where}: {e}") from None
        else:
            ids, learn = lm_data.encode_example(tokenizer, None, example)
        out += [ids, learn]
    if not out[1].any() or not out[3].any():
        raise BadValue(f"{pair.where}: a response has no token to learn (no assistant turn after the shared prompt)")
    return tuple(out)


def pair_rows(encoded: list, width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Encoded pairs -> (tokens [2p, width] int32, mask [2p, width] bool: the response tokens,
    chosen at row 2i and rejected at 2i + 1, pairs truncated, pairs dropped). A row longer than
    `width` keeps its first `width` tokens; a pair either of whose rows then has no learned target
    (a token after the first) is dropped."""
    tokens, masks, truncated, dropped = [], [], 0, 0
    for ids_c, learn_c, ids_r, learn_r in encoded:
        if len(ids_c) > width or len(ids_r) > width:
            truncated += 1
        rows = [(ids[:width], learn[:width]) for ids, learn in ((ids_c, learn_c), (ids_r, learn_r))]
        if not all(learn[1:].any() for _, learn in rows):
            dropped += 1
            continue
        for ids, learn in rows:
            tokens.append(np.pad(np.asarray(ids, np.int32), (0, width - len(ids)), constant_values=pad_id))
            masks.append(np.pad(np.asarray(learn, bool), (0, width - len(learn))))
    if not tokens:
        return np.zeros((0, width), np.int32), np.zeros((0, width), bool), truncated, dropped
    return np.stack(tokens), np.stack(masks), truncated, dropped


def _shifted(tokens: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of tokens/mask [n, seq_len + 1] -> inputs, targets, weights [len(rows), seq_len]."""
    return {"inputs": tokens[rows, :-1], "targets": tokens[rows, 1:], "weights": mask[rows, 1:].astype(np.float32)}


def _pair_rows_index(pairs: np.ndarray) -> np.ndarray:
    """Pair indices [p] -> their rows [2p]: 2i (chosen), 2i + 1 (rejected), pair by pair."""
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


@dataclasses.dataclass
class PreferenceData:
    """Preference pairs, a `DataSource` (llm_jax/data/protocol.py): a global batch of `global_batch`
    rows holds global_batch / 2 pairs, each pair's two rows side by side (see the module docstring)."""

    tokenizer: tok_lib.Tokenizer
    train_pairs: list  # encode_pair's 4-tuples
    val_pairs: list
    _rows: dict = dataclasses.field(default_factory=dict, repr=False)
    log: object = dataclasses.field(default=print, repr=False)

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """pair_rows of 'train' or 'val' for rows of seq_len + 1 tokens (made once per seq_len)."""
        if (split, seq_len) not in self._rows:
            pairs = self.train_pairs if split == "train" else self.val_pairs
            self._rows[split, seq_len] = pair_rows(pairs, seq_len + 1)
        return self._rows[split, seq_len]

    def check(self, seq_len: int) -> None:
        for name, split in (("training", "train"), ("validation", "val")):
            tokens, _, truncated, dropped = self.rows(split, seq_len)
            n = len(self.train_pairs if split == "train" else self.val_pairs)
            if not len(tokens):
                raise BadValue(
                    f"every {name} pair's prompt fills seq_len+1={seq_len + 1} tokens, leaving no response token; "
                    "raise config.data.seq_len (and config.model.max_len)"
                )
            if truncated or dropped:
                self.log(
                    f"data: warning: {truncated} of {n} {name} pairs are longer than seq_len+1={seq_len + 1} tokens "
                    f"and keep only their start (the prompt and the responses' beginnings); {dropped} pairs dropped "
                    "as a row kept no response token; raise config.data.seq_len to keep them whole"
                )

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step` (global_batch / 2 pairs drawn by (seed, step))."""
        tokens, mask, _, _ = self.rows("train", seq_len)
        pairs = np.random.default_rng([seed, step]).integers(0, len(tokens) // 2, size=global_batch // 2)
        return _shifted(tokens, mask, rows_of(_pair_rows_index(pairs), process_index, process_count))

    def eval_batches(
        self, num_batches: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0,
        process_count: int = 1,
    ) -> list[dict[str, np.ndarray]]:  # fmt: skip
        """The validation pairs in order (wrapping around if there are fewer than asked), the same every time."""
        tokens, mask, _, _ = self.rows("val", seq_len)
        n, half = len(tokens) // 2, global_batch // 2
        out = []
        for b in range(num_batches):
            pairs = (b * half + np.arange(half)) % n
            out.append(_shifted(tokens, mask, rows_of(_pair_rows_index(pairs), process_index, process_count)))
        return out


def load_preference_data(cfg, tokenizer_dir: str | None = None, log=print) -> PreferenceData:
    """source='preference': reads `cfg.path` (and `cfg.val_path`, or the last `val_fraction` of the
    pairs), builds or loads the tokenizer (a DPO run reads its base's), tokenizes every pair."""
    t0 = time.time()
    train = read_pairs(cfg.path)
    if cfg.val_path:
        val = read_pairs(cfg.val_path, "config.data.val_path")
    else:
        n_val = max(1, int(len(train) * cfg.val_fraction))
        if n_val >= len(train):
            raise BadValue(
                f"config.data.path={cfg.path!r} has {len(train)} pairs: too few to hold out "
                f"val_fraction={cfg.val_fraction} for validation; add pairs or give config.data.val_path"
            )
        train, val = train[:-n_val], train[-n_val:]
    examples = [e for p in train for e in (p.chosen, p.rejected)]
    texts = [
        "".join(m["content"] for m in e.messages) if isinstance(e, lm_data.Conversation) else e[0] + e[1]
        for e in examples
    ]
    tokenizer = tok_lib.load_or_build(tokenizer_dir, lambda: lm_data.build_tokenizer(cfg, texts))
    chat = None
    if any(isinstance(p.chosen, lm_data.Conversation) for p in train + val):
        where = f"the tokenizer of this run ({tokenizer_dir or cfg.tokenizer_path or cfg.tokenizer})"
        fix = f"save it as {os.path.join(tokenizer_dir or 'WORKDIR/tokenizer', 'chat_template.jinja')}"
        chat = chat_lib.chat_for(tokenizer, where=where, fix=fix)
    elif tokenizer.eos_id is None:
        raise BadValue(
            f"config.data.source='preference' ends each response with EOS, but the {tokenizer.kind!r} tokenizer has "
            "none; use config.data.tokenizer='byte' or 'sentencepiece'"
        )
    data = PreferenceData(
        tokenizer, [encode_pair(tokenizer, chat, p) for p in train], [encode_pair(tokenizer, chat, p) for p in val],
        log=log,
    )  # fmt: skip
    log(
        f"data: preference -> {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size}), {len(train):,} train / "
        f"{len(val):,} val pairs in {time.time() - t0:.1f}s"
    )
    return data

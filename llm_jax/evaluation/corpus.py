"""Text in and out of an evaluation: how a run's tokenizer encodes what a task or corpus gives it,
and the texts of a perplexity corpus (a file or a glob of files, one document each, gzip by suffix;
or `val`, the run's own validation documents, read from its data source as training split them).

`Codec` holds the encoding rules lm-eval's `hf` backend applies, so the harness and the perplexity
command encode text alike: an HF tokenizer applies its own special-token template (a Llama
tokenizer prepends BOS, GPT-2's adds nothing) unless the text already starts with the prefix
token's text; the prefix token (an empty context's, a rolling document's first input) is the
checkpoint's BOS, else EOS (a run trained here separates documents with EOS), else 0.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, NotFound


def special_token(tokenizer: tok_lib.Tokenizer, workdir: str | None, name: str) -> int | None:
    """The id of an imported checkpoint's `name` token (e.g. 'bos_token'), from the tokenizer's own
    tokenizer_config.json / special_tokens_map.json (workdir/tokenizer/), or for a run imported before
    the tokenizer kept them, from workdir/hf/; None if neither names it."""
    if not isinstance(tokenizer, tok_lib.HFTokenizer):
        return None
    found = tokenizer.special_id(name)
    if found is not None:
        return found
    for file in ("tokenizer_config.json", "special_tokens_map.json") if workdir else ():
        path = os.path.join(workdir, "hf", file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and tokenizer.tok.token_to_id(value) is not None:
                return int(tokenizer.tok.token_to_id(value))
    return None


@dataclasses.dataclass(frozen=True)
class Codec:
    """A run's tokenizer with lm-eval's encoding rules (see the module docstring)."""

    tokenizer: tok_lib.Tokenizer
    prefix: int  # first input of an empty context / a rolling document
    add_bos_token: bool | None = None  # None: the tokenizer's own template (HF tokenizers only)

    @classmethod
    def of_run(cls, tokenizer: tok_lib.Tokenizer, workdir: str | None, add_bos_token: bool | None = None) -> Codec:
        bos = special_token(tokenizer, workdir, "bos_token")
        eos = tokenizer.eos_id
        return cls(tokenizer, bos if bos is not None else (eos if eos is not None else 0), add_bos_token)

    @property
    def hf(self) -> bool:
        return isinstance(self.tokenizer, tok_lib.HFTokenizer)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`, as lm-eval's `hf` backend's `tok_encode` gives them."""
        if not self.hf:
            return self.tokenizer.encode(text)
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if special is None:
            prefix_text = self.tokenizer.tok.decode([self.prefix], skip_special_tokens=False)
            special = not (prefix_text and text.startswith(prefix_text))
        return self.tokenizer.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.hf:
            return self.tokenizer.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids)


def paths(pattern: str) -> list[str]:
    """The files `pattern` names (a path or a glob), sorted; NotFound naming it when there are none."""
    found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not found:
        raise NotFound(f"--perplexity {pattern!r} matches no file; give a text file or a glob such as 'data/*.txt'")
    return found


def read_texts(pattern: str) -> list[str]:
    """The UTF-8 text of every file of `pattern` (undecodable bytes replaced), in path order."""
    texts = []
    for path in paths(pattern):
        with files.open_bytes(path) as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    return texts


def validation_texts(data_config) -> list[str]:
    """The validation documents of a run's data source (`config.data`), as training held them out
    (llm_jax/data/sources.py: by file hash, or the end of a single file); NotFound if there are none."""
    if data_config.source not in ("stdlib", "text", "tfds"):  # examples or pairs, not documents
        raise BadValue(
            f"--perplexity val: the run's data source {data_config.source!r} holds examples, not documents; "
            "score a text file instead (--perplexity FILE)"
        )
    texts: list[str] = []
    for piece in sources.plan(data_config, 1 << 62):  # one piece per document: no document is cut
        if piece.split not in ("val", ""):  # '': JSON lines, split document by document
            continue
        for doc in sources.read_piece(piece):
            if doc.split != "val":
                continue
            if doc.starts_doc or not texts:
                texts.append("")
            texts[-1] += doc.text
    if not texts:
        raise NotFound(f"the run's data source ({data_config.source}) holds no validation documents")
    return texts

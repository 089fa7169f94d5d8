"""Token perplexity and bits per byte of a text corpus, over a sliding window.

A document of n tokens is read after one prefix token (the run's BOS, else its EOS, the document
separator of training): x = [prefix] + doc, and doc[j] is predicted from x[: j + 1]. The first
window predicts doc[: max_length]; each next one predicts the next `stride` tokens, from the last
`max_length` positions before them (so every prediction after the first window sees at least
max_length - stride tokens of context). With stride = max_length these are exactly the windows of
lm-eval's `loglikelihood_rolling` (`get_rolling_token_windows` with context_len=1, whose last
window also looks back a whole max_length).

Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes of the text: unlike token
perplexity it compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from llm_jax.evaluation import scoring
from llm_jax.runtime.errors import BadValue


def rolling_rows(tokens: Sequence[int], prefix: int, max_length: int, stride: int | None = None) -> list[scoring.Row]:
    """The windows (scoring rows) that predict every token of `tokens` once, see the module docstring."""
    stride = max_length if stride is None else int(stride)
    if not 0 < stride <= max_length:
        raise BadValue(f"stride={stride} must be in [1, max_length={max_length}]")
    x = [int(prefix)] + [int(t) for t in tokens]
    n = len(tokens)
    rows, done = [], 0
    while done < n:
        end = min(n, max_length if done == 0 else done + stride)  # predicts doc[done:end]
        start = max(0, end - max_length)  # inputs x[start:end]
        rows.append(scoring.Row(tuple(x[start:end]), tuple(x[done + 1 : end + 1])))
        done = end
    return rows


def rolling_loglikelihoods(
    scorer: scoring.Scorer, documents: Sequence[Sequence[int]], prefix: int, stride: int | None = None
) -> list[float]:
    """log p(document) of each token list, every window of every document scored in one batched pass."""
    rows, owner = [], []
    for i, doc in enumerate(documents):
        windows = rolling_rows(doc, prefix, scorer.max_length, stride)
        rows += windows
        owner += [i] * len(windows)
    totals = [0.0] * len(documents)
    for i, (logp, _) in zip(owner, scoring.score_rows(scorer, rows)):
        totals[i] += logp
    return totals


def perplexity(
    scorer: scoring.Scorer,
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    prefix: int,
    stride: int | None = None,
) -> dict:
    """Token perplexity and bits per byte of `texts` (each its own document), with their counts."""
    documents = [encode(t) for t in texts]
    tokens = sum(len(d) for d in documents)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not tokens:
        raise BadValue("the corpus has no tokens to score")
    nll = -math.fsum(rolling_loglikelihoods(scorer, documents, prefix, stride))
    return {
        "documents": len(texts),
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "token_perplexity": math.exp(min(nll / tokens, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "max_length": scorer.max_length,
        "stride": scorer.max_length if stride is None else int(stride),
    }

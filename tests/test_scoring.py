"""Scoring (llm_jax/evaluation/scoring.py, perplexity.py) and the family's `score`, without lm-eval or
torch: against the model's own full logits, one request at a time, unpadded."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llm_jax.evaluation import perplexity, scoring
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding

# Gemma-like: a final soft-cap, local layers with a window, untied head (the options that change scores).
CFG = ModelConfig(
    vocab_size=64, vocab_multiple=1, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=16, mlp_dim=24,
    max_len=24, positions="rope", norm="rmsnorm", layer_pattern="llg", sliding_window=6, final_softcap=2.0,
    tie_embeddings=False, use_bias=False,
)  # fmt: skip


def _model():
    model = TransformerLM(CFG)
    params = nn.meta.unbox(family_lib.init_params(model, jax.random.key(1), 8))
    return model, jax.tree.map(lambda x: x * 4.0, params)  # sharper predictions than at init


def _reference(model, params, row: scoring.Row):
    """(log p(targets), greedy) of one row from the model's full logits (padded on the right to
    max_len, never a bucket length, so that one program serves every row)."""
    tokens = np.zeros((1, CFG.max_len), np.int32)
    tokens[0, : len(row.tokens)] = row.tokens
    logits = jax.jit(model.apply)({"params": params}, tokens)[0, : len(row.tokens)]  # [t, v], soft-capped
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    n = len(row.targets)
    at = np.arange(len(row.tokens) - n, len(row.tokens))
    total = logp[at, list(row.targets)].sum()
    return total, bool((np.asarray(logits)[at].argmax(-1) == np.asarray(row.targets)).all())


def _logits(model, params, tokens):
    """The last position's (soft-capped) logits [v] of one unpadded row."""
    return jax.jit(model.apply)({"params": params}, jnp.asarray([tokens]))[0, -1]


def test_score_includes_the_final_softcap():
    model, params = _model()
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 10)), jnp.int32)
    index = jnp.asarray([[0, 4, 9], [3, 3, 8]], jnp.int32)
    targets = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    logp, greedy = jax.jit(family_lib.of(model).score, static_argnums=0)(model, params, tokens, index, targets)
    full = np.asarray(jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens), axis=-1))  # capped
    at = np.take_along_axis(full, np.asarray(index)[..., None], 1)  # [b, c, v]
    want = np.take_along_axis(at, np.asarray(targets)[..., None], 2)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
    uncapped = TransformerLM(dataclasses.replace(CFG, final_softcap=None))
    other, _ = jax.jit(family_lib.of(uncapped).score, static_argnums=0)(uncapped, params, tokens, index, targets)
    assert np.abs(np.asarray(other) - want).max() > 1e-2  # the cap matters for these params


def test_batched_bucketed_scores_equal_one_request_at_a_time():
    """Sorting, right padding to buckets, the batch rounded to the mesh, left truncation and rows sharing
    one forward (alternatives of the last token) change nothing."""
    model, params = _model()
    rng = np.random.RandomState(1)
    requests = [(list(rng.randint(0, 64, n)), list(rng.randint(0, 64, c))) for n, c in
                [(1, 1), (3, 2), (20, 1), (30, 3), (7, 30), (12, 5), (24, 1), (2, 9)]]  # fmt: skip
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1}), jax.devices()[:2])
    scorer = scoring.Scorer(model, params, mesh, (), CFG.max_len, 3)  # 4 rows a batch on 2 devices
    shared = list(rng.randint(0, 64, 9))  # choices of one token, and choices differing in their last token only
    requests += [(shared, [c]) for c in range(20)] + [(shared, [5, c]) for c in (7, 8, 9)]
    requests += [(shared, list(np.argmax(np.asarray(_logits(model, params, shared)))[None]))]  # the greedy one
    got = scoring.loglikelihoods(scorer, requests)
    # 8 alone, 21 one-token choices in 2 jobs (at most 16 each), the 3 two-token ones in 1.
    assert len(scoring._jobs([scoring.to_row(c, x, CFG.max_len) for c, x in requests])) == 8 + 2 + 1
    assert got[-1][1] and not all(g for _, g in got[8:28])  # greedy flags of shared rows read per alternative
    for (ll, greedy), (context, continuation) in zip(got, requests):
        want, want_greedy = _reference(model, params, scoring.to_row(context, continuation, CFG.max_len))
        assert abs(ll - want) < 1e-4 and greedy == want_greedy


def test_rolling_windows_cover_every_token_once():
    """Stride < max_length: every token predicted once, each after at least max_length - stride of context."""
    tokens = list(range(10, 40))
    for stride in (3, 8):
        rows = perplexity.rolling_rows(tokens, 1, 8, stride)
        assert [t for r in rows for t in r.targets] == tokens
        assert rows[0].tokens == (1, *tokens[:7])
        assert all(len(r.tokens) == 8 for r in rows[1:])
        assert all(len(r.targets) <= stride for r in rows[1:])
    with pytest.raises(ValueError, match="stride=9"):
        perplexity.rolling_rows(tokens, 1, 8, 9)


def test_perplexity_with_a_stride_is_the_sum_of_its_windows():
    """A shorter stride gives every prediction more context: the windows' sum, from the reference."""
    model, params = _model()
    doc = list(np.random.RandomState(2).randint(0, 64, 60))
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    scorer = scoring.Scorer(model, params, mesh, (), CFG.max_len, 4)
    for stride in (None, 5):
        (got,) = perplexity.rolling_loglikelihoods(scorer, [doc], 1, stride)
        want = sum(_reference(model, params, r)[0] for r in perplexity.rolling_rows(doc, 1, CFG.max_len, stride))
        assert abs(got - want) < 1e-3


def test_scoring_truncates_like_lm_eval_and_buckets():
    row = scoring.to_row(list(range(100)), [100, 101], 8)
    assert row.tokens == tuple(range(93, 101)) and row.targets == (100, 101)
    assert scoring.to_row([1], list(range(2, 20)), 8).targets == tuple(range(12, 20))  # its last 8
    assert [scoring.bucket(n, 64, 16) for n in (1, 16, 17, 40, 49, 65)] == [16, 16, 24, 48, 64, 64]


def test_a_family_without_score_is_refused_by_name():
    cfg = dataclasses.replace(CFG, family="encdec", num_encoder_layers=1, layer_pattern="g", final_softcap=None)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    with pytest.raises(ValueError, match="model family 'encdec' does not"):
        scoring.Scorer(family_lib.build(cfg), None, mesh, (), 16)

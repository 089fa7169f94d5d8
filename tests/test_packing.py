"""Document-aware packing (config.data.packing='documents'): documents packed into one row, with
segment ids and positions restarting per document, give each document exactly what it gets alone,
in every attention path (einsum with and without query blocks, grouped-query, dot_product, scan +
remat); the packed batch's loss is the sum of the documents' own losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.data import lm_data as data_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM, attend

BASE = ModelConfig(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    embed_dim=32,
    mlp_dim=64,
    max_len=256,
    positions="learned",
    norm="layernorm",
    mlp_activation="gelu",
)
CASES = {
    "einsum_mha_learned": BASE,
    "einsum_gqa_rope": dataclasses.replace(BASE, num_kv_heads=2, positions="rope", norm="rmsnorm"),
    "dot_product_scan_remat": dataclasses.replace(
        BASE, num_kv_heads=2, positions="rope", attention="dot_product", scan_layers=True, remat="dots"
    ),
}
# 256 positions: the einsum path splits the queries into 2 blocks (ops._causal_blocks), and the
# documents straddle the block boundary at 128. One document of a single token.
DOC_LENGTHS = [100, 1, 60, 95]


def _packed_row(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    segs = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return docs, np.concatenate(docs)[None], segs[None], pos[None]


@pytest.mark.parametrize("name", list(CASES))
def test_packed_documents_equal_each_document_alone(name):
    cfg = CASES[name]
    model = TransformerLM(cfg)
    docs, tokens, segs, pos = _packed_row(DOC_LENGTHS, cfg.vocab_size)
    params = model.init(jax.random.key(0), jnp.asarray(tokens))["params"]
    packed = np.asarray(model.apply({"params": params}, tokens, pos, segment_ids=segs))
    start = 0
    for doc in docs:
        alone = np.asarray(model.apply({"params": params}, doc[None]))
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], rtol=1e-5, atol=1e-5)
        start += len(doc)
    # Without the segment ids the later documents do see the earlier ones: the test is not vacuous.
    unmasked = np.asarray(model.apply({"params": params}, tokens, pos))
    assert np.abs(unmasked[0, 101:] - packed[0, 101:]).max() > 1e-3


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
def test_attend_with_segments_matches_explicit_mask(impl):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    segs = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3], [1, 2, 2, 2, 2, 2, 2, 2]], jnp.int32)
    causal = np.tril(np.ones((8, 8), bool))
    mask = jnp.asarray(causal[None] & (np.asarray(segs)[:, :, None] == np.asarray(segs)[:, None, :]))
    want = attend(q, k, v, mask, "einsum")
    np.testing.assert_allclose(attend(q, k, v, None, impl, segs), want, rtol=1e-5, atol=1e-6)


def test_packed_batch_loss_is_the_sum_of_each_documents_loss():
    """data.windows over a stream with document starts -> the lm family's loss: the packed loss sum
    and token count equal those of each document trained alone (inputs doc[:-1], targets doc[1:])."""
    cfg = CASES["einsum_gqa_rope"]
    model = TransformerLM(cfg)
    lengths = [40, 2, 30, 57]  # 129 = seq_len + 1 tokens in one window
    docs, tokens, _, _ = _packed_row(lengths, cfg.vocab_size, seed=1)
    starts = np.cumsum([0] + lengths[:-1])
    stream = data_lib.ArrayTokens(tokens[0], starts)
    batch = data_lib.windows(stream, np.asarray([0]), 128, packing="documents")
    np.testing.assert_array_equal(batch["segment_ids"][0], np.repeat([1, 2, 3, 4], lengths)[:-1])
    np.testing.assert_array_equal(batch["positions"][0], np.concatenate([np.arange(n) for n in lengths])[:-1])
    assert batch["weights"].sum() == 128 - 3  # one target per boundary belongs to the next document
    params = model.init(jax.random.key(0), jnp.asarray(tokens[:, :128]))["params"]
    family = family_lib.of(model)
    total, count = family.loss_sum(model, params, batch, None, True)
    alone = [family.loss_sum(model, params, {"inputs": d[None, :-1], "targets": d[None, 1:]}, None, True) for d in docs]
    np.testing.assert_allclose(total, sum(float(t) for t, _ in alone), rtol=1e-5)
    assert float(count) == sum(float(c) for _, c in alone)


def test_window_starting_inside_a_document():
    """A window that starts mid-document: its first segment is that document's tail, at positions from 0."""
    tokens = np.arange(50, dtype=np.int32)
    stream = data_lib.ArrayTokens(tokens, np.asarray([0, 10, 13, 30]))
    b = data_lib.windows(stream, np.asarray([5, 12]), 10, packing="documents")
    np.testing.assert_array_equal(b["inputs"][0], np.arange(5, 15))
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(b["weights"][0], [1, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(b["segment_ids"][1], [1, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(b["positions"][1], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    # packing='none' gives the same windows without them.
    plain = data_lib.windows(stream, np.asarray([5, 12]), 10)
    assert set(plain) == {"inputs", "targets"}
    np.testing.assert_array_equal(plain["inputs"], b["inputs"])


def test_lm_data_packing_documents_is_a_pure_function_of_the_step():
    tokens = np.arange(3000, dtype=np.int32) % 250
    data = data_lib.LMData(
        tok_lib.ByteTokenizer(),
        data_lib.ArrayTokens(tokens, np.arange(0, 3000, 37)),
        data_lib.ArrayTokens(tokens[:500], np.arange(0, 500, 41)),
        packing="documents",
    )
    a, b = data.train_batch(7, 8, 64, seed=3), data.train_batch(7, 8, 64, seed=3)
    assert set(a) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    parts = [data.train_batch(7, 8, 64, seed=3, process_index=i, process_count=2) for i in range(2)]
    for key in a:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])

"""Attention weights recorded by the model (llm_jax/models/model.py `_attend`) and read by llm_jax.attention:
the softmax that attention applies, on every path (einsum, dot_product, grouped-query, masks, scan,
remat, the encoder-decoder's three kinds), the same on any mesh, and absent from training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import runlib as R

from llm_jax.data import tokenizer as tok_lib
from llm_jax.models import attention as attention_lib
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.tools import attention_maps as attention
from llm_jax.training import loop
from llm_jax.training.saved_run import load_run


class Probe(nn.Module):
    """Calls the model's attention core on given q, k, v so its recorded weights can be checked."""

    impl: str

    def __call__(self, q, k, v, mask):
        return attention_lib.attend_recording(self, q, k, v, mask, ModelConfig(attention=self.impl))


@pytest.mark.parametrize(
    "impl, kv_heads, masked",
    [("einsum", 4, False), ("einsum", 2, True), ("dot_product", 2, False), ("dot_product", 4, True)],
)
def test_recorded_weights_are_the_softmax_attention_applies(impl, kv_heads, masked):
    b, t, h, d = 2, 6, 4, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, n, d)) for i, n in ((0, h), (1, kv_heads), (2, kv_heads)))
    mask = None
    if masked:  # a padding-style mask: the last two keys of row 1 hidden from every query
        mask = jnp.ones((b, t, t), bool).at[1, :, 4:].set(False)
    out, state = jax.jit(lambda *a: Probe(impl).apply({}, *a, mutable=["intermediates"]))(q, k, v, mask)
    (probs,) = state["intermediates"]["attention_weights"]
    assert probs.shape == (b, h, t, t) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    hidden = np.ones((b, t, t), bool) if mask is None else np.asarray(mask)
    if mask is None:
        hidden = np.tril(hidden)  # causal: nothing above the diagonal
    assert float(jnp.abs(jnp.where(hidden[:, None], 0.0, probs)).max()) == 0.0
    # The output of attention is exactly these weights applied to the values (kv heads shared by groups).
    v_per_head = jnp.repeat(v, h // kv_heads, axis=2)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", probs, v_per_head), rtol=1e-4, atol=1e-5)
    # Unasked, nothing is recorded and the output is the same.
    np.testing.assert_allclose(jax.jit(Probe(impl).apply)({}, q, k, v, mask), out, rtol=1e-6, atol=1e-6)


def _lm(**kw):
    cfg = ModelConfig(vocab_size=64, vocab_multiple=1, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, max_len=16,
                      **kw)  # fmt: skip
    model = family_lib.build(cfg)
    return model, nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8))


def test_recording_leaves_logits_unchanged_and_scan_stacks_layers():
    tokens = jnp.asarray([[3, 5, 7, 9, 11, 13]], jnp.int32)
    shapes = {}
    for scan, remat in ((False, "none"), (True, "full")):
        model, params = _lm(scan_layers=scan, remat=remat)
        plain = jax.jit(model.apply)({"params": params}, tokens)
        record = jax.jit(lambda p, t, m=model: m.apply({"params": p}, t, mutable=["intermediates"]))
        logits, state = record(params, tokens)
        np.testing.assert_allclose(plain, logits, rtol=1e-6, atol=1e-6)
        shapes[scan] = jax.tree.map(lambda x: x.shape, state["intermediates"])
    assert shapes[False] == {f"layers_{i}": {"attn": {"attention_weights": ((1, 2, 6, 6),)}} for i in range(2)}
    assert shapes[True] == {"layers": {"attn": {"attention_weights": ((2, 1, 2, 6, 6),)}}}


def test_the_training_step_records_nothing():
    """The trainer's loss never makes 'intermediates' mutable: the jitted step's outputs hold no weights."""
    model, params = _lm()
    batch = family_lib.of(model).random_batch(model.cfg, 2, 8, 0)
    out = jax.eval_shape(lambda p: family_lib.of(model).loss_sum(model, p, batch, None, False), params)
    assert len(jax.tree.leaves(out)) == 2  # (loss sum, count): nothing else comes out


@pytest.fixture(scope="module")
def fsdp_tensor_run(tmp_path_factory):
    """A 3-step tiny LM run trained on a data x fsdp x tensor = 2 x 2 x 2 mesh."""
    work = str(tmp_path_factory.mktemp("attn") / "run")
    corpus = R.write_corpus(str(tmp_path_factory.mktemp("attn_data") / "c.txt"), 30_000)
    overrides = R.tiny_overrides(corpus, 3, 3, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    loop.train_and_evaluate(R.tiny_config(overrides), work)
    return work


def test_attention_maps_are_the_same_on_any_mesh(fsdp_tensor_run):
    run = load_run(fsdp_tensor_run)  # the run's own mesh: params sharded over fsdp and tensor
    assert run.mesh.shape["tensor"] == 2 and run.mesh.shape["fsdp"] == 2
    text = "def f(x):\n    return x"
    maps = attention.attention_maps(run, text=text)
    one = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    again = attention.attention_maps(load_run(fsdp_tensor_run, mesh=one), text=text)
    (s,), (s1,) = maps.sections, again.sections
    assert s.title == "self-attention" and s.weights.shape == (2, 2, len(text), len(text))
    np.testing.assert_allclose(s.weights, s1.weights, rtol=1e-5, atol=1e-6)
    assert s.queries == s.keys and s.queries[:4] == ["d", "e", "f", "␣"] and "\\n" in s.queries
    cut = attention.attention_maps(run, text=text, max_tokens=5)
    assert cut.sections[0].weights.shape[-1] == 5 and f"first 5 of {len(text)} tokens" in cut.caption
    with pytest.raises(BadValue, match="give --text"):
        attention.attention_maps(run, source="a man")
    sub = attention.select(maps, layers=[1], heads=[0])
    assert sub.sections[0].weights.shape == (1, 1, len(text), len(text))
    assert (sub.sections[0].layer_ids, sub.sections[0].head_ids) == ([1], [0])  # the model's numbering
    np.testing.assert_array_equal(sub.sections[0].weights[0, 0], s.weights[1, 0])
    with pytest.raises(BadValue, match="head 5 does not exist.*0..1"):
        attention.select(maps, heads=[5])


def test_encoder_decoder_records_encoder_decoder_and_cross_attention():
    cfg = ModelConfig(family="encdec", vocab_size=64, vocab_multiple=1, num_layers=2, num_encoder_layers=1,
                      num_heads=2, embed_dim=16, mlp_dim=32, max_len=16)  # fmt: skip
    model = family_lib.build(cfg)
    params = nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8))
    source = jnp.asarray([[5, 6, 7, 0]], jnp.int32)  # the last slot is padding
    positions = jnp.asarray([[0, 1, 2, -1]], jnp.int32)
    tokens = jnp.asarray([[2, 9, 10]], jnp.int32)
    record = jax.jit(lambda p, *a: model.apply({"params": p}, *a, mutable=["intermediates"])[1])
    state = record(params, source, tokens, positions)
    labels = {"encoder": list("abcd"), "decoder": list("xyz")}
    sections = attention._sections(state["intermediates"], labels, labels)
    assert [s.title.split(" (")[0] for s in sections] == [
        "encoder self-attention", "decoder self-attention", "cross-attention alignment"
    ]  # fmt: skip
    enc, dec, cross = (s.weights for s in sections)
    assert enc.shape == (1, 2, 4, 4) and dec.shape == (2, 2, 3, 3) and cross.shape == (2, 2, 3, 4)
    assert cross[..., 3].max() == 0.0 and enc[:, :, :3, 3].max() == 0.0  # padding is never attended
    assert cross.shape[-1] == len(sections[2].keys) and sections[2].keys == labels["encoder"]


def test_token_labels_are_visible_and_short():
    byte = tok_lib.ByteTokenizer()
    assert [attention.token_label(byte, i) for i in (100, 32, 10, 9, 0xE2, 256)] == [
        "d", "␣", "\\n", "\\t", "<e2>", "<eos>"
    ]  # fmt: skip
    sp = tok_lib.SentencePieceTokenizer.train(["the cat sat on the mat " * 50], 300, prose=True)
    labels = [attention.token_label(sp, i) for i in sp.encode("the cat")]
    assert "".join(labels).replace("▁", " ").strip() == "the cat"
    assert attention.token_label(tok_lib.CharTokenizer("ab" + "x" * 3), 0) == "a"

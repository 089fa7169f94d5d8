"""The encoder-decoder family (llm_jax/models/encdec.py): masks (padding, causality, packing), cached
decoding, beam search, BLEU, loss and gradients on meshes, exact resume, the parallel data rules."""

import functools
import gzip
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runlib as R
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.data import parallel as seq2seq
from llm_jax.inference import beam_search as beam_lib
from llm_jax.inference import decode, translate
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue, NotFound
from llm_jax.training import loop
from llm_jax.training.config import base_config

BOS, EOS = 2, 3
_COMMON = dict(family="encdec", vocab_size=64, vocab_multiple=1, embed_dim=32, mlp_dim=64, num_heads=4,
               max_len=16, init_std=0.3)  # fmt: skip
CONFIGS = {
    # learned positions, separate source table, untied head, 2 encoder + 1 decoder blocks, unrolled
    "learned": ModelConfig(
        num_layers=1, num_encoder_layers=2, positions="learned", share_embeddings=False, tie_embeddings=False, **_COMMON
    ),  # fmt: skip
    # sinusoidal, shared and tied, scanned and rematerialized, grouped-query, dot_product attention
    "sinusoidal_scan": ModelConfig(
        num_layers=2,
        num_kv_heads=2,
        positions="sinusoidal",
        scan_layers=True,
        remat="dots",
        attention="dot_product",
        **_COMMON,
    ),  # fmt: skip
    "rope": ModelConfig(
        num_layers=2, positions="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False, **_COMMON
    ),  # fmt: skip
}


@functools.cache
def model_and_params(name):
    model = family_lib.build(CONFIGS[name])
    params = jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(1), 8)))()
    return model, params


@pytest.fixture(params=sorted(CONFIGS))
def mp(request):
    return model_and_params(request.param)


SRC = np.asarray([[5, 6, 7, 8, 9, 0, 0, 0], [10, 11, 12, 13, 14, 15, 16, 17]], np.int32)
TGT = np.asarray([[BOS, 20, 21, 22, 23, 24], [BOS, 30, 31, 32, 33, 34]], np.int32)


def logits_of(model, params, src, tgt):
    positions = np.where(src != 0, np.arange(src.shape[1]), -1)
    return np.asarray(jax.jit(model.apply)({"params": params}, src, tgt, positions))


def test_source_padding_is_never_attended(mp):
    """What sits in padded source slots, and how many there are, changes nothing."""
    model, params = mp
    base = logits_of(model, params, SRC, TGT)
    noisy = SRC.copy()
    noisy[0, 5:] = [40, 41, 42]  # garbage in the padding (still position -1)
    positions = np.where(SRC != 0, np.arange(8), -1)
    again = np.asarray(jax.jit(model.apply)({"params": params}, noisy, TGT, positions))
    np.testing.assert_array_equal(again, base)
    alone = logits_of(model, params, SRC[:1, :5], TGT[:1])  # the same sentence without padding
    np.testing.assert_allclose(alone, base[:1], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(mp):
    model, params = mp
    base = logits_of(model, params, SRC, TGT)
    changed = TGT.copy()
    changed[:, 4:] = 50
    after = logits_of(model, params, SRC, changed)
    np.testing.assert_array_equal(after[:, :4], base[:, :4])
    assert not np.allclose(after[:, 4:], base[:, 4:])


def test_packed_pairs_equal_each_pair_alone(mp):
    """Two pairs in one row (segments 1 and 2, positions restarting) give the logits each gives alone."""
    model, params = mp
    pairs = [(np.asarray([5, 6, 7], np.int32), np.asarray([20, 21], np.int32)),
             (np.asarray([8, 9, 10, 11], np.int32), np.asarray([22, 23, 24], np.int32))]  # fmt: skip
    batch, left = seq2seq.pack([s for s, _ in pairs], [t for _, t in pairs], 1, 12, BOS, EOS)
    assert left == [] and batch["segments"].max() == 2
    keys = ("source", "inputs", "source_positions", "positions")
    packed = np.asarray(model.apply({"params": params}, *(batch[k] for k in keys),
                                    source_segments=batch["source_segments"], segments=batch["segments"]))  # fmt: skip
    for s, t in pairs:
        alone = logits_of(model, params, s[None], np.concatenate([[BOS], t])[None])[0]
        seg = batch["source_segments"][0][list(batch["source"][0]).index(s[0])]  # the pair's segment id
        where = batch["segments"][0] == seg
        np.testing.assert_array_equal(batch["targets"][0, where], np.concatenate([t, [EOS]]))
        np.testing.assert_allclose(packed[0, where], alone, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_decoding(mp):
    """The cache (cross-attention keys/values computed once at set-up) gives, token by token, the
    logits of the teacher-forced full pass at every position."""
    model, params = mp
    full = logits_of(model, params, SRC, TGT)
    family = family_lib.of(model)
    cache = family.init_cache(model, params, 2, TGT.shape[1], jnp.zeros(2, jnp.int32), source=SRC)
    assert "cross_key" in str(jax.tree_util.tree_structure(cache.layers))
    step = jax.jit(family.tokens_to_logits(model, params))
    got = []
    for i in range(TGT.shape[1]):
        logits, cache = step(TGT[:, i : i + 1], cache)
        got.append(np.asarray(logits))
    # One position at a time sums in another order than the full pass (XLA picks per shape and host):
    # 2.3e-5 apart on one 2-core host, where another stayed under 1e-5.
    np.testing.assert_allclose(np.stack(got, 1), full, rtol=1e-5, atol=1e-4)


def test_beam_size_1_is_greedy(mp):
    model, params = mp
    n = 10
    greedy = decode.generate(model, params, np.full((2, 1), BOS), np.zeros(2, np.int32), jax.random.key(0),
                             max_new_tokens=n, stop_ids=(EOS,), source=SRC)  # fmt: skip
    beams = beam_lib.beam_search(model, params, 2, beam_size=1, max_new_tokens=n, bos_id=BOS, eos_id=EOS,
                                 length_penalty=0.0, source=SRC)  # fmt: skip
    np.testing.assert_array_equal(beams.lengths, greedy.lengths)
    np.testing.assert_array_equal(beams.tokens, greedy.tokens)


# ----------------------------------------------------------------------------------------------
# Beam search on a hand-made scorer: a Markov chain over 5 tokens, no neural network


A, B = 4, 5
# Next-token probabilities given the last token (ids: 0 pad, 1 unused, 2 BOS, 3 EOS, 4 A, 5 B).
TABLE = np.log(np.asarray([
    [1 / 6] * 6,
    [1 / 6] * 6,
    [0.0, 0.0, 0.0, 0.0, 0.55, 0.45],  # BOS: greedy takes A ...
    [1 / 6] * 6,
    [0.0, 0.0, 0.0, 0.3, 0.35, 0.35],  # ... but after A nothing is likely,
    [0.0, 0.0, 0.0, 0.9, 0.05, 0.05],  # while B ends almost surely: B EOS (0.405) beats anything after A
]) + 1e-12)  # fmt: skip


class _Chain(nn.Module):
    cfg: ModelConfig


class ChainFamily(family_lib.ModelFamily):
    name = "test_markov_chain"

    def make_model(self, cfg):
        return _Chain(cfg)

    def init_cache(self, model, params, batch, length, start, mesh=None, **inputs):
        spec = flax.core.freeze({"last": P("cache_batch")})
        return family_lib.Cache({"last": jnp.zeros((batch,), jnp.int32)}, jnp.asarray(start, jnp.int32), spec)

    def tokens_to_logits(self, model, params):
        def step(tokens, cache):
            last = tokens[:, -1]
            return jnp.asarray(TABLE)[last], cache.replace(layers={"last": last}, next_pos=cache.next_pos + 1)

        return step


family_lib.register(ChainFamily())


def best_by_enumeration(max_new, alpha):
    """The best (score, sequence) over every A/B sequence that ends in EOS within max_new tokens, or
    runs max_new tokens without one."""
    best, best_seq = -np.inf, None
    for n in range(1, max_new + 1):
        for body in np.ndindex(*(2,) * n):
            seq = [A + b for b in body]  # A / B
            for ends in (True, False):
                if ends:
                    seq_ = seq[:-1] + [EOS]
                elif n < max_new:
                    continue
                else:
                    seq_ = seq
                logp = sum(TABLE[a, b] for a, b in zip([BOS] + seq_[:-1], seq_))
                score = logp / beam_lib.length_penalty(len(seq_), alpha)
                if score > best:
                    best, best_seq = float(score), seq_
    return best, best_seq


@pytest.mark.parametrize("beam, alpha", [(2, 0.0), (3, 0.6), (4, 1.0)])
def test_beam_search_finds_the_best_sequence_of_a_known_scorer(beam, alpha):
    model = family_lib.build(ModelConfig(family="test_markov_chain", vocab_size=6))
    got = beam_lib.beam_search(model, {}, 1, beam_size=beam, max_new_tokens=5, bos_id=BOS, eos_id=EOS,
                               length_penalty=alpha)  # fmt: skip
    score, seq = best_by_enumeration(5, alpha)
    assert np.asarray(got.tokens)[0, : int(got.lengths[0])].tolist() == seq
    np.testing.assert_allclose(float(got.scores[0]), score, rtol=1e-5)
    greedy = beam_lib.beam_search(model, {}, 1, beam_size=1, max_new_tokens=5, bos_id=BOS, eos_id=EOS,
                                  length_penalty=0.0)  # fmt: skip
    assert np.asarray(greedy.tokens)[0, 0] == A  # greedy starts with A, the beam finds B EOS
    assert seq == [B, EOS]


def test_bleu_of_references_against_themselves_is_100():
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
    assert translate.bleu(refs, refs) == pytest.approx(100.0)
    assert translate.bleu(["Ein Hund.", "Zwei Katzen.", "Eine Frau."], refs) < 30.0
    with pytest.raises(BadValue, match="align by line"):
        translate.bleu(refs[:2], refs)


# ----------------------------------------------------------------------------------------------
# Loss and gradients on meshes equal one device


MESH_CFG = ModelConfig(family="encdec", vocab_size=128, vocab_multiple=1, num_layers=2, num_encoder_layers=1,
                       num_heads=8, num_kv_heads=4, embed_dim=32, mlp_dim=64, max_len=16, positions="learned",
                       share_embeddings=True, tie_embeddings=True, init_std=0.2)  # fmt: skip


def mesh_batch(seed=0):
    """16 packed rows of random pairs (several per row), 16 + 16 slots."""
    r = np.random.default_rng(seed)
    src = [r.integers(4, 128, r.integers(2, 8)).astype(np.int32) for _ in range(48)]
    tgt = [r.integers(4, 128, r.integers(1, 6)).astype(np.int32) for _ in range(48)]
    batch, _ = seq2seq.pack(src, tgt, 16, 16, BOS, EOS)
    return batch


def mean_loss(params, batch, model):
    total, count = family_lib.of(model).loss_sum(model, params, batch, None, train=False)
    return total / count


@functools.cache
def reference():
    model = family_lib.build(MESH_CFG)
    params = jax.device_get(jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)))())
    loss, grads = jax.device_get(jax.jit(jax.value_and_grad(functools.partial(mean_loss, model=model)))(
        params, mesh_batch()))  # fmt: skip
    return params, loss, grads


# The 2x2x2 mesh shards over all three axes at once; the one-axis meshes only in the full suite.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), pytest.param((8, 1, 1), marks=SLOW), pytest.param((1, 8, 1), marks=SLOW), (2, 2, 2)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_loss_and_grads_on_meshes_equal_one_device(shape):
    params0, ref_loss, ref_grads = reference()
    model = family_lib.build(MESH_CFG)
    mesh = sharding.make_mesh(SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                              jax.devices()[: math.prod(shape)])  # fmt: skip
    param_sh = sharding.boxed_shardings(family_lib.abstract_params(model), mesh, sharding.LOGICAL_RULES)
    params = jax.device_put(params0, param_sh)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(mean_loss, model=model)),
                      in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(NamedSharding(mesh, P()), param_sh))  # fmt: skip
    with sharding.use_mesh(mesh, sharding.LOGICAL_RULES):
        loss, grads = grad_fn(params, sharding.host_to_global(mesh_batch(), mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        scale = np.abs(ref).max()
        if jax.tree_util.keystr(path).endswith("['key']['bias']"):
            # A key bias shifts all logits of a query by one amount, which softmax ignores: its
            # gradient is zero in exact arithmetic (~1e-12 here) on every mesh.
            assert scale < 1e-6 and np.abs(np.asarray(g)).max() < 1e-6, jax.tree_util.keystr(path)
            continue
        # Far above float32 noise (~1e-12 for the key bias): a gradient this size is a real signal.
        # (The decoder's key kernel gets ~8.5e-5 at this init, under the 1e-4 once required.)
        assert scale > 1e-6, f"{jax.tree_util.keystr(path)}: a ~zero gradient proves nothing"
        np.testing.assert_allclose(np.asarray(g), ref, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    if shape[2] > 1 or shape[1] > 1:  # really sharded, not silently replicated
        kernel = grads["decoder"]["layers_0"]["cross_attn"]["query"]["kernel"]
        assert {s.data.shape for s in kernel.addressable_shards} != {kernel.shape}


# ----------------------------------------------------------------------------------------------
# Data rules, a tiny real run: exact resume, the translate CLI


def write_pairs(d, split, src_lines, tgt_lines, gz=True):
    for lang, lines in (("en", src_lines), ("de", tgt_lines)):
        data = "".join(line + "\n" for line in lines).encode()
        path = os.path.join(d, f"{split}.{lang}" + (".gz" if gz else ""))
        with gzip.open(path, "wb") if gz else open(path, "wb") as f:
            f.write(data)


def test_misaligned_files_are_refused_and_rules_are_counted(tmp_path):
    write_pairs(str(tmp_path), "train", ["a b", "c d", "e f"], ["x y", "z w"])
    with pytest.raises(BadValue, match=r"train.en.gz has 3 lines but .*train.de.gz has 2"):
        seq2seq.read_pairs(str(tmp_path), "train", "en", "de")
    with pytest.raises(NotFound, match=r"no .*val.en or .*val.en.gz"):
        seq2seq.read_pairs(str(tmp_path), "val", "en", "de")
    tok = SimpleNamespace(encode_batch=lambda lines: [[5] * len(s.split()) for s in lines])
    enc = seq2seq.encode_split(["a b", "", "c " * 20, "d"], ["x", "y", "z", ""], tok, 8)
    assert (len(enc.source), enc.empty, enc.too_long) == (1, 2, 1)  # 'a b' -> 'x' alone is kept
    assert enc.raw_source == ["a b"] and enc.raw_target == ["x"]


def _mt_config(data_dir, steps):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mt", os.path.join(R.REPO, "configs", "multi30k_ende.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.path = data_dir
    c.optim.decay_steps = 6  # the same schedule whether the run stops at 3 or 6
    c.train.update(num_steps=steps, checkpoint_every=3, decode_eval_every=0, log_every=1)
    return c


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mt_data"))
    r = np.random.default_rng(0)
    words = ["a", "man", "dog", "red", "runs", "the", "on", "grass", "woman", "blue"]
    src = [" ".join(r.choice(words, r.integers(3, 8))) for _ in range(400)]
    tgt = [" ".join(w.upper() for w in s.split()[::-1]) for s in src]
    write_pairs(d, "train", src, tgt)
    write_pairs(d, "val", src[:40], tgt[:40], gz=False)
    return d


@pytest.mark.slow
def test_resume_of_a_translation_run_is_exact(tmp_path, mt_data):
    straight = str(tmp_path / "straight")
    loop.train_and_evaluate(_mt_config(mt_data, 6), straight)
    halves = str(tmp_path / "halves")
    loop.train_and_evaluate(_mt_config(mt_data, 3), halves)
    loop.train_and_evaluate(_mt_config(mt_data, 6), halves)  # resumes from step 3
    assert R.losses_list(halves) == R.losses_list(straight)
    R.assert_bitwise_equal(R.read_state(halves, 6), R.read_state(straight, 6))


def test_translate_cli_keeps_lines_and_prints_bleu(tmp_path, mt_data):
    work = str(tmp_path / "run")
    loop.train_and_evaluate(_mt_config(mt_data, 3), work)
    (tmp_path / "in.en").write_text("a man runs\n\nthe red dog\n")
    (tmp_path / "ref.de").write_text("RUNS MAN A\n\nDOG RED THE\n")
    out = tmp_path / "out.de"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_jax.translate", f"--workdir={work}", f"--input={tmp_path / 'in.en'}",
         f"--output={out}", f"--reference={tmp_path / 'ref.de'}", "--beam_size=2"],
        cwd=R.REPO, env=R.env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # 3 lines, the empty one kept, in order
    assert "BLEU = " in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "llm_jax.translate", f"--workdir={work}", f"--input={tmp_path / 'missing.en'}"],
        cwd=R.REPO, env=R.env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("translate: error: ")


@pytest.mark.slow
def test_the_config_reads_multi30k_and_its_tiny_run_trains(tmp_path):
    data = os.path.join(os.environ.get("LLM_JAX_DATA", os.path.join(R.REPO, "..", "shared", "data")), "multi30k")
    assert os.path.isdir(data), f"Multi30k not found at {data}: set LLM_JAX_DATA to the folder holding multi30k/"
    c = _mt_config(data, 4)
    c.train.update(decode_eval_every=4, eval_every=4)
    summary = loop.train_and_evaluate(c, str(tmp_path / "mt"))
    assert summary["step"] == 4 and math.isfinite(summary["eval/loss"]) and "eval/bleu" in summary
    assert base_config().data.src_lang == "en"


@pytest.mark.parametrize("name", ["learned", pytest.param("sinusoidal_scan", marks=pytest.mark.slow)])
def test_label_smoothing_in_the_chunked_loss_equals_the_full_logits_loss(name):
    """Training loss with label smoothing 0.1: the fused chunked loss gives the loss and gradients
    of the plain one; evaluation (train=False) is the unsmoothed cross-entropy."""
    import dataclasses

    _, params = model_and_params(name)
    batch = mesh_batch()
    batch = {k: v[:, :8] if v.shape[1] > 8 else v for k, v in batch.items()}  # fits max_len 16

    def loss_and_grads(cfg, train):
        model = family_lib.build(cfg)
        fn = lambda p: family_lib.of(model).loss_sum(model, p, batch, None, train)  # noqa: E731
        (total, count), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
        return float(total / count), grads

    cfg = dataclasses.replace(CONFIGS[name], label_smoothing=0.1, vocab_size=128)
    params = nn.meta.unbox(family_lib.init_params(family_lib.build(cfg), jax.random.key(3), 8))
    plain, g_plain = loss_and_grads(cfg, True)
    fused, g_fused = loss_and_grads(dataclasses.replace(cfg, loss_chunk=4), True)
    assert fused == pytest.approx(plain, rel=1e-6)
    # Per leaf, relative to its largest entry; leaves that are zero in exact arithmetic (the key
    # bias: softmax ignores a constant per row) are held to the whole tree's scale.
    top = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(g_plain))
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_plain)):
        scale = max(float(np.abs(np.asarray(b)).max()), 1e-2 * top)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
    evaluated, _ = loss_and_grads(cfg, False)
    unsmoothed, _ = loss_and_grads(dataclasses.replace(cfg, label_smoothing=0.0), True)
    assert evaluated == pytest.approx(unsmoothed, rel=1e-6) and abs(evaluated - plain) > 1e-3


def test_encoder_decoder_flops_by_hand():

    cfg = CONFIGS["learned"]  # 2 encoder + 1 decoder blocks, e 32, h 4 (d 8), mlp 64 (gelu), v 64
    attn, mlp = 4 * 32 * 32, 2 * 32 * 64
    matmul = 2 * (attn + mlp) + 1 * (2 * attn + mlp) + 32 * 64
    attention = 12 * 16 * 32 * 2 + 18 * 16 * 32 * 1
    assert family_lib.flops_per_token(cfg, 16) == 6 * matmul + attention

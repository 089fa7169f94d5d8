"""KV-cache decoding (llm_jax.inference.decode): exact agreement with the training forward pass, sampling, stop
tokens, batching of prompts of different lengths, and a 2x4 (data x tensor) mesh."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from llm_jax.inference import decode
from llm_jax.models import family as family_lib
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue

# Larger than the training init so that random models give varied, well-separated greedy tokens.
_COMMON = dict(vocab_size=64, num_layers=2, embed_dim=32, mlp_dim=64, max_len=32, init_std=0.3)
CONFIGS = {
    "learned": ModelConfig(num_heads=4, positions="learned", **_COMMON),
    # rope + grouped-query attention (4 query heads share 2 kv heads), Llama-style, layers scanned.
    "rope_gqa": ModelConfig(
        num_heads=4,
        num_kv_heads=2,
        positions="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        use_bias=False,
        scan_layers=True,
        **_COMMON,
    ),
}
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 6, 4], [11, 12, 13, 14, 15]]


@functools.cache
def model_and_params(name):
    model = TransformerLM(CONFIGS[name])
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]))()
    return model, params


@pytest.fixture(params=sorted(CONFIGS))
def mp(request):
    return model_and_params(request.param)


WIDTH = 16  # every uncached forward pass is [1, WIDTH] (right-padded): one compilation per model


@functools.cache
def _forward(model):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def full_forward(model, params, row):
    """Logits [len(row), v] of the training forward pass (no cache) over one unpadded row."""
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, : len(row)] = row  # right padding: causal attention never looks at it
    return np.asarray(_forward(model)(params, padded))[0, : len(row)]


def gen(model, params, prompts, n, seed=0, **kw):
    tokens, start = decode.left_pad(prompts)
    out = decode.generate(model, params, tokens, start, jax.random.key(seed), max_new_tokens=n, **kw)
    return np.asarray(out.tokens), np.asarray(out.lengths)


def test_cached_logits_equal_full_forward_at_every_position(mp):
    """Prefill 4 tokens (the model with decode=True), then one token per call (the family's decoding
    step `tokens_to_logits`, with its separate output projection): every position's logits match the uncached pass,
    for a full row and a left-padded one."""
    model, params = mp
    rng = np.random.default_rng(0)
    full_row = rng.integers(0, 64, WIDTH)
    short_row = rng.integers(0, 64, WIDTH - 5)
    tokens, start = decode.left_pad([full_row, short_row])
    family = family_lib.of(model)
    cache = family.init_cache(model, params, 2, WIDTH, start)

    @jax.jit
    def prefill(cache, tok):
        pos = cache.next_pos[:, None] + jnp.arange(tok.shape[1])
        logits, mut = model.apply({"params": params, "cache": cache.layers}, tok, pos, decode=True, mutable=["cache"])
        return logits, cache.replace(layers=mut["cache"], next_pos=cache.next_pos + tok.shape[1])

    step = jax.jit(family.tokens_to_logits(model, params))
    logits, cache = prefill(cache, tokens[:, :4])
    outs = [logits]
    for t in range(4, WIDTH):
        logits, cache = step(tokens[:, t : t + 1], cache)
        outs.append(logits[:, None])
    got = np.asarray(jnp.concatenate(outs, axis=1))  # [2, WIDTH, v]

    np.testing.assert_allclose(got[0], full_forward(model, params, full_row), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1, 5:], full_forward(model, params, short_row), atol=1e-5, rtol=1e-5)


def greedy_reference(model, params, prompt, n):
    """Greedy decoding without a cache: the whole sequence through the training forward pass each step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_forward(model, params, seq)[-1])))
    return seq[len(prompt) :]


def test_greedy_equals_no_cache_reference_and_batching(mp):
    """Batched greedy generation of prompts of different lengths equals the uncached reference,
    and each prompt generated alone."""
    model, params = mp
    batched, lengths = gen(model, params, PROMPTS, 8)
    assert (lengths == 8).all()
    for i, prompt in enumerate(PROMPTS):
        assert batched[i].tolist() == greedy_reference(model, params, prompt, 8), f"prompt {i}"
    # The reference already runs each prompt alone; generate() alone too, for the most padded
    # prompt (each shape is one more compilation).
    alone, _ = gen(model, params, [PROMPTS[0]], 8)
    assert alone[0].tolist() == batched[0].tolist()
    assert len({tuple(r) for r in batched}) == len(PROMPTS)  # the rows really differ


def test_sampling_top_k_1_and_tiny_top_p_equal_greedy_and_seed_determinism():
    """One compilation serves every sampling setting (they are traced)."""
    model, params = model_and_params("learned")
    greedy, _ = gen(model, params, PROMPTS, 8)
    assert (gen(model, params, PROMPTS, 8, seed=3, temperature=1.0, top_k=1)[0] == greedy).all()
    assert (gen(model, params, PROMPTS, 8, seed=3, temperature=1.0, top_p=1e-6)[0] == greedy).all()
    a = gen(model, params, PROMPTS, 8, seed=7, temperature=2.0, top_k=20, top_p=0.95)[0]
    b = gen(model, params, PROMPTS, 8, seed=7, temperature=2.0, top_k=20, top_p=0.95)[0]
    c = gen(model, params, PROMPTS, 8, seed=8, temperature=2.0, top_k=20, top_p=0.95)[0]
    assert (a == b).all() and not (a == c).all()


def test_sample_logits_top_k_top_p_sets():
    """probs (0.5, 0.3, 0.15, 0.05): top_p=0.7 keeps the first two, top_k=3 the first three."""
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
    sample = jax.jit(functools.partial(decode.sample_logits, logits, jax.random.key(0)))
    assert set(np.asarray(sample(1.0, 0, 0.7)).tolist()) == {1, 3}
    assert set(np.asarray(sample(1.0, 3, 1.0)).tolist()) == {1, 2, 3}
    assert set(np.asarray(sample(1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
    assert (np.asarray(sample(0.0, 0, 1.0)) == 1).all()  # a traced temperature of 0 is greedy too


def test_stop_ids_end_each_row_on_its_own():
    model, params = model_and_params("learned")
    free, _ = gen(model, params, PROMPTS, 8)
    stop = int(free[0, 2])  # row 0's third token
    toks, lengths = gen(model, params, PROMPTS, 8, stop_ids=(stop, 63), pad_id=0)
    for i in range(len(PROMPTS)):
        hits = [j for j, t in enumerate(free[i]) if t in (stop, 63)]
        n = hits[0] + 1 if hits else 8
        assert lengths[i] == n
        assert toks[i, :n].tolist() == free[i, :n].tolist() and (toks[i, n:] == 0).all()
    assert lengths[0] <= 3  # row 0 stopped at the latest at its third token (earlier if it came before)


class _Tok:
    """A tokenizer of ids as space-separated numbers, for `decode.complete`."""

    eos_id = 63

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_complete_cuts_at_stop_and_crops_long_prompts():
    model, params = model_and_params("learned")
    free, _ = gen(model, params, PROMPTS[:1], 8)
    prompt = " ".join(map(str, PROMPTS[0]))
    text = decode.complete(model, params, _Tok(), [prompt], 8, stop_ids=[int(free[0, 3])])[0]
    assert text == " ".join(map(str, free[0, :3]))
    # A prompt longer than the context keeps its last `context` tokens (nanoGPT's crop).
    long = list(np.random.default_rng(1).integers(0, 60, 40))
    got = decode.complete(model, params, _Tok(), [" ".join(map(str, long))], 4, stop_ids=[], context=16)[0]
    assert got == " ".join(map(str, crop_reference(model, params, long, 4, 16)))
    with pytest.raises(BadValue, match="context=64 must be in"):
        gen(model, params, [[1] * 30], 8, context=64)  # past the position table of 32


def crop_reference(model, params, prompt, n, context):
    """Greedy decoding without a cache that feeds the model only the last `context` tokens, at
    positions 0..context-1, at every step (nanoGPT's generate): the reference of the sliding window."""
    seq = list(prompt)
    for _ in range(n):
        window = seq[-context:]
        seq.append(int(np.argmax(full_forward(model, params, window)[-1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generation_past_the_context_slides_its_window(name):
    """4x the trained context: greedy tokens equal the cropping reference, for prompts of different
    lengths in one batch, and no position at or past the context ever reaches the model."""
    model, params = model_and_params(name)
    context, n = 8, 32
    seen = []

    def spy(step):
        def record(tokens, cache):  # every position fed to the model, seen on the host
            positions = cache.next_pos[:, None] + jnp.arange(tokens.shape[1])
            jax.debug.callback(lambda p: seen.append(int(np.asarray(p).max())), positions)
            return step(tokens, cache)

        return record

    family = family_lib.of(model)
    original = family.tokens_to_logits
    family.tokens_to_logits = lambda m, p: spy(original(m, p))
    try:
        got, lengths = gen(model, params, PROMPTS, n, context=context)
    finally:
        del family.tokens_to_logits
    assert seen and max(seen) < context, max(seen)
    assert (lengths == n).all()
    for i, prompt in enumerate(PROMPTS):
        assert got[i].tolist() == crop_reference(model, params, prompt, n, context), f"prompt {i}"


def test_generation_on_2x4_mesh_equals_single_device():
    """data=2 x tensor=4: sharded params, the cache sharded like the activations, same tokens."""
    model, params = model_and_params("learned")
    expected, _ = gen(model, params, PROMPTS, 8)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 1, 1, 1, 4), sharding.MESH_AXES)
    rules = sharding.LOGICAL_RULES
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = sharding.boxed_shardings(boxed, mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["layers_0"]["mlp"]["wi"]["kernel"].sharding.spec[1] == "tensor"
    assert decode.params_mesh(sharded) is mesh
    with mesh, nn.logical_axis_rules(rules):
        got, _ = gen(model, sharded, PROMPTS, 8, mesh=mesh)
        start = jnp.zeros((4,), jnp.int32)
        cache = jax.jit(lambda: family_lib.of(model).init_cache(model, sharded, 4, 10, start, mesh=mesh).layers)()
        # complete() finds the mesh on the params (same compiled loop as the line above).
        texts = decode.complete(model, sharded, _Tok(), [" ".join(map(str, p)) for p in PROMPTS], 8, stop_ids=[])
    np.testing.assert_array_equal(got, expected)
    assert texts == [" ".join(map(str, row)) for row in expected]
    # Under jax.set_mesh the model's own activation constraints take effect too (sharding.use_mesh).
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got, _ = gen(model, sharded, PROMPTS, 8, mesh=mesh)
    np.testing.assert_array_equal(got, expected)
    key_sharding = cache["layers_0"]["attn"]["cached_key"].sharding
    assert isinstance(key_sharding, NamedSharding)
    assert (
        key_sharding.spec[0] in ("data", ("data", "fsdp"), ("data", "fsdp", "expert"), ("data",))
        and key_sharding.spec[1] == "tensor"
    )

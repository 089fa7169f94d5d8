"""The model-family interface (llm_jax/models/family.py): a second family, defined only in this file, trains,
checkpoints, resumes and decodes through the shared trainer, loader and sampler with no edit to them."""

from types import SimpleNamespace

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runlib as R

from llm_jax.data import lm_data
from llm_jax.data import parallel as parallel_data
from llm_jax.inference import decode
from llm_jax.models import family as family_lib
from llm_jax.models import loss as loss_lib
from llm_jax.training import loop
from llm_jax.training.saved_run import load_run


class Bigram(nn.Module):
    """logits[t] = W[tokens[t]]: a bigram table, factored through the embedding width."""

    cfg: object

    @nn.compact
    def __call__(self, tokens, decode=False):
        cfg = self.cfg
        init = nn.initializers.normal(0.02)
        table = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed"))
        )
        out = self.param("out", nn.with_logical_partitioning(init, ("embed", "vocab")), (cfg.embed_dim, cfg.vocab_size))
        return jnp.einsum("bte,ev->btv", table(tokens), out).astype(jnp.float32)


class BigramFamily(family_lib.ModelFamily):
    name = "test_bigram"

    def make_model(self, cfg):
        return Bigram(cfg)

    def init_inputs(self, cfg, batch, length):
        return {"tokens": jnp.zeros((batch, length), jnp.int32)}

    def loss_sum(self, model, params, batch, rng, train):
        logits = model.apply({"params": params}, batch["inputs"])
        return loss_lib.token_loss(logits, batch["targets"], batch.get("weights"))

    def init_cache(self, model, params, batch, length, start, mesh=None, **inputs):
        # A bigram needs no memory of the past: the cache is only the next position.
        return family_lib.Cache(layers={}, next_pos=jnp.asarray(start, jnp.int32), specs=flax.core.freeze({}))

    def tokens_to_logits(self, model, params):
        def step(tokens, cache):
            logits = model.apply({"params": params}, tokens[:, -1:])[:, 0]
            return logits, cache.replace(next_pos=cache.next_pos + tokens.shape[1])

        return step


family_lib.register(BigramFamily())


def _config(corpus, steps):
    return R.tiny_config(
        R.tiny_overrides(
            corpus, steps, steps, **{"model.family": "test_bigram", "optim.lr": 0.05, "train.eval_every": steps}
        )
    )


@pytest.fixture(scope="module")
def bigram_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigram")
    corpus = R.write_corpus(str(root / "corpus.txt"))
    workdir = str(root / "run")
    first = loop.train_and_evaluate(_config(corpus, 30), workdir)
    return corpus, workdir, first


def test_a_new_family_trains_and_resumes_through_the_shared_loop(bigram_run):
    corpus, workdir, first = bigram_run
    losses = [loss for _, loss in R.losses_list(workdir)]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns byte bigrams
    more = loop.train_and_evaluate(_config(corpus, 40), workdir)  # resumes from step 30
    assert more["step"] == 40 and R.finished_steps(workdir)[-1] == 40
    assert more["eval/loss"] < first["eval/loss"]


def test_a_new_family_decodes_through_load_run_and_the_shared_sampler(bigram_run):
    _, workdir, _ = bigram_run
    run = load_run(workdir)
    assert isinstance(run.model, Bigram)
    table = np.asarray(run.params["Embed_0"]["embedding"]) @ np.asarray(run.params["out"])  # [v, v]
    prompt = [ord(c) for c in "def "]
    expected, last = [], prompt[-1]
    for _ in range(3 * run.context):  # well past the trained context: the window slides
        last = int(np.argmax(table[last]))
        expected.append(last)
    tokens, start = decode.left_pad([prompt])
    with run.use_mesh():
        out = decode.generate(
            run.model, run.params, tokens, start, jax.random.key(0), max_new_tokens=len(expected), context=run.context
        )
    assert np.asarray(out.tokens)[0].tolist() == expected


# ----------------------------------------------------------------------------------------------
# The batch spec: what a step is compiled for (aot), what benchmarks feed it, what the data yields


def _shapes(batch: dict) -> dict:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


@pytest.mark.parametrize("family", ["lm", "encdec"])
@pytest.mark.parametrize("options", [{}, {"weights": True}, {"weights": True, "packed": True}])
def test_random_batch_has_the_shapes_and_dtypes_of_batch_spec(family, options):
    fam, cfg = family_lib.get(family), SimpleNamespace(vocab_size=64)
    assert _shapes(fam.random_batch(cfg, 4, 8, 0, **options)) == _shapes(fam.batch_spec(cfg, 4, 8, **options))


def test_batch_spec_is_what_the_data_yields():
    """Real batches of each source against the family's spec for that source's `batch_options`."""
    lm, encdec, cfg = family_lib.get("lm"), family_lib.get("encdec"), SimpleNamespace(vocab_size=64)
    options = lambda source, packing="none": lm_data.batch_options(SimpleNamespace(source=source, packing=packing))
    tokens = lm_data.ArrayTokens(np.arange(200) % 50, doc_starts=np.array([0, 30, 70, 150]))
    for packing in lm_data.PACKING:
        batch = lm_data.windows(tokens, np.array([0, 40, 100]), 8, packing)
        assert _shapes(batch) == _shapes(lm.batch_spec(cfg, 3, 8, **options("text", packing))), packing
    example = (np.array([5, 6, 7], np.int32), np.array([8, 2], np.int32))
    prompts = lm_data.PromptCompletionData(None, [example] * 4, [example] * 2)
    batch = prompts.train_batch(0, 3, 8, seed=0)
    assert _shapes(batch) == _shapes(lm.batch_spec(cfg, 3, 8, **options("jsonl", "documents")))
    pairs, _ = parallel_data.pack([np.array([5, 6])], [np.array([7])], 3, 8, bos=1, eos=2)
    assert _shapes(pairs) == _shapes(encdec.batch_spec(cfg, 3, 8, **options("parallel")))

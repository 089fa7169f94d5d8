"""Long-context data: `config.data.long_documents` draws every window inside one document long
enough to hold it (llm_jax/data/lm_data.py)."""

import numpy as np
import pytest

from llm_jax.data import lm_data as data_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.runtime.errors import BadValue

SEQ = 16


def documents(lengths):
    """Token stream whose token i of document j is 1000 * j + i, and the documents' starts."""
    toks = np.concatenate([1000 * j + np.arange(n) for j, n in enumerate(lengths)])
    return data_lib.ArrayTokens(toks, np.cumsum([0, *lengths[:-1]]))


def test_long_documents_windows_lie_inside_one_long_document():
    # Documents 1 (40 tokens: 24 possible starts) and 3 (25 tokens: 9) can hold a window of 17.
    stream = documents([5, 40, 3, 25, 10])
    data = data_lib.LMData(tok_lib.ByteTokenizer(), stream, stream, long_documents=True)
    data.check(SEQ)
    rows = np.concatenate([data.train_batch(step, 8, SEQ, seed=0)["inputs"] for step in range(40)])
    batch = data.train_batch(3, 8, SEQ, seed=0)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    doc, pos = rows // 1000, rows % 1000
    assert (doc == doc[:, :1]).all() and (np.diff(pos, axis=1) == 1).all()  # one document, contiguous
    assert set(doc[:, 0]) == {1, 3}
    assert (pos[:, -1] + 1 < np.where(doc[:, 0] == 1, 40, 25)).all()  # the target after it is in the document too
    # Every start equally likely: document 1 holds 24 of the 33 starts.
    assert 0.55 < np.mean(doc[:, 0] == 1) < 0.9
    # Without the option, windows cross documents.
    plain = data_lib.LMData(tok_lib.ByteTokenizer(), stream, stream)
    mixed = np.concatenate([plain.train_batch(step, 8, SEQ, seed=0)["inputs"] for step in range(10)]) // 1000
    assert (mixed != mixed[:, :1]).any()


def test_long_documents_need_a_document_long_enough():
    stream = documents([5, 12, 3])
    data = data_lib.LMData(tok_lib.ByteTokenizer(), stream, stream, long_documents=True)
    with pytest.raises(BadValue, match="no training document has seq_len\\+1=17 tokens \\(the longest has 12\\)"):
        data.check(SEQ)


def test_fine_tuning_at_a_longer_context_extends_the_trained_context(tmp_path):
    """A RoPE run (linear scaling set) trained at 32 tokens resumes at 64 on windows inside one
    long document: the checkpoints record 64 as the trained context, which `load_run` (and so
    decoding) then uses."""
    import runlib as R

    from llm_jax.training import loop, saved_run

    corpus = R.write_corpus(str(tmp_path / "corpus.txt"), chars=20_000)  # one file: one long document
    model = {"model.positions": "rope", "model.rope_scaling": "linear", "model.rope_scaling_factor": 2.0}
    work = str(tmp_path / "run")
    loop.train_and_evaluate(R.tiny_config(R.tiny_overrides(corpus, 2, 2, **model)), work)
    assert saved_run.load_run(work).context == 32
    longer = R.tiny_overrides(corpus, 4, 2, **model, **{"data.seq_len": 64, "data.long_documents": True})
    loop.train_and_evaluate(R.tiny_config(longer), work)
    run = saved_run.load_run(work)
    assert run.step == 4 and run.context == 64 and R.read_loop_data(work, 4)["trained_context"] == 64

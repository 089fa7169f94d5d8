"""A tiny prompt-completion run shared by test_jsonl.py and test_generate.py (trained once per session)."""

import functools
import importlib.util
import json
import os
import random
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_upper_jsonl(path: str, n: int, seed: int = 0) -> None:
    """n examples of a learnable task: prompt 'up abc =', completion ' ABC'."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(r.choice("abcdefghij") for _ in range(r.randint(3, 8)))
            f.write(json.dumps({"prompt": f"up {w} =", "completion": " " + w.upper()}) + "\n")


def qa_config(**train):
    spec = importlib.util.spec_from_file_location("qa_finetune", os.path.join(REPO, "configs", "qa_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.optim.update(lr=3e-3, warmup_steps=5)
    c.train.update(num_steps=40, log_every=10, eval_every=40, checkpoint_every=40, sample_prompt="up abc =", **train)
    return c


@functools.cache
def qa_run() -> tuple[str, dict]:
    """(workdir, final metrics) of 40 steps of configs/qa_finetune.py:tiny on 400 examples."""
    from llm_jax.training import loop

    root = tempfile.mkdtemp(prefix="llm_jax_qa_")
    write_upper_jsonl(os.path.join(root, "qa.jsonl"), 400)
    config = qa_config()
    config.data.path = os.path.join(root, "qa.jsonl")
    workdir = os.path.join(root, "run")
    return workdir, loop.train_and_evaluate(config, workdir)

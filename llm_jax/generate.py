"""Text generation from a trained run:

    python -m llm_jax.generate --workdir runs/x --prompt "def fib(n):" [--prompt "..."]
        [--prompt_file F] [--max_new_tokens 200] [--temperature 0] [--top_k 0] [--top_p 1] [--seed 0]

Reads the run's `config.json` and tokenizer, rebuilds its model, restores only the params of the
latest checkpoint (sharded on the run's mesh when it fits this machine, else on all devices
data-parallel) and prints each prompt followed by its completion. Decoding is
`llm_jax.decode.complete`, the code the trainer samples with. Greedy (temperature 0) by default, so
the output is reproducible; with sampling, `--seed` makes it so.

`--prompt_file`: one prompt per non-empty line, or for a `.jsonl` file the `prompt` field of each
line (the fine-tuning format of `config.data.source='jsonl'`). `--format=jsonl` prints one JSON
object per prompt ({"prompt", "completion"}) instead of text.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import decode, sharding
from llm_jax import tokenizer as tok_lib
from llm_jax.model import TransformerLM

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program: importing this module (tests, notebooks)
    then does not collide with other tools' flags of the same names (--workdir)."""
    flags.DEFINE_string("workdir", None, "Run directory of llm_jax.main (config.json, tokenizer/, checkpoints/).")
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several (generated as one batch).")
    flags.DEFINE_string("prompt_file", None, "Prompts, one per non-empty line; or a .jsonl file with a 'prompt' field.")
    flags.DEFINE_integer("max_new_tokens", 200, "New tokens per prompt at most (fewer if the context is full).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; >0: sample from softmax(logits / temperature).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this much probability (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed, prompts and settings give the same text.")
    flags.DEFINE_list("stop_ids", None, "Token ids that end a completion (default: the tokenizer's EOS, if any).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_integer("batch_size", 32, "Prompts generated together.")
    flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Output: prompt + completion as text, or JSON lines.")
    flags.mark_flags_as_required(["workdir"])


class GenerateError(Exception):
    """A problem with the command's inputs; main prints the message alone."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config.json laid over today's defaults (so runs saved before a key existed load)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise GenerateError(f"{path} does not exist: --workdir must be a run directory written by llm_jax.main")
    with open(path) as f:
        saved = json.load(f)
    config = config_lib.base_config()
    config.update(saved)
    return config


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        if not os.path.isfile(prompt_file):
            raise GenerateError(f"--prompt_file={prompt_file} does not exist")
        with open(prompt_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if prompt_file.endswith(".jsonl"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise GenerateError(
                        f"{prompt_file}:{n}: expected a JSON object with a 'prompt' field ({e})"
                    ) from None
                out.append(str(prompt))
            else:
                out.append(line)
    if not out:
        raise GenerateError("no prompt: give --prompt TEXT (repeatable) or --prompt_file FILE")
    return out


def inference_mesh(config) -> jax.sharding.Mesh:
    """The run's mesh if it fits the devices here, else all devices data-parallel (params replicated)."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError:
        return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def load_model(workdir: str, step: int | None = None):
    """(model, params, tokenizer, mesh, rules, step) of a run, the params sharded on `mesh`."""
    config = load_run_config(workdir)
    tok_dir = os.path.join(workdir, "tokenizer")
    try:
        tokenizer = tok_lib.load(tok_dir)
    except FileNotFoundError as e:
        raise GenerateError(f"{e}: --workdir must be a run directory written by llm_jax.main") from None
    model = TransformerLM(config_lib.model_config(config, tokenizer.vocab_size))
    mesh = inference_mesh(config)
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    abstract = ckpt_lib.abstract_like(nn.meta.unbox(boxed), sharding.boxed_shardings(boxed, mesh, rules))
    try:
        step, params = ckpt_lib.restore_params(workdir, abstract, step)
    except (FileNotFoundError, ckpt_lib.IncompatibleCheckpoint) as e:
        raise GenerateError(str(e)) from None
    return model, params, tokenizer, mesh, rules, step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; put the prompt in --prompt TEXT")
    logging.set_verbosity(logging.ERROR)  # orbax reports every read at INFO/WARNING
    try:
        prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file)
        try:
            stop_ids = None if FLAGS.stop_ids is None else [int(s) for s in FLAGS.stop_ids]
        except ValueError:
            raise GenerateError(f"--stop_ids={','.join(FLAGS.stop_ids)}: give comma-separated token ids") from None
        model, params, tokenizer, _, rules, step = load_model(FLAGS.workdir, FLAGS.step)
    except GenerateError as e:
        sys.exit(f"generate: error: {e}")
    print(f"generate: {FLAGS.workdir} step {step}, {len(prompts)} prompt(s)", file=sys.stderr)
    completions = []
    try:
        # The params carry their shardings; decode shards the KV cache on their mesh by these rules.
        with nn.logical_axis_rules(rules):
            for i in range(0, len(prompts), FLAGS.batch_size):
                completions += decode.complete(
                    model,
                    params,
                    tokenizer,
                    prompts[i : i + FLAGS.batch_size],
                    FLAGS.max_new_tokens,
                    seed=FLAGS.seed + i,
                    temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k,
                    top_p=FLAGS.top_p,
                    stop_ids=stop_ids,
                )
    except ValueError as e:  # a prompt longer than the context, a character outside the vocabulary, ...
        sys.exit(f"generate: error: {e}")
    for n, (prompt, completion) in enumerate(zip(prompts, completions)):
        if FLAGS.format == "jsonl":
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            if n:
                print("-" * 40)
            print(prompt + completion)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Text generation from a trained run:

    python -m llm_jax.generate --workdir runs/x --prompt "def fib(n):" [--prompt "..."]
        [--prompt_file F] [--max_new_tokens 200] [--temperature 0] [--top_k 0] [--top_p 1] [--seed 0]
        [--quant int8|int4]

Loads the run (`llm_jax.training.saved_run.load_run`: its config, tokenizer, model and the params of the latest
checkpoint, sharded on the run's mesh when it fits this machine, else on all devices data-parallel)
and prints each prompt followed by its completion, of any length: past the context the model was
trained at, the window slides (`llm_jax.inference.decode`). `--quant int8|int4` decodes with weight-only
integers (`llm_jax.training.saved_run.quantized`; a LoRA run is merged first). Decoding is
`llm_jax.inference.decode.complete`, the code the trainer samples with. Greedy (temperature 0) by default, so
the output is reproducible; with sampling, `--seed` makes it so.

Only reads the workdir (it takes no lock, so it can sample from a run that is still training, and
a read-only workdir is fine). A mistake in the input (no such run, a prompt the tokenizer cannot
encode, ...) is one line, `generate: error: ...` (`--debug` shows the traceback; llm_jax/cli.py).

Chat with an imported instruction-tuned checkpoint (its tokenizer's chat template, read by
llm_jax/data/chat.py as transformers' `apply_chat_template` renders it):

    python -m llm_jax.generate --workdir runs/qwen --chat "What is the capital of France?" [--system "Be brief."]
        [--messages conversation.json] [--chat_template template.jinja]

renders the conversation (`--messages`: a JSON list of {"role", "content"} objects, then the
`--chat` message as the user's last turn) with the generation prompt, samples until one of the
checkpoint's end-of-sequence ids (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>) and prints the
assistant's reply alone, without special tokens.

`--prompt_file`: one prompt per non-empty line, or for a `.jsonl` file the `prompt` field of each
line (the fine-tuning format of `config.data.source='jsonl'`). `--format=jsonl` prints one JSON
object per prompt ({"prompt", "completion"}) instead of text.
"""

from __future__ import annotations

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json
import os
import sys

from absl import app, flags, logging

from llm_jax.data import chat as chat_lib
from llm_jax.inference import decode
from llm_jax.runtime.errors import UserError
from llm_jax.training.saved_run import check_quant, load_run, quantized

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program: importing this module (tests, notebooks)
    then does not collide with other tools' flags of the same names (--workdir)."""
    flags.DEFINE_string("workdir", None, "Run directory of llm_jax.main (config.json, tokenizer/, checkpoints/).")
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several (generated as one batch).")
    flags.DEFINE_string("prompt_file", None, "Prompts, one per non-empty line; or a .jsonl file with a 'prompt' field.")
    flags.DEFINE_string("chat", None, "A user message: the reply under the run's chat template is printed.")
    flags.DEFINE_string("system", None, "With --chat / --messages: a system message in front.")
    flags.DEFINE_string("messages", None, "A conversation to continue: a JSON list of {'role', 'content'} objects.")
    flags.DEFINE_string("chat_template", None, "A Jinja chat template file instead of the tokenizer's own.")
    flags.DEFINE_integer("max_new_tokens", 200, "New tokens per prompt at most (fewer if the context is full).")
    flags.DEFINE_float(
        "temperature", None, "0: greedy; >0: sample from softmax(logits / temperature). Default: the run's own "
        "config.train.sample_temperature (greedy decoding of a small model tends to repeat itself)."
    )  # fmt: skip
    flags.DEFINE_integer(
        "top_k", None, "Sample among the k most likely tokens (0: all). Default: the run's sample_top_k."
    )
    flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this much probability (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed, prompts and settings give the same text.")
    flags.DEFINE_list("stop_ids", None, "Token ids that end a completion (default: the tokenizer's EOS, if any).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_string("quant", "none", "Weight-only quantized kernels: none, int8 or int4 (per-channel scales).")
    flags.DEFINE_integer("batch_size", 32, "Prompts generated together.")
    flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Output: prompt + completion as text, or JSON lines.")
    flags.mark_flags_as_required(["workdir"])


class GenerateError(UserError):
    """A problem with the command's own inputs (prompts, flags)."""


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


def sampling(config, temperature: float | None, top_k: int | None) -> tuple[float, int]:
    """The flags' temperature and top-k, each defaulting to the run's own sample settings
    (`config.train.sample_temperature` / `sample_top_k`, as its training-time samples used)."""
    train = config.get("train", {})
    if temperature is None:
        temperature = float(train.get("sample_temperature", 0.0))
    if top_k is None:
        top_k = int(train.get("sample_top_k", 0))
    return temperature, top_k


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; put the prompt in --prompt TEXT")
    logging.set_verbosity(logging.ERROR)  # orbax reports every read at INFO/WARNING
    chatting = FLAGS.chat is not None or FLAGS.messages is not None
    if chatting and (FLAGS.prompt or FLAGS.prompt_file):
        raise GenerateError("give either --chat / --messages or --prompt / --prompt_file, not both")
    if FLAGS.system is not None and not chatting:
        raise GenerateError("--system needs --chat TEXT or --messages FILE")
    check_quant(FLAGS.quant)
    messages = chat_lib.conversation(FLAGS.chat, FLAGS.system, FLAGS.messages) if chatting else None
    prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file) if not chatting else []
    try:
        stop_ids = None if FLAGS.stop_ids is None else [int(s) for s in FLAGS.stop_ids]
    except ValueError:
        raise GenerateError(f"--stop_ids={','.join(FLAGS.stop_ids)}: give comma-separated token ids") from None
    run = quantized(load_run(FLAGS.workdir, FLAGS.step), FLAGS.quant)
    if chatting:
        where = f"the tokenizer of {FLAGS.workdir} ({os.path.join(FLAGS.workdir, 'tokenizer')})"
        chat = chat_lib.chat_for(run.tokenizer, FLAGS.chat_template, where)
        prompts = [chat_lib.encode_prompt(run.tokenizer, chat, messages)]
    temperature, top_k = sampling(run.config, FLAGS.temperature, FLAGS.top_k)
    print(
        f"generate: {FLAGS.workdir} step {run.step} (trained context {run.context} tokens), {len(prompts)} prompt(s), "
        + (f"temperature {temperature}, top_k {top_k or 'all'}" if temperature > 0 else "greedy")
        + (f", {FLAGS.quant} weights" if FLAGS.quant != "none" else ""),
        file=sys.stderr,
    )
    completions = []
    # The params carry their shardings; decode shards the cache on their mesh by the run's rules.
    with run.use_mesh():
        for i in range(0, len(prompts), FLAGS.batch_size):
            completions += decode.complete(
                run.model, run.params, run.tokenizer, prompts[i : i + FLAGS.batch_size], FLAGS.max_new_tokens,
                seed=FLAGS.seed + i, temperature=temperature, top_k=top_k, top_p=FLAGS.top_p,
                stop_ids=stop_ids, context=run.context,
            )  # fmt: skip
    if chatting:
        reply = completions[0]
        print(
            json.dumps({"messages": messages, "reply": reply}, ensure_ascii=False) if FLAGS.format == "jsonl" else reply
        )
        return
    for n, (prompt, completion) in enumerate(zip(prompts, completions)):
        if FLAGS.format == "jsonl":
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            if n:
                print("-" * 40)
            print(prompt + completion)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "generate")

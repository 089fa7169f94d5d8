"""`LlmJaxLM`: an llm_jax run as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4).

    lm = LlmJaxLM(load_run("runs/default"), batch_size=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=TaskManager())

or by name, `simple_evaluate(model="llm_jax", model_args="workdir=runs/default,batch_size=32")`.

It follows lm-eval's own `hf` backend request by request, so the two agree on a checkpoint both can
read: the text is encoded with the run's tokenizer (an HF tokenizer with its own special-token
rules, as `AutoTokenizer.encode` does: a Llama tokenizer prepends BOS, GPT-2's does not), an empty
context becomes the prefix token (the checkpoint's BOS, else EOS), a context and continuation are
split as lm-eval's `_encode_pair` splits them, long requests keep their last `max_length` tokens
(the run's trained context), and generation left-truncates the prompt to leave room for
`max_gen_toks` new tokens, then cuts the text at the first stop sequence.

Scoring goes through llm_jax/evaluation/scoring.py (batched by length, sharded over the run's mesh),
generation through llm_jax/inference/decode.py (the KV-cache decoder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from llm_jax.evaluation import corpus, perplexity, scoring
from llm_jax.inference import decode
from llm_jax.runtime.errors import BadValue
from llm_jax.training import saved_run

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: one compile per bucket


@register_model("llm_jax")
class LlmJaxLM(TemplateLM):
    """A restored run (`saved_run.Run`, or the trainer's own state in one) as an lm-eval model."""

    def __init__(
        self,
        run: saved_run.Run,
        batch_size: int = 16,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
    ):
        super().__init__()
        self.run = run
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length or run.context)
        if not 0 < self._max_length <= run.model.cfg.max_len:
            raise BadValue(f"max_length={max_length} must be in [1, the model's max_len={run.model.cfg.max_len}]")
        codec = corpus.Codec.of_run(run.tokenizer, run.workdir, add_bos_token)
        self.codec = (
            codec if prefix_token_id is None else corpus.Codec(run.tokenizer, int(prefix_token_id), add_bos_token)
        )
        self._prefix = self.codec.prefix
        self.scorer = scoring.Scorer(run.model, run.params, run.mesh, run.rules, self._max_length, int(batch_size))
        self._stop_cache: dict[tuple[str, ...], tuple[int, ...]] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlmJaxLM:
        """`model_args="workdir=DIR[,batch_size=B,max_gen_toks=N,...]"` (lm-eval's by-name route)."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        if "workdir" not in args:
            raise BadValue("model_args needs workdir=DIR (a run directory of llm_jax.main or convert from_hf)")
        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        flag = lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        kwargs = {
            k: flag(v) if k == "add_bos_token" else int(v) for k, v in {**args, **extra}.items() if k != "workdir"
        }
        return cls(saved_run.load_run(args["workdir"]), **kwargs)

    # --- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        eos = self.run.tokenizer.eos_id
        return self._prefix if eos is None else int(eos)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string, add_special_tokens)

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.codec.decode(ids, skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log p, greedy)."""
        return scoring.loglikelihoods(self.scorer, [(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request, over lm-eval's rolling windows (perplexity.rolling_rows)."""
        documents = [self.tok_encode(req.args[0]) for req in requests]
        return perplexity.rolling_loglikelihoods(self.scorer, documents, self._prefix)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations cut at the task's stop sequences."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for ids in groups.values():
            texts = self._generate_group([requests[i].args[0] for i in ids], dict(requests[ids[0]].args[1]))
            for i, text in zip(ids, texts):
                out[i] = text
        return out

    # --- generation

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Continuations of `contexts` that share one set of generation settings."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_new
        if room < 1:
            raise BadValue(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0.0
        temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
        encoded = [(self.tok_encode(c) or [self._prefix])[-room:] for c in contexts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        stops = (self.eot_token_id, *self._stop_ids(tuple(until)))
        b = self.scorer.rows_per_batch
        texts: list[str] = [""] * len(contexts)
        with self.run.use_mesh():
            for start in range(0, len(order), b):
                ids = order[start : start + b]
                rows = [encoded[i] for i in ids] + [encoded[ids[0]]] * (b - len(ids))  # a full batch: one shape
                new = self._generate_rows(rows, room, max_new, temperature, stops, seed=start)
                for i, toks in zip(ids, new):
                    texts[i] = self._cut(toks, until)
        return texts

    def _generate_rows(self, rows, room: int, max_new: int, temperature: float, stops, seed: int) -> list[list[int]]:
        """New tokens of each left-padded row (the prompt width rounded up to PROMPT_BUCKET, at most
        `room`, so that the window never slides: generation sees what HF's `generate` sees)."""
        tokens, start = decode.left_pad(rows)
        width = min(room, -(-tokens.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET)
        extra = width - tokens.shape[1]
        tokens = np.pad(tokens, ((0, 0), (extra, 0)))
        gen = decode.generate(
            self.run.model, self.run.params, tokens, start - extra, jax.random.key(seed), max_new_tokens=max_new,
            context=self.max_length, temperature=temperature, stop_ids=stops, mesh=self.run.mesh,
        )  # fmt: skip
        toks, lengths = jax.device_get((gen.tokens, gen.lengths))
        return [[int(t) for t in row[:n]] for row, n in zip(np.asarray(toks), np.asarray(lengths))]

    def _cut(self, toks: list[int], until: Sequence[str]) -> str:
        """The text of new tokens up to the first stop sequence (lm-eval's post-processing)."""
        text = self.tok_decode(toks)
        for term in until:
            if term:
                text = text.split(term)[0]
        return text

    def _stop_ids(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """Tokens whose own text holds a stop sequence: once one is emitted, nothing after it survives
        the cut, so the decoder may stop that row there (the result is the same, sooner). Special
        tokens decode to nothing here, as in the text that is cut, so none of them is one."""
        if until not in self._stop_cache:
            terms = [t for t in until if t]
            vocab = self.run.tokenizer.vocab_size
            found = []
            for i in range(vocab):
                text = self.tok_decode([i])
                if "\ufffd" not in text and any(t in text for t in terms):
                    found.append(i)
            self._stop_cache[until] = tuple(found)
        return self._stop_cache[until]

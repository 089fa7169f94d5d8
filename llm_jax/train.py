"""Training: the state, the loss, pure jitted steps, and the loop with its periodic work.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(params, batch) -> metrics` are
pure; `train_and_evaluate` jits them with explicit shardings (state donated), feeds them global
batches, and on schedule logs, evaluates, samples and saves.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax
import flax.linen as nn
import ml_collections

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import data as data_lib
from llm_jax import decode as decode_lib
from llm_jax import optim
from llm_jax import sharding
from llm_jax.model import ModelConfig, TransformerLM, count_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # scalar int32: number of updates applied
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------------------------
# Pure functions


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and token count. logits [b, t, v] f32; targets [b, t]; weights [b, t] or None."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if weights is None:
        return ce.sum(), jnp.float32(ce.size)
    return (ce * weights).sum(), weights.sum()


def loss_sum(params, model: TransformerLM, batch: dict, rng, deterministic: bool):
    rngs = {} if rng is None else {"dropout": rng}
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs)
    return token_loss(logits, batch["targets"], batch.get("weights"))


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, *, model: TransformerLM,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (inputs/targets [B, t]), split into `grad_accum_steps` micro-batches.

    The loss is the mean over all tokens of the batch whatever the accumulation, so accumulating
    changes memory, not the result. Dropout's key is derived from (base_rng, step): a resumed run
    draws the same masks.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    deterministic = model.cfg.dropout_rate == 0.0
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    if grad_accum_steps == 1:
        (total, count), grads = grad_fn(state.params, model, batch, rng, deterministic)
    else:
        def split(x):
            # Strided split: micro-batch i takes rows i, i+k, ... so each keeps the batch's sharding.
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

        micro = jax.tree.map(split, batch)

        def body(carry, xs):
            acc_grads, acc_total, acc_count = carry
            mb, i = xs
            (total, count), grads = grad_fn(state.params, model, mb, jax.random.fold_in(rng, i), deterministic)
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_total + total, acc_count + count), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, total, count), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(grad_accum_steps))
        )

    grads = jax.tree.map(lambda g: g / count, grads)
    loss = total / count
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def eval_step(params, batch: dict, *, model: TransformerLM) -> dict:
    """Summed loss and token count of one batch (sum so that means over batches are exact)."""
    total, count = loss_sum(params, model, batch, None, deterministic=True)
    return {"loss_sum": total, "count": count}


# ----------------------------------------------------------------------------------------------
# State creation (already sharded) and jitted steps


def init_state_fn(model: TransformerLM, tx, seq_len: int) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState with boxed (LogicallyPartitioned) params; the boxes give the shardings."""

    def init(rng):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(rng, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def create_sharded_state(model, tx, mesh, rules, rng, seq_len):
    """(state, state_shardings): the state is born sharded; the full model never sits on one device."""
    init = init_state_fn(model, tx, seq_len)
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.boxed_shardings(abstract, mesh, rules)
    with mesh, nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def make_steps(model, tx, mesh, rules, state_shardings, grad_accum_steps: int):
    """Jitted (train_step, eval_step) with explicit shardings; the train step donates the state."""
    batch_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, grad_accum_steps=grad_accum_steps),
        in_shardings=(state_shardings, batch_sh, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    p_eval = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, batch_sh),
        out_shardings=replicated,
    )

    def with_rules(fn):
        @functools.wraps(fn)
        def run(*args):
            with mesh, nn.logical_axis_rules(rules):
                return fn(*args)
        run.jitted = fn
        return run

    return with_rules(p_train), with_rules(p_eval)


# ----------------------------------------------------------------------------------------------
# The loop


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)):
                    self.tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _scalar(v):
    v = np.asarray(v).item() if hasattr(v, "shape") else v
    return float(v) if isinstance(v, (float, np.floating)) else v


def evaluate(p_eval, params, eval_batches, mesh) -> float:
    """Mean validation loss per token over the fixed evaluation batches."""
    total, count = 0.0, 0.0
    outs = [p_eval(params, sharding.host_to_global(b, mesh)) for b in eval_batches]
    for m in jax.device_get(outs):
        total += float(m["loss_sum"])
        count += float(m["count"])
    return total / count


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir and writes the resolved config (atomically) as config.json."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training as `config` says; returns the final metrics."""
    t_start = time.time()
    config = config_lib.finalize(config)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    tc = config.train

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    prepare_workdir(workdir, config)

    tok_dir = os.path.join(workdir, "tokenizer")
    data = data_lib.load_data(config.data, tokenizer_dir=tok_dir, log=log)
    if is_main and not os.path.exists(os.path.join(tok_dir, "llm_jax_tokenizer.json")):
        data.tokenizer.save(tok_dir)
    seq_len = config.data.seq_len
    data.check(seq_len)

    model_cfg = config_lib.model_config(config, data.tokenizer.vocab_size)
    sharding.check_divisible(mesh, model_cfg, tc.batch_size)
    sharding.check_divisible(mesh, model_cfg, tc.eval_batch_size)
    if tc.batch_size % tc.grad_accum_steps or (tc.batch_size // tc.grad_accum_steps) % sharding.data_parallel_size(mesh):
        raise ValueError(
            f"config.train.batch_size={tc.batch_size} must split into grad_accum_steps={tc.grad_accum_steps} "
            f"micro-batches that each divide over data*fsdp={sharding.data_parallel_size(mesh)} devices"
        )
    model = TransformerLM(model_cfg)
    tx = optim.make_optimizer(config.optim)

    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    state, state_sh = create_sharded_state(model, tx, mesh, rules, init_rng, seq_len)
    n_params = count_params(state.params)
    log(f"model: {n_params:,} parameters, {model_cfg.num_layers} layers, width {model_cfg.embed_dim}, "
        f"vocab {model_cfg.vocab_size}; mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    mngr = ckpt_lib.manager(workdir, tc.keep_checkpoints)
    start_step = 0
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = ckpt_lib.restore(mngr, latest, ckpt_lib.abstract_like(state, state_sh))
        start_step = int(data_state.get("step", latest))
        log(f"resumed from {workdir}/checkpoints/{latest} (step {start_step})")

    p_train, p_eval = make_steps(model, tx, mesh, rules, state_sh, tc.grad_accum_steps)
    pi, pc = jax.process_index(), jax.process_count()
    eval_batches = data.eval_batches(tc.eval_steps, tc.eval_batch_size, seq_len, config.seed, pi, pc)
    dropout_rng = jax.device_put(dropout_rng, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    metrics_log = MetricsLog(workdir, is_main)
    tokens_per_step = tc.batch_size * seq_len
    last = {"step": start_step}

    def save(step):
        ckpt_lib.save(mngr, step, state, {"step": step})

    log(f"setup took {time.time() - t_start:.1f}s; training steps {start_step}..{tc.num_steps}")
    t_log, step_log = time.time(), start_step
    pending = []
    step = start_step
    while step < tc.num_steps:
        batch = sharding.host_to_global(data.train_batch(step, tc.batch_size, seq_len, config.seed, pi, pc), mesh)
        with jax.transfer_guard("disallow"):  # the step must not move data behind our back
            state, metrics = p_train(state, batch, dropout_rng)
        pending.append(metrics)
        step += 1

        at_end = step == tc.num_steps
        if step % tc.log_every == 0 or at_end:
            fetched = jax.device_get(pending)
            pending = []
            loss = float(np.mean([m["loss"] for m in fetched]))
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss is {loss} at step {step}; the last good checkpoint in {workdir}/checkpoints "
                    "is kept. Lower config.optim.lr or enable gradient clipping."
                )
            now = time.time()
            tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
            eta = (tc.num_steps - step) * (now - t_log) / max(step - step_log, 1)
            t_log, step_log = now, step
            last.update({"step": step, "train/loss": loss, "train/grad_norm": float(fetched[-1]["grad_norm"]),
                         "train/tokens_per_sec": tps, "time_s": now - t_start})
            metrics_log.write(step, {k: v for k, v in last.items() if k != "step" and not k.startswith("eval/")})
            log(f"step {step:6d} | loss {loss:.4f} | {tps:,.0f} tok/s | eta {eta:.0f}s | {now - t_start:.0f}s")

        reached = False
        if step % tc.eval_every == 0 or at_end:
            eval_loss = evaluate(p_eval, state.params, eval_batches, mesh)
            now = time.time()
            last.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0)), "time_s": now - t_start})
            metrics_log.write(step, {"eval/loss": eval_loss, "eval/perplexity": last["eval/perplexity"], "time_s": now - t_start})
            log(f"step {step:6d} | eval loss {eval_loss:.4f} | perplexity {last['eval/perplexity']:.2f} | {now - t_start:.1f}s")
            reached = tc.target_eval_loss > 0 and eval_loss <= tc.target_eval_loss
            if reached:
                log(f"reached target eval loss {tc.target_eval_loss} at step {step} after {now - t_start:.1f}s")

        if tc.sample_every and step % tc.sample_every == 0 and not at_end:
            log_sample(log, model, state.params, data.tokenizer, tc, mesh, rules, config.seed + step)

        if step % tc.checkpoint_every == 0 or at_end or reached:
            save(step)
        if reached:
            break

    mngr.wait_until_finished()
    mngr.close()
    last["sample"] = log_sample(log, model, state.params, data.tokenizer, tc, mesh, rules, config.seed)
    metrics_log.close()
    log(f"done: step {last['step']} in {time.time() - t_start:.1f}s; checkpoints in {workdir}/checkpoints")
    return last


def log_sample(log, model, params, tokenizer, tc, mesh, rules, seed) -> str:
    prompt = tc.sample_prompt or ("\n" if tokenizer.kind != "sentencepiece" else "")
    try:
        with mesh, nn.logical_axis_rules(rules):
            text = decode_lib.complete(model, params, tokenizer, [prompt], tc.sample_tokens, seed=seed,
                                       temperature=tc.sample_temperature, top_k=tc.sample_top_k)[0]
    except ValueError as e:  # e.g. a character the vocabulary lacks: a sample is not worth a crash
        log(f"sample skipped: {e}")
        return ""
    log("sample:\n" + prompt + text + "\n" + "-" * 40)
    return prompt + text

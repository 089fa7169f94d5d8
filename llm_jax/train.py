"""Training: the state, the loss, pure jitted steps, and the loop with its periodic work.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(params, batch) -> metrics` are
pure; `train_and_evaluate` jits them with explicit shardings (state donated), feeds them global
batches, and on schedule logs, evaluates, samples and saves.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import data as data_lib
from llm_jax import decode as decode_lib
from llm_jax import distributed, optim, sharding
from llm_jax import flops as flops_lib
from llm_jax import loss as loss_lib
from llm_jax import tokenizer as tok_lib
from llm_jax.model import TransformerLM, count_params, output_kernel


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
    if model.cfg.loss_chunk:  # memory-light: never the full [b, t, v] float32 logits (llm_jax.loss)
        hidden = model.apply(
            {"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs, return_hidden=True
        )
        kernel, vocab_first = output_kernel(model.cfg, params)
        chunk = min(model.cfg.loss_chunk, hidden.shape[1])
        return loss_lib.chunked_cross_entropy(
            hidden, kernel, batch["targets"], batch.get("weights"), chunk, vocab_first
        )
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs)
    return token_loss(logits, batch["targets"], batch.get("weights"))


def train_step(
    state: TrainState,
    batch: dict,
    base_rng: jax.Array,
    *,
    model: TransformerLM,
    tx: optax.GradientTransformation,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict]:
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
    with mesh, nn.logical_axis_rules(rules):  # init is traced outside use_mesh (see its docstring)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def make_steps(model, tx, mesh, rules, state_shardings, grad_accum_steps: int, on_nan: str = "stop"):
    """Jitted (train_step, eval_step) with explicit shardings; the train step donates the state.

    on_nan='skip': an update whose loss or gradient norm is not finite is dropped (see `skip_nonfinite`).
    """
    batch_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = functools.partial(train_step, model=model, tx=tx, grad_accum_steps=grad_accum_steps)
    if on_nan == "skip":
        step_fn = skip_nonfinite(step_fn)
    p_train = jax.jit(
        step_fn,
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
            with sharding.use_mesh(mesh, rules):
                return fn(*args)

        run.jitted = fn
        return run

    return with_rules(p_train), with_rules(p_eval)


# ----------------------------------------------------------------------------------------------
# The loop


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only.

    `keep_until`: on resume, lines of steps after the restored checkpoint are dropped first (they
    are about to be recomputed, identically), so the file holds each step once.
    """

    def __init__(self, workdir: str, enabled: bool, keep_until: int | None = None):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if keep_until is not None:
            _truncate_jsonl(path, keep_until)
        self.file = open(path, "a", buffering=1)
        try:
            self.tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
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


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (seconds of
    start-up) only to recognise its tensors, and we log Python floats."""
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _truncate_jsonl(path: str, keep_until: int) -> None:
    """Drops lines whose step is after `keep_until` (and a line cut short by a crash); atomic."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and int(json.loads(line)["step"]) <= keep_until:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _scalar(v):
    v = np.asarray(v).item() if hasattr(v, "shape") else v
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None  # JSON has no NaN
    return v


def skip_nonfinite(step_fn: Callable) -> Callable:
    """Wraps a train step so that an update with a non-finite loss or gradient norm is dropped.

    Decided inside the jitted step (no host round trip): params and optimizer state stay as they
    were, the step counter still advances (the next step gets the next batch and dropout key), and
    metrics['skipped'] is 1.
    """

    def step(state, batch, rng):
        new_state, metrics = step_fn(state, batch, rng)
        ok = jnp.isfinite(metrics["loss"])
        if "grad_norm" in metrics:
            ok = ok & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return kept.replace(step=new_state.step), {**metrics, "skipped": jnp.logical_not(ok).astype(jnp.int32)}

    return step


def evaluate(p_eval, params, eval_batches, mesh) -> float:
    """Mean validation loss per token over the fixed evaluation batches."""
    total, count = 0.0, 0.0
    outs = [p_eval(params, sharding.host_to_global(b, mesh)) for b in eval_batches]
    for m in jax.device_get(outs):
        total += float(m["loss_sum"])
        count += float(m["count"])
    return total / count


# Keys a config may carry although base_config() lacks them (free-form dicts).
_OPTIONAL_KEYS = ("mesh.rules",)
# Model keys that change how the model computes, not its parameters: a resumed run may change them.
_RUNTIME_MODEL_KEYS = ("preset", "remat", "attention", "dtype", "dropout_rate", "loss_chunk")


def check_config_keys(config: ml_collections.ConfigDict) -> None:
    """Unknown keys are errors: a config file that sets `c.train.chekpoint_every` must not run silently."""
    base = config_lib.base_config().to_dict()

    def unknown(given: dict, known: dict, prefix: str) -> list[str]:
        out = []
        for k, v in given.items():
            path = prefix + k
            if any(path == o or path.startswith(o + ".") for o in _OPTIONAL_KEYS):
                continue
            if k not in known:
                out.append(path)
            elif isinstance(v, dict) and isinstance(known[k], dict) and known[k]:
                out += unknown(v, known[k], path + ".")
        return out

    bad = unknown(config.to_dict(), base, "")
    if bad:
        known = _flatten(base)
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"config.{k}" + (f" (did you mean config.{close[0]}?)" if close else ""))
        raise ValueError(
            f"unknown config key{'s' if len(bad) > 1 else ''}: {', '.join(hints)}. Every key is defined in "
            "llm_jax/config.py:base_config(); fix the spelling in the config file or on the command line"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_train_config(tc) -> None:
    if tc.on_nan not in ("stop", "skip"):
        raise ValueError(f"config.train.on_nan={tc.on_nan!r}: use 'stop' or 'skip'")
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "batch_size"):
        if tc[name] <= 0:
            raise ValueError(f"config.train.{name}={tc[name]} must be positive")


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Compares the model section of workdir/config.json with `config`.

    False: nothing there, or the same model (resume). True: a different model's run that
    config.train.overwrite allows moving aside. Otherwise raises, naming the differences.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            old = json.load(f)
        diffs = _model_diffs(old.get("model", {}), json.loads(json.dumps(config.model.to_dict())))
    except (OSError, ValueError, AttributeError) as e:
        diffs = [f"its config.json cannot be read ({type(e).__name__}: {e})"]
    if not diffs:
        return False
    if config.train.overwrite:
        return True
    raise ValueError(
        f"workdir {workdir} holds the run of a different model: " + "; ".join(diffs) + ". Resume it with its "
        "own config, choose another --workdir, or pass --config.train.overwrite=True to move that run to "
        f"{_aside_name(workdir)} (nothing is deleted) and start over"
    )


def _model_diffs(old: dict, new: dict) -> list[str]:
    old_f, new_f = _flatten(old), _flatten(new)
    return [
        f"model.{k} is {old_f[k]!r} there but {new_f[k]!r} now"
        for k in sorted(old_f.keys() & new_f.keys())
        if k not in _RUNTIME_MODEL_KEYS and old_f[k] != new_f[k]
    ]


def _aside_name(workdir: str) -> str:
    return f"{os.path.abspath(workdir).rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"


def move_run_aside(workdir: str, log) -> str:
    """Renames the whole old run (process 0); returns the new name."""
    dest = _aside_name(workdir)
    if jax.process_index() == 0:
        n = 1
        while os.path.exists(dest):
            dest, n = f"{_aside_name(workdir)}-{n}", n + 1
        os.rename(workdir, dest)
        log(f"moved the previous run in {workdir} to {dest}")
    _sync("llm_jax:move_run_aside")
    return dest


def tokenizer_fingerprint(tokenizer) -> dict:
    """Identifies a tokenizer (kind, vocab size, hash of its files): saved with every checkpoint."""
    h = hashlib.sha256(json.dumps(tokenizer._meta(), sort_keys=True).encode())
    for attr in ("proto", "json_str"):  # SentencePiece model / HF tokenizer.json
        v = getattr(tokenizer, attr, None)
        if v is not None:
            h.update(v if isinstance(v, bytes) else v.encode())
    return {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size), "sha256": h.hexdigest()[:16]}


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, tokenizer=None) -> None:
    """Creates the workdir, writes the resolved config (atomically) as config.json and the tokenizer
    if it is not there yet. Process 0 writes; call only once every check has passed."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(tmp, path)
        tok_dir = os.path.join(workdir, "tokenizer")
        if tokenizer is not None and not os.path.exists(os.path.join(tok_dir, tok_lib.META)):
            tokenizer.save(tok_dir)
    _sync("llm_jax:prepare_workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training as `config` says; returns the final metrics.

    Everything that can be wrong with the config, the data, the workdir or its checkpoints is
    checked (and the checkpoint restored) before anything in `workdir` changes. SIGTERM finishes
    the current step, saves it and returns (`last['preempted']`).
    """
    t_start = time.time()
    check_config_keys(config)
    config = config_lib.finalize(config)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    tc = config.train
    check_train_config(tc)
    preemption = distributed.Preemption()  # early: a notice during set-up stops after the first step
    try:
        return _train(config, workdir, log, preemption, t_start)
    finally:
        preemption.close()


def _train(config, workdir, log, preemption, t_start) -> dict:
    tc = config.train
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    start_over = check_workdir(workdir, config)

    tok_dir = os.path.join(workdir, "tokenizer")
    saved_tokenizer = not start_over and os.path.exists(os.path.join(tok_dir, tok_lib.META))
    data = data_lib.load_data(config.data, tokenizer_dir=tok_dir if saved_tokenizer else None, log=log)
    if saved_tokenizer and data.tokenizer.kind != config.data.tokenizer:
        raise ValueError(
            f"{tok_dir} holds the {data.tokenizer.kind!r} tokenizer this run was trained with, but "
            f"config.data.tokenizer={config.data.tokenizer!r}; use {data.tokenizer.kind!r} to resume, or "
            "start over with --config.train.overwrite=True (the old run is moved aside)"
        )
    seq_len = config.data.seq_len
    data.check(seq_len)

    model_cfg = config_lib.model_config(config, data.tokenizer.vocab_size)
    sharding.check_divisible(mesh, model_cfg, tc.batch_size)
    sharding.check_divisible(mesh, model_cfg, tc.eval_batch_size)
    if tc.batch_size % tc.grad_accum_steps or (tc.batch_size // tc.grad_accum_steps) % sharding.data_parallel_size(
        mesh
    ):
        raise ValueError(
            f"config.train.batch_size={tc.batch_size} must split into grad_accum_steps={tc.grad_accum_steps} "
            f"micro-batches that each divide over data*fsdp={sharding.data_parallel_size(mesh)} devices"
        )
    if tc.batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={tc.batch_size} must divide over {jax.process_count()} processes")
    model = TransformerLM(model_cfg)
    tx = optim.make_optimizer(config.optim)

    init_rng = jax.random.split(jax.random.key(config.seed))[0]  # [1] is the dropout key, made below
    boxed = jax.eval_shape(init_state_fn(model, tx, seq_len), init_rng)  # shapes only: nothing computed
    state_sh = sharding.boxed_shardings(boxed, mesh, rules)
    abstract = ckpt_lib.abstract_like(nn.meta.unbox(boxed), state_sh)
    tokenizer_id = tokenizer_fingerprint(data.tokenizer)

    def check_tokenizer(step, loop_state):
        saved = loop_state.get("tokenizer")
        if saved and saved != tokenizer_id:
            raise ckpt_lib.IncompatibleCheckpoint(
                f"checkpoint {ckpt_lib.checkpoint_dir(workdir)}/{step} was trained with tokenizer {saved}, but this "
                f"run's tokenizer ({tok_dir if saved_tokenizer else 'built from config.data'}) is {tokenizer_id}; "
                f"restore the run's own tokenizer in {tok_dir}, or start over with --config.train.overwrite=True"
            )

    # Restore (read only) before anything in the workdir changes: a checkpoint that does not fit is
    # an error here, and an unreadable one is skipped for the one before it.
    state, start_step, loop_state, bad_steps, latest = None, 0, {}, [], None
    if not start_over and os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
        reader = ckpt_lib.manager(workdir, tc.keep_checkpoints, read_only=True)
        try:
            latest, state, loop_state, bad_steps = ckpt_lib.restore_latest(reader, abstract, check_tokenizer, log)
        finally:
            reader.close()
        if latest is not None:
            start_step = int(loop_state.get("step", latest))

    # Every check passed: from here on the workdir may change.
    if start_over:
        move_run_aside(workdir, log)
    prepare_workdir(workdir, config, data.tokenizer)
    ckpt_lib.move_aside(workdir, bad_steps, log)
    mngr = ckpt_lib.manager(workdir, tc.keep_checkpoints)
    if state is None:
        state, state_sh = create_sharded_state(model, tx, mesh, rules, init_rng, seq_len)
    n_params = count_params(state.params)
    log(
        f"model: {n_params:,} parameters, {model_cfg.num_layers} layers, width {model_cfg.embed_dim}, "
        f"vocab {model_cfg.vocab_size}; mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"devices in {jax.process_count()} process{'es' if jax.process_count() > 1 else ''}"
    )
    if latest is not None:
        log(f"resumed from {mngr.directory}/{latest} (step {start_step})")

    p_train, p_eval = make_steps(model, tx, mesh, rules, state_sh, tc.grad_accum_steps, on_nan=tc.on_nan)
    pi, pc = jax.process_index(), jax.process_count()
    eval_batches = data.eval_batches(tc.eval_steps, tc.eval_batch_size, seq_len, config.seed, pi, pc)
    # Made by a jit with a replicated output: under several processes the mesh is not all addressable.
    dropout_rng = jax.jit(
        lambda: jax.random.split(jax.random.key(config.seed))[1],
        out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )()
    metrics_log = MetricsLog(workdir, pi == 0, keep_until=start_step)
    tokens_per_step = tc.batch_size * seq_len
    # MFU as llm_jax.bench reports it: model FLOPs per token over the devices' peak (measured on CPU).
    flops_token = flops_lib.flops_per_token(model_cfg, seq_len)
    peak_flops, _ = flops_lib.peak_flops(mesh.devices.flatten().tolist(), model_cfg.dtype)
    last = {"step": start_step, "preempted": False}

    # The losses of the logging window so far live in the checkpoint too, so that a run resumed in
    # the middle of a window logs exactly the numbers of an uninterrupted one.
    window = [float(x) for x in loop_state.get("window_losses", [])]
    window_skipped = int(loop_state.get("window_skipped", 0))
    total_skipped = int(loop_state.get("skipped_steps", 0))
    pending = []  # device metrics of steps not yet fetched
    grad_norm = float("nan")
    step = saved_step = start_step

    def fetch():
        """Brings pending metrics to the host; a non-finite loss stops the run (on_nan='stop')."""
        nonlocal pending, window_skipped, total_skipped, grad_norm
        if not pending:
            return
        got, first = jax.device_get(pending), step - len(pending) + 1
        pending = []
        for i, m in enumerate(got):
            loss, gnorm = float(m["loss"]), float(m.get("grad_norm", 0.0))
            if int(m.get("skipped", 0)):
                window_skipped += 1
                total_skipped += 1
                log(f"step {first + i:6d} | skipped: loss {loss}, grad norm {gnorm} (config.train.on_nan='skip')")
                continue
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise FloatingPointError(
                    f"training loss is {loss} (grad norm {gnorm}) at step {first + i}; stopped without saving it. "
                    f"The last good checkpoint in {mngr.directory} is kept. Lower config.optim.lr, enable "
                    "gradient clipping (config.optim.grad_clip), or skip such updates with config.train.on_nan='skip'."
                )
            window.append(loss)
        grad_norm = float(got[-1].get("grad_norm", float("nan")))

    def save():
        nonlocal saved_step
        if step == saved_step:
            return
        fetch()  # never save a state whose loss has not been checked
        ckpt_lib.save(
            mngr,
            step,
            state,
            {
                "step": step,
                "window_losses": window,
                "window_skipped": window_skipped,
                "skipped_steps": total_skipped,
                "tokenizer": tokenizer_id,
            },
        )
        saved_step = step

    log(f"setup took {time.time() - t_start:.1f}s; training steps {start_step}..{tc.num_steps}")
    t_log, step_log = time.time(), start_step
    try:
        while step < tc.num_steps:
            batch = sharding.host_to_global(data.train_batch(step, tc.batch_size, seq_len, config.seed, pi, pc), mesh)
            with jax.transfer_guard("disallow"):  # the step must not move data behind our back
                state, metrics = p_train(state, batch, dropout_rng)
            pending.append(metrics)
            step += 1

            at_end = step == tc.num_steps
            if step % tc.log_every == 0 or at_end:
                fetch()
                loss = math.fsum(window) / len(window) if window else float("nan")
                now = time.time()
                tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                eta = (tc.num_steps - step) * (now - t_log) / max(step - step_log, 1)
                t_log, step_log = now, step
                mfu = flops_lib.mfu(tps, flops_token, peak_flops)
                last.update(
                    {
                        "step": step,
                        "train/loss": loss,
                        "train/grad_norm": grad_norm,
                        "train/tokens_per_sec": tps,
                        "train/mfu": mfu,
                        "time_s": now - t_start,
                    }
                )
                if tc.on_nan == "skip":
                    last.update({"train/skipped_steps": total_skipped})
                metrics_log.write(
                    step,
                    {k: v for k, v in last.items() if k not in ("step", "preempted") and not k.startswith("eval/")},
                )
                skipped = f" | {window_skipped} skipped" if window_skipped else ""
                mfu_text = "" if mfu is None else f" | MFU {100 * mfu:.1f}%"
                log(
                    f"step {step:6d} | loss {loss:.4f}{skipped} | {tps:,.0f} tok/s{mfu_text} | eta {eta:.0f}s | {now - t_start:.0f}s"
                )
                window, window_skipped = [], 0

            reached = False
            if step % tc.eval_every == 0 or at_end:
                fetch()
                eval_loss = evaluate(p_eval, state.params, eval_batches, mesh)
                now = time.time()
                last.update(
                    {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0)), "time_s": now - t_start}
                )
                metrics_log.write(
                    step, {"eval/loss": eval_loss, "eval/perplexity": last["eval/perplexity"], "time_s": now - t_start}
                )
                log(
                    f"step {step:6d} | eval loss {eval_loss:.4f} | perplexity {last['eval/perplexity']:.2f} | {now - t_start:.1f}s"
                )
                reached = tc.target_eval_loss > 0 and eval_loss <= tc.target_eval_loss
                if reached:
                    log(f"reached target eval loss {tc.target_eval_loss} at step {step} after {now - t_start:.1f}s")

            if tc.sample_every and step % tc.sample_every == 0 and not at_end:
                log_sample(log, model, state.params, data.tokenizer, tc, mesh, rules, config.seed + step)

            if step % tc.checkpoint_every == 0 or at_end or reached:
                save()
            if reached:
                break
            if preemption.reached(step):
                save()
                mngr.wait_until_finished()
                last["preempted"] = True
                log(
                    f"preempted (SIGTERM): saved step {step} to {mngr.directory}/{step}; exiting. "
                    "Run the same command again to resume."
                )
                break
        mngr.wait_until_finished()
    finally:
        try:  # an exception (e.g. a NaN) must not cut short the save of the last good state
            mngr.wait_until_finished()
            mngr.close()
        finally:
            metrics_log.close()

    if not last["preempted"] and tc.sample_tokens > 0:
        last["sample"] = log_sample(log, model, state.params, data.tokenizer, tc, mesh, rules, config.seed)
    log(f"done: step {last['step']} in {time.time() - t_start:.1f}s; checkpoints in {mngr.directory}")
    return last


def log_sample(log, model, params, tokenizer, tc, mesh, rules, seed) -> str:
    prompt = tc.sample_prompt or ("\n" if tokenizer.kind != "sentencepiece" else "")
    try:
        with sharding.use_mesh(mesh, rules):
            text = decode_lib.complete(
                model,
                params,
                tokenizer,
                [prompt],
                tc.sample_tokens,
                seed=seed,
                temperature=tc.sample_temperature,
                top_k=tc.sample_top_k,
            )[0]
    except ValueError as e:  # e.g. a character the vocabulary lacks: a sample is not worth a crash
        log(f"sample skipped: {e}")
        return ""
    log("sample:\n" + prompt + text + "\n" + "-" * 40)
    return prompt + text

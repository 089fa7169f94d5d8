"""The training loop: steps plus the periodic actions that are due.

`train_and_evaluate` checks everything, claims the workdir (one writer), builds the run's state and
steps (`llm_jax/training/state.py`: `build`), restores or creates the sharded state, then runs the
loop: one jitted step per iteration, followed by the periodic actions (log, evaluate, sample,
checkpoint) that are due, all of them reading a `Trainer` (what stays fixed) and updating a
`LoopState` (what the loop changes).

Divergence: a checkpoint is written only from a sane state (`check_sane`): the loss of the very
parameters to save is finite and not a spike over the running mean of the training loss. Else
the run stops naming the last good checkpoint, so that one always is good.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from llm_jax.data import lm_data as data_lib
from llm_jax.data import preference as preference_data
from llm_jax.data import tokenizer as tok_lib
from llm_jax.inference import decode as decode_lib
from llm_jax.inference import translate as translate_lib
from llm_jax.models import family as family_lib
from llm_jax.models import flops as flops_lib
from llm_jax.models import lora
from llm_jax.runtime import distributed, sharding
from llm_jax.runtime.errors import BadValue, Diverged, Unavailable, UserError
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import lora_base, optim
from llm_jax.training import state as state_lib
from llm_jax.training import summary as summary_lib
from llm_jax.training import workdir as workdir_lib
from llm_jax.training.metrics import MetricsLog


def evaluate(p_eval, params, eval_batches, mesh) -> float:
    """Mean validation loss per token over the fixed evaluation batches."""
    return evaluate_metrics(p_eval, params, eval_batches, mesh)["loss"]


def evaluate_metrics(p_eval, params, eval_batches, mesh) -> dict[str, float]:
    """Every sum the eval step returns, per counted item (a token; a preference objective's pair)
    over the fixed evaluation batches: 'loss' (of 'loss_sum') and any metrics (rewards/margin, ...)."""
    outs = [p_eval(params, sharding.host_to_global(b, mesh)) for b in eval_batches]
    got = jax.device_get(outs)
    count = math.fsum(float(m["count"]) for m in got)
    return {k.removesuffix("_sum"): math.fsum(float(m[k]) for m in got) / count for k in got[0] if k != "count"}


# ----------------------------------------------------------------------------------------------
# Divergence: pure decisions on the training loss

LOSS_MEAN_DECAY = 0.95  # the running mean of the training loss weighs about the last 20 steps
SPIKE_MIN_GAP = 1.0  # a spike is also this far above the mean: near zero, losses vary by large factors


def is_spike(loss: float, mean: float | None, factor: float) -> bool:
    """Whether `loss` is more than `factor` times the running `mean` (and SPIKE_MIN_GAP above it);
    never with no mean yet or factor 0."""
    return factor > 0 and mean is not None and loss > factor * mean and loss > mean + SPIKE_MIN_GAP


def updated_mean(mean: float | None, loss: float, factor: float) -> float | None:
    """The running mean after a step's loss. Spikes stay out of it: an exploding run must not drag
    its own reference up until the explosion looks normal."""
    if not math.isfinite(loss) or is_spike(loss, mean, factor):
        return mean
    return loss if mean is None else LOSS_MEAN_DECAY * mean + (1.0 - LOSS_MEAN_DECAY) * loss


# ----------------------------------------------------------------------------------------------
# Set-up: cheap checks, then the workdir is claimed; everything else is checked, and the
# checkpoint restored, before anything else in the workdir changes


@dataclasses.dataclass
class Trainer:
    """What the loop's actions read; fixed for the whole run."""

    config: ml_collections.ConfigDict
    workdir: str
    log: Callable[..., None]
    t_start: float
    data: Any  # data.LMData or another source with the same interface
    model: nn.Module
    mesh: jax.sharding.Mesh
    rules: Any
    p_train: Callable
    p_eval: Callable
    eval_batches: list
    dropout_rng: jax.Array
    mngr: Any  # orbax CheckpointManager
    lock: workdir_lib.WorkdirLock | None  # process 0's claim on the workdir (None on the others)
    metrics: MetricsLog
    preemption: distributed.Preemption
    tokenizer_id: dict
    flops_per_token: float
    peak_flops: float | None
    frozen: Any = dataclasses.field(default_factory=dict)  # a LoRA run's base (`lora_base.load`); {} otherwise
    base_step: int | None = None  # the base's checkpoint it was read from

    def params(self, ls: LoopState) -> Any:
        """The model's whole parameters: the trained ones, with a LoRA run's frozen base."""
        return lora.combine(self.frozen, ls.state.params)


@dataclasses.dataclass
class LoopState:
    """What the loop changes. Its small host part is saved in every checkpoint (`checkpoint_data`),
    so a run resumed mid-way logs exactly what an uninterrupted one would."""

    state: state_lib.TrainState
    step: int
    saved_step: int
    trained_context: int  # the longest context trained at so far: what decoding may use
    window: list[float] = dataclasses.field(default_factory=list)  # losses of the logging window
    window_skipped: int = 0
    skipped_total: int = 0
    pending: list = dataclasses.field(default_factory=list)  # device metrics of steps not yet fetched
    grad_norm: float = float("nan")
    extra: dict = dataclasses.field(default_factory=dict)  # the family's extra metrics of the latest step (MoE)
    loss_mean: float | None = None  # running mean of the training loss (`updated_mean`), for `check_sane`
    log_time: float = 0.0
    log_step: int = 0
    train_record: dict = dataclasses.field(default_factory=dict)  # the latest log line's metrics
    eval_record: dict = dataclasses.field(default_factory=dict)  # the latest evaluation's metrics
    stop: str = ""  # why the loop ends early: 'target' | 'preempted'


def checkpoint_data(trainer: Trainer, ls: LoopState) -> dict:
    """The loop state saved beside the train state (JSON)."""
    return {
        "step": ls.step,
        "window_losses": ls.window,
        "window_skipped": ls.window_skipped,
        "skipped_steps": ls.skipped_total,
        "tokenizer": trainer.tokenizer_id,
        "trained_context": ls.trained_context,
        "loss_mean": ls.loss_mean,  # a resumed run decides on divergence as an uninterrupted one does
        **({lora_base.BASE_STEP: trainer.base_step} if trainer.base_step is not None else {}),
    }


def _load_data(config, workdir: str, start_over: bool, log):
    """The configured data, with the run's own tokenizer when resuming; every process holds the same.

    Process 0 loads first: it prepares the data and trains the tokenizer where the cache holds
    none yet, while the others wait; then they load what it prepared (or, where the cache is not
    shared, prepare their own copy). An error on any process stops all of them with its line
    (`distributed.agree`), and so do tokenizers or token counts that differ between processes
    (host-local files or caches that differ), which would otherwise hang the first collective."""
    loaded = None
    for first in (True, False):  # process 0's turn, then the others'
        error = None
        if (jax.process_index() == 0) == first:
            try:
                loaded = _load_own_data(config, workdir, start_over, log)
            except UserError as e:
                error = e
        distributed.agree(error)
    _check_same_data(loaded[0])
    return loaded


def _check_same_data(data) -> None:
    """Raises the same BadValue on every process unless all hold the same tokenizer and token counts."""
    fp = tok_lib.fingerprint(data.tokenizer)
    counts = [len(t) for t in (getattr(data, "train_tokens", None), getattr(data, "val_tokens", None)) if t is not None]
    held, other = distributed.differing(f"tokenizer {json.dumps(fp, sort_keys=True)}, tokens per split {counts}")
    if other is not None:
        raise BadValue(
            f"the processes hold different data: process 0 {held[0]}; process {other} {held[other]}. Give every "
            "host the same files at config.data.path and the same config.data (or a shared config.data.cache_dir), "
            f"or delete the stale prepared data or tokenizer in the cache of process {other}'s host"
        )


def _load_own_data(config, workdir: str, start_over: bool, log):
    """This process's data (see _load_data), with the run's own tokenizer when resuming."""
    saved = not start_over and workdir_lib.has_tokenizer(workdir)
    tok_dir = workdir_lib.tokenizer_dir(workdir) if saved else None
    if tok_dir is None and config.lora.base and workdir_lib.has_tokenizer(config.lora.base):
        tok_dir = workdir_lib.tokenizer_dir(config.lora.base)  # a new LoRA run reads as its base did
    if config.data.source == "preference":  # pairs for DPO / SimPO (kept apart from lm_data: it builds on it)
        data = preference_data.load_preference_data(config.data, tokenizer_dir=tok_dir, log=log)
    else:
        data = data_lib.load_data(config.data, tokenizer_dir=tok_dir, log=log)
    if saved and data.tokenizer.kind != config.data.tokenizer:
        raise BadValue(
            f"{workdir_lib.tokenizer_dir(workdir)} holds the {data.tokenizer.kind!r} tokenizer this run was trained "
            f"with, but config.data.tokenizer={config.data.tokenizer!r}; use {data.tokenizer.kind!r} to resume, or "
            "start over with --config.train.overwrite=True (the old run is moved aside)"
        )
    data.check(config.data.seq_len)
    return data, saved


def _restore(workdir: str, abstract, tokenizer_id: dict, tokenizer_source: str, log):
    """(step, state, loop data, unreadable steps) of the newest usable checkpoint; read only."""
    present = os.path.isdir(ckpt_lib.checkpoint_dir(workdir))
    seen = [json.loads(t) for t in distributed.all_texts(json.dumps([present, ckpt_lib.checkpoint_dir(workdir)]))]
    other = next((i for i, (p, _) in enumerate(seen) if p != seen[0][0]), None)  # all must take the same branch
    if other is not None:
        has, lacks = (0, other) if seen[0][0] else (other, 0)
        raise Unavailable(
            f"{seen[has][1]} exists on process {has} but {seen[lacks][1]} does not on process {lacks}; give every "
            "host the same (shared) --workdir"
        )
    if not present:
        return None, None, {}, []

    def check_tokenizer(step, data):
        saved = data.get("tokenizer")
        if saved and saved != tokenizer_id:
            raise ckpt_lib.IncompatibleCheckpoint(
                f"checkpoint {ckpt_lib.checkpoint_dir(workdir)}/{step} was trained with tokenizer {saved}, but this "
                f"run's tokenizer ({tokenizer_source}) is {tokenizer_id}; restore the run's own tokenizer in "
                f"{workdir_lib.tokenizer_dir(workdir)}, or start over with --config.train.overwrite=True"
            )

    reader = ckpt_lib.manager(workdir, 1, read_only=True)
    try:
        return ckpt_lib.restore_latest(reader, abstract, check_tokenizer, log)
    finally:
        reader.close()


def setup(config, workdir: str, start_over: bool, lock, log, t_start: float, preemption) -> tuple[Trainer, LoopState]:
    """Checks data and checkpoints, restores (or creates) the state, then opens the claimed
    workdir for writing. Nothing in `workdir` but its lock changes before every check has passed."""
    data, saved_tokenizer = _load_data(config, workdir, start_over, log)
    b = state_lib.build(config, data.tokenizer.vocab_size)
    config, tc, seq_len = b.config, b.config.train, b.config.data.seq_len
    init_rng, dropout_key = jax.random.split(jax.random.key(config.seed))
    tokenizer_id = tok_lib.fingerprint(data.tokenizer)
    source = workdir_lib.tokenizer_dir(workdir) if saved_tokenizer else "built from config.data"
    latest, state, restored, bad_steps = (None, None, {}, []) if start_over else _restore(
        workdir, b.state, tokenizer_id, source, log
    )  # fmt: skip
    base_step, frozen = None, {}
    if config.lora.rank:  # the frozen base, read (and checked) before the workdir changes
        base_step, frozen = lora_base.load(
            config, b.model_cfg, b.mesh, b.rules, b.frozen, restored.get(lora_base.BASE_STEP), tokenizer_id
        )  # fmt: skip
        log(
            f"LoRA: base {config.lora.base} at step {base_step} ({config.lora.base_dtype}), adapters "
            f"{', '.join(sorted({n.rsplit('/', 1)[-1] for n in lora.adapter_names(b.state.params)}))}"
        )

    # Every check passed: from here on the workdir may change.
    if start_over:
        workdir_lib.move_aside(workdir, log, lock)
    workdir_lib.prepare(workdir, config, data.tokenizer)
    ckpt_lib.move_aside(workdir, bad_steps, log)
    mngr = ckpt_lib.manager(workdir, tc.keep_checkpoints)
    if state is None:
        state = b.create_state(init_rng)
    start_step = int(restored.get("step", latest or 0))
    pi, pc = jax.process_index(), jax.process_count()
    replicated = jax.sharding.NamedSharding(b.mesh, jax.sharding.PartitionSpec())
    trainer = Trainer(
        config=config, workdir=workdir, log=log, t_start=t_start, data=data, model=b.model, mesh=b.mesh,
        rules=b.rules, p_train=b.p_train, p_eval=b.p_eval,
        eval_batches=data.eval_batches(tc.eval_steps, tc.eval_batch_size, seq_len, config.seed, pi, pc),
        # Made by a jit with a replicated output: under several processes the mesh is not all addressable.
        dropout_rng=jax.jit(lambda: dropout_key, out_shardings=replicated)(),
        mngr=mngr, lock=lock, metrics=MetricsLog(workdir, pi == 0, keep_until=start_step), preemption=preemption,
        tokenizer_id=tokenizer_id, flops_per_token=family_lib.flops_per_token(b.model_cfg, seq_len),
        peak_flops=flops_lib.peak_flops(b.mesh.devices.flatten().tolist(), b.model_cfg.dtype)[0],
        frozen=frozen, base_step=base_step,
    )  # fmt: skip
    ls = LoopState(
        state=state, step=start_step, saved_step=start_step, log_step=start_step, log_time=time.time(),
        trained_context=max(int(restored.get("trained_context", 0)), seq_len),
        window=[float(x) for x in restored.get("window_losses", [])],
        window_skipped=int(restored.get("window_skipped", 0)), skipped_total=int(restored.get("skipped_steps", 0)),
        loss_mean=restored.get("loss_mean"),
    )  # fmt: skip
    _log_start(trainer, ls, latest)
    return trainer, ls


def _log_start(trainer: Trainer, ls: LoopState, latest) -> None:
    """The model summary (parameters per module, FLOPs per token, mesh, memory, each tensor's sharding)."""
    log = trainer.log
    if jax.process_index() == 0:  # the only process that logs
        seq_len = trainer.config.data.seq_len
        params, opt_state = trainer.params(ls), ls.state.opt_state  # the whole model; the adapters' optimizer
        log(summary_lib.summarize(trainer.model, params, trainer.mesh, trainer.rules, seq_len, opt_state))
    if latest is not None:
        log(f"resumed from {trainer.mngr.directory}/{latest} (step {ls.step})")
    log(f"setup took {time.time() - trainer.t_start:.1f}s; training steps {ls.step}..{trainer.config.train.num_steps}")


# ----------------------------------------------------------------------------------------------
# Periodic actions: each reads the Trainer and updates the LoopState


def fetch(trainer: Trainer, ls: LoopState) -> None:
    """Brings pending step metrics to the host and updates the running mean of the loss; a
    non-finite loss stops the run (on_nan='stop')."""
    if not ls.pending:
        return
    got, first = jax.device_get(ls.pending), ls.step - len(ls.pending) + 1
    ls.pending = []
    for i, m in enumerate(got):
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if int(m.get("skipped", 0)):
            ls.window_skipped += 1
            ls.skipped_total += 1
            trainer.log(f"step {first + i:6d} | skipped: loss {loss}, grad norm {gnorm} (config.train.on_nan='skip')")
            continue
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise diverged(
                trainer, ls, f"the training loss is {loss} (grad norm {gnorm}) at step {first + i}",
                "Or skip such updates with config.train.on_nan='skip'.",
            )  # fmt: skip
        ls.window.append(loss)
        ls.loss_mean = updated_mean(ls.loss_mean, loss, trainer.config.train.spike_factor)
    ls.grad_norm = float(got[-1]["grad_norm"])
    # aux_loss, router_z_loss (scalars), expert_load (a list: one fraction per expert)
    ls.extra = {f"train/{k}": v.tolist() for k, v in got[-1].items() if k not in ("loss", "grad_norm", "skipped")}


def diverged(trainer: Trainer, ls: LoopState, what: str, advice: str) -> Diverged:
    """The error that stops a diverged run, naming the last good checkpoint (the save in flight, if
    any, was started from a checked state: it is waited for) and the step to resume from."""
    trainer.mngr.wait_until_finished()
    last, lr = trainer.mngr.latest_step(), trainer.config.optim.lr
    lower = f"a lower learning rate (e.g. --config.optim.lr={lr / 10:g}; gradient clipping: config.optim.grad_clip)"
    if last is None:
        where = f"No checkpoint was kept (it diverged before its first save): start again with {lower}."
    else:
        where = (
            f"The last good checkpoint is step {last} in {trainer.mngr.directory}: run the same command with "
            f"{lower} to resume from step {last}."
        )
    return Diverged(f"training diverged: {what}; step {ls.step} was not saved. {where} {advice}")


def host_batch(trainer: Trainer, step: int) -> dict:
    """This process's rows of the training batch of `step` (a pure function of the seed and step)."""
    tc = trainer.config.train
    pi, pc = jax.process_index(), jax.process_count()
    return trainer.data.train_batch(step, tc.batch_size, trainer.config.data.seq_len, trainer.config.seed, pi, pc)


def check_sane(trainer: Trainer, ls: LoopState) -> None:
    """Raises Diverged unless the state about to be saved is sane: the loss of its own parameters on
    the next training batch (without dropout) is finite and no spike over the running mean. A step's
    own loss is of the parameters before its update, so it cannot tell whether that update exploded
    them; this costs one forward pass per save and changes nothing. It reads as many rows as an
    evaluation batch: a shape the eval step compiles anyway and that is known to fit in memory (a
    save on SIGTERM has no time for a compilation)."""
    tc = trainer.config.train
    if tc.spike_factor <= 0:
        return
    rows = min(tc.eval_batch_size, tc.batch_size) // jax.process_count()
    batch = {k: v[:rows] for k, v in host_batch(trainer, ls.step).items()}
    loss = evaluate(trainer.p_eval, trainer.params(ls), [batch], trainer.mesh)
    if math.isfinite(loss) and not is_spike(loss, ls.loss_mean, tc.spike_factor):
        return
    mean = "none yet" if ls.loss_mean is None else f"{ls.loss_mean:.4g}"
    raise diverged(
        trainer, ls,
        f"the loss of the parameters at step {ls.step} is {loss:.4g}, more than "
        f"config.train.spike_factor={tc.spike_factor:g} times the running mean of the training loss ({mean})",
        "A spike that is no divergence: raise config.train.spike_factor (0 turns the check off).",
    )  # fmt: skip


def log_progress(trainer: Trainer, ls: LoopState) -> None:
    """The training log line and its metrics.jsonl record: mean loss of the window, speed, MFU, ETA."""
    fetch(trainer, ls)
    tc = trainer.config.train
    now = time.time()
    loss = math.fsum(ls.window) / len(ls.window) if ls.window else float("nan")
    tps = (ls.step - ls.log_step) * tc.batch_size * trainer.config.data.seq_len / max(now - ls.log_time, 1e-9)
    eta = (tc.num_steps - ls.step) * (now - ls.log_time) / max(ls.step - ls.log_step, 1)
    mfu = flops_lib.mfu(tps, trainer.flops_per_token, trainer.peak_flops)
    ls.train_record = {
        "train/loss": loss,
        # The rate of the step's last update (optax counts updates from 0), for plots.
        "train/lr": float(optim.make_schedule(trainer.config.optim)(max(ls.step - 1, 0))),
        "train/grad_norm": ls.grad_norm,
        "train/tokens_per_sec": tps,
        "train/mfu": mfu,
        "time_s": now - trainer.t_start,
        **ls.extra,
    }
    if tc.on_nan == "skip":
        ls.train_record["train/skipped_steps"] = ls.skipped_total
    trainer.metrics.write(ls.step, ls.train_record)
    skipped = f" | {ls.window_skipped} skipped" if ls.window_skipped else ""
    mfu_text = "" if mfu is None else f" | MFU {100 * mfu:.1f}%"
    if "train/rewards/margin" in ls.extra:  # a preference objective: its latest step's pairs
        skipped += (
            f" | margin {ls.extra['train/rewards/margin']:.4f} | accuracy {ls.extra['train/rewards/accuracy']:.2f}"
        )
    trainer.log(
        f"step {ls.step:6d} | loss {loss:.4f}{skipped} | {tps:,.0f} tok/s{mfu_text} | eta {eta:.0f}s | "
        f"{now - trainer.t_start:.0f}s"
    )
    ls.window, ls.window_skipped, ls.log_time, ls.log_step = [], 0, now, ls.step


def run_eval(trainer: Trainer, ls: LoopState) -> None:
    """Validation loss on the fixed evaluation batches; stops the run once it reaches the target."""
    fetch(trainer, ls)
    metrics = evaluate_metrics(trainer.p_eval, trainer.params(ls), trainer.eval_batches, trainer.mesh)
    loss = metrics.pop("loss")
    elapsed = time.time() - trainer.t_start
    if metrics:  # a preference objective's: rewards, margin, accuracy on the validation pairs
        ls.eval_record = {"eval/loss": loss, **{f"eval/{k}": v for k, v in metrics.items()}, "time_s": elapsed}
        shown = f"margin {metrics['rewards/margin']:.4f} | accuracy {metrics['rewards/accuracy']:.3f}"
    else:
        ls.eval_record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "time_s": elapsed}
        shown = f"perplexity {ls.eval_record['eval/perplexity']:.2f}"
    trainer.metrics.write(ls.step, ls.eval_record)
    trainer.log(f"step {ls.step:6d} | eval loss {loss:.4f} | {shown} | {elapsed:.1f}s")
    target = trainer.config.train.target_eval_loss
    if target > 0 and loss <= target:
        trainer.log(f"reached target eval loss {target} at step {ls.step} after {elapsed:.1f}s")
        ls.stop = "target"


def sample(trainer: Trainer, ls: LoopState, seed: int | None = None) -> str:
    """Logs (and returns) a sample from the current params, decoded within the trained context."""
    tc, tokenizer = trainer.config.train, trainer.data.tokenizer
    prompt = tc.sample_prompt or ("\n" if tokenizer.kind != "sentencepiece" else "")
    seed = trainer.config.seed + ls.step if seed is None else seed
    try:
        with sharding.use_mesh(trainer.mesh, trainer.rules):
            text = decode_lib.complete(
                trainer.model, trainer.params(ls), tokenizer, [prompt], tc.sample_tokens, seed=seed,
                temperature=tc.sample_temperature, top_k=tc.sample_top_k, context=ls.trained_context,
            )[0]  # fmt: skip
    except BadValue as e:  # e.g. a prompt character the vocabulary lacks: a sample is not worth a crash (a bug is)
        trainer.log(f"sample skipped: {e}")
        return ""
    trainer.log("sample:\n" + prompt + text + "\n" + "-" * 40)
    return prompt + text


def run_decode_eval(trainer: Trainer, ls: LoopState) -> None:
    """The family's decoding metrics on validation data (BLEU for translation, `translate_lib.DECODE_METRICS`),
    logged like the others; none for a family without any."""
    evaluate = translate_lib.DECODE_METRICS.get(trainer.config.model.family)
    if evaluate is None:
        return
    t0 = time.time()
    with sharding.use_mesh(trainer.mesh, trainer.rules):
        metrics = evaluate(trainer.model, trainer.params(ls), trainer.data, trainer.config)
    if metrics:
        trainer.metrics.write(ls.step, metrics)
        ls.eval_record.update(metrics)
        shown = " | ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        trainer.log(f"step {ls.step:6d} | {shown} | {time.time() - t0:.1f}s to decode")


def save(trainer: Trainer, ls: LoopState) -> None:
    """Starts an async checkpoint of the current state (once its loss has been checked)."""
    if ls.step == ls.saved_step:
        return
    fetch(trainer, ls)  # never save a state whose loss has not been checked
    check_sane(trainer, ls)
    workdir_lib.check_held(trainer.lock)  # a run whose lock was taken over stops before it writes
    ckpt_lib.save(trainer.mngr, ls.step, ls.state, checkpoint_data(trainer, ls))
    ls.saved_step = ls.step


@dataclasses.dataclass(frozen=True)
class Periodic:
    """An action run every `every` steps (0: never) and, if `at_end`, after the last step."""

    every: int
    action: Callable[[Trainer, LoopState], Any]
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == last)


def periodic_actions(tc) -> list[Periodic]:
    return [
        Periodic(tc.log_every, log_progress),
        Periodic(tc.eval_every, run_eval),
        Periodic(tc.decode_eval_every, run_decode_eval, at_end=tc.decode_eval_every > 0),
        Periodic(tc.sample_every, sample, at_end=False),  # the final sample comes after the last save
        Periodic(tc.checkpoint_every, save),
    ]


# ----------------------------------------------------------------------------------------------
# The loop


def train_loop(trainer: Trainer, ls: LoopState, extra_actions: Sequence[Periodic] = ()) -> None:
    """Steps until `num_steps`, a reached target or a preemption notice, running the due actions
    (`extra_actions`, e.g. llm_jax/evaluation/periodic.py's lm-eval tasks, before the save)."""
    tc, seq_len = trainer.config.train, trainer.config.data.seq_len
    pi, pc = jax.process_index(), jax.process_count()
    actions = periodic_actions(tc)
    actions[-1:-1] = extra_actions
    # Batch N is data.train_batch(N) whatever the iterator: it only builds the next ones ahead.
    host_batches = data_lib.batches(
        trainer.data, ls.step, tc.batch_size, seq_len, trainer.config.seed, pi, pc, num_steps=tc.num_steps
    )
    while ls.step < tc.num_steps and not ls.stop:
        host = next(host_batches)
        batch = sharding.host_to_global(host, trainer.mesh)
        with jax.transfer_guard("disallow"):  # the step must not move data behind our back
            ls.state, metrics = trainer.p_train(ls.state, batch, trainer.dropout_rng, trainer.frozen)
        ls.pending.append(metrics)
        ls.step += 1
        for periodic in actions:
            if periodic.due(ls.step, tc.num_steps):
                periodic.action(trainer, ls)
        if ls.stop:  # reached the target: keep this state
            save(trainer, ls)
        elif trainer.preemption.reached(ls.step):
            save(trainer, ls)
            trainer.mngr.wait_until_finished()
            ls.stop = "preempted"
            trainer.log(
                f"preempted (SIGTERM): saved step {ls.step} to {trainer.mngr.directory}/{ls.step}; exiting. "
                "Run the same command again to resume."
            )
    trainer.mngr.wait_until_finished()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, extra_actions: Sequence[Periodic] = ()) -> dict:
    """Runs (or resumes) training as `config` says; returns the final metrics. `extra_actions` run
    with the loop's own (`config.train.eval_tasks` needs llm_jax.evaluation.periodic's, which
    `periodic.train_and_evaluate` and llm_jax.main pass).

    The config, the mesh and the workdir's config.json are checked first; then the workdir is
    claimed (created if missing, probed for writing, locked: a second run on it is refused or
    waits, see llm_jax/training/workdir.py); then the data and checkpoints are checked (and the checkpoint
    restored) before anything else in `workdir` changes. SIGTERM finishes the current step, saves
    it and returns (`preempted` is True).
    """
    t_start = time.time()
    config = state_lib.checked_config(config)
    if config.train.get("eval_tasks") and not extra_actions:
        raise BadValue(
            "config.train.eval_tasks needs the evaluation layer: run llm_jax.main, or call "
            "llm_jax.evaluation.periodic.train_and_evaluate instead of training.loop.train_and_evaluate"
        )
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    sharding.make_mesh(config.mesh)  # a mesh the devices cannot take fails here, before the workdir is claimed
    if config.lora.rank:  # a LoRA run's base: a plain run of the same model, before the workdir is claimed
        distributed.agreed(lora_base.base_config, config)
    start_over = distributed.agreed(workdir_lib.check, workdir, config)
    hint = ", or pass --config.train.wait_for_lock=SECONDS to wait for it; each run needs its own --workdir"
    lock = workdir_lib.claim(workdir, config.train.wait_for_lock, log, "llm_jax.main", hint)
    preemption = distributed.Preemption()  # early: a notice during set-up stops after the first step
    try:
        trainer, ls = setup(config, workdir, start_over, lock, log, t_start, preemption)
        try:
            train_loop(trainer, ls, extra_actions)
        finally:
            try:  # an exception (e.g. a NaN) must not cut short the save of the last good state
                trainer.mngr.wait_until_finished()
                trainer.mngr.close()
            finally:
                trainer.metrics.close()
    finally:
        preemption.close()
        if lock is not None:
            lock.release()
    summary = {"step": ls.step, **ls.train_record, **ls.eval_record, "preempted": ls.stop == "preempted"}
    if ls.stop != "preempted" and config.train.sample_tokens > 0:
        summary["sample"] = sample(trainer, ls, seed=config.seed)
    log(f"done: step {ls.step} in {time.time() - t_start:.1f}s; checkpoints in {trainer.mngr.directory}")
    return summary

"""The training state, the pure steps, and the one builder of both for a run config.

`train_step(state, batch, rng, frozen) -> (state, metrics)` and `eval_step(params, batch) -> metrics` are
pure and written over the model-family interface (llm_jax/models/family.py), so every family trains
with them. `build(config, vocab_size)` turns a run config into what every user of the step needs:
the checked config, the mesh, the model, the optimizer, the abstract state with its shardings, the
abstract global batch, and the jitted steps. The trainer (llm_jax/training/loop.py), the step
benchmark (llm_jax/tools/bench.py) and ahead-of-time compilation (llm_jax/tools/aot.py) all call it,
so they check, shard and compile the same program; only the trainer and the benchmark then make a
concrete state (`Built.create_state`; the trainer restores a checkpoint instead when there is one).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from llm_jax.data import lm_data as data_lib
from llm_jax.models import family as family_lib
from llm_jax.models import kernels, lora, preference
from llm_jax.models.model import ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import config as config_lib
from llm_jax.training import lora_base, optim


@flax.struct.dataclass
class TrainState:
    """What training changes and a checkpoint holds. A LoRA run's `params` are its adapters only
    (`lora.split`); the frozen base they apply to travels beside the state (`frozen`, {} otherwise)."""

    step: jax.Array  # scalar int32: number of updates applied
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------------------------
# Pure functions


def train_step(
    state: TrainState, batch: dict, base_rng: jax.Array, frozen: Any = None, *, model,
    tx: optax.GradientTransformation, grad_accum_steps: int = 1, objective: preference.Objective | None = None,
) -> tuple[TrainState, dict]:  # fmt: skip
    """One optimizer update on `batch` ([B, t] arrays), split into `grad_accum_steps` micro-batches.

    `frozen`: the parameters that take no update (a LoRA run's base: `state.params` are the
    adapters, and the model runs on `lora.combine(frozen, adapters)`); None or {} for full training.
    The gradient is taken with respect to `state.params` only.

    The loss is the mean over all tokens of the batch whatever the accumulation, so accumulating
    changes memory, not the result. The family's extra metrics (`ModelFamily.train_loss`: an MoE's
    aux_loss, router_z_loss, expert_load) are the micro-batches' mean. Dropout's key is derived
    from (base_rng, step): a resumed run draws the same masks.

    `objective`: a preference objective (`preference.Objective`: DPO, SimPO) instead of the
    family's loss; the loss is then the mean over the batch's pairs, whose two rows stay in one
    micro-batch, and its metrics (rewards, margin, accuracy) are returned beside it.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    if objective is None:
        # The family's objective (the loss plus any auxiliary losses); `total` is the loss alone.
        family_loss = family_lib.of(model).train_loss
        loss_fn = lambda m, trainable, b, r: family_loss(m, lora.combine(frozen or {}, trainable), b, r)  # noqa: E731
    else:
        loss_fn = lambda m, trainable, b, r: objective.train_loss(m, trainable, frozen or {}, b, r)  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    group = 1 if objective is None else objective.rows_per_example

    if grad_accum_steps == 1:
        (_, (total, count, extra)), grads = grad_fn(model, state.params, batch, rng)
    else:

        def split(x):
            # Strided split: micro-batch i takes rows i, i+k, ... so each keeps the batch's sharding
            # (a pair of rows: pairs i, i+k, ..., its rows side by side).
            if group == 1:
                x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)
            else:
                x = x.reshape(x.shape[0] // (grad_accum_steps * group), grad_accum_steps, group, *x.shape[1:])
                x = x.swapaxes(0, 1).reshape(grad_accum_steps, -1, *x.shape[3:])
            return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

        def body(carry, xs):
            acc_grads, acc_total, acc_count = carry
            mb, i = xs
            (_, (total, count, extra)), grads = grad_fn(model, state.params, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_total + total, acc_count + count), extra

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro = (jax.tree.map(split, batch), jnp.arange(grad_accum_steps))
        (grads, total, count), extras = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        extra = jax.tree.map(lambda x: jnp.mean(x, axis=0), extras)  # the micro-batches' mean

    with jax.named_scope("optimizer"):  # names the update's ops in profiles (experiments/profile_step.py)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": total / count, "grad_norm": grad_norm, **extra}


def eval_step(params, batch: dict, *, model, objective: preference.Objective | None = None) -> dict:
    """Summed loss and token count of one batch (sums, so that means over batches are exact); a
    preference objective's summed loss and metrics over the batch's pairs, and their count."""
    if objective is not None:
        return objective.eval_sums(model, params, batch)
    total, count = family_lib.of(model).loss_sum(model, params, batch, None, False)
    return {"loss_sum": total, "count": count}


def skip_nonfinite(step_fn: Callable) -> Callable:
    """Wraps a train step so that an update with a non-finite loss or gradient norm is dropped.

    Decided inside the jitted step (no host round trip): params and optimizer state stay as they
    were, the step counter still advances (the next step gets the next batch and dropout key), and
    metrics['skipped'] is 1.
    """

    def step(state, batch, rng, frozen):
        new_state, metrics = step_fn(state, batch, rng, frozen)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return kept.replace(step=new_state.step), {**metrics, "skipped": jnp.logical_not(ok).astype(jnp.int32)}

    return step


# ----------------------------------------------------------------------------------------------
# State (born sharded) and jitted steps


def init_state_fn(model, tx, seq_len: int) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState with boxed (LogicallyPartitioned) params; the boxes give the shardings."""

    def init(rng):
        params, _ = lora_base.trainable_and_frozen(family_lib.init_params(model, rng, seq_len), model.cfg)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_state(model, tx, mesh, rules, seq_len: int) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of the train state: nothing is
    computed; what checkpoint restores and ahead-of-time compilation need."""
    return _abstract(init_state_fn(model, tx, seq_len), mesh, rules)


def _abstract(init: Callable, mesh, rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.boxed_shardings(boxed, mesh, rules)
    return ckpt_lib.abstract_like(nn.meta.unbox(boxed), shardings), shardings


def create_sharded_state(model, tx, mesh, rules, rng, seq_len, shardings=None, init=None):
    """(state, state_shardings): the state is born sharded; the full model never sits on one device.
    `shardings`: the state's, where `abstract_state` gave them already (else traced here). `init`:
    another rng -> boxed tree than the train state's (`lora_base.init_frozen`)."""
    init = init or init_state_fn(model, tx, seq_len)
    if shardings is None:
        shardings = sharding.boxed_shardings(jax.eval_shape(init, rng), mesh, rules)
    with mesh, nn.logical_axis_rules(rules):  # init is traced outside use_mesh (see its docstring)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def make_steps(
    model, tx, mesh, rules, state_shardings, grad_accum_steps: int, on_nan: str = "stop", frozen_shardings=None,
    objective: preference.Objective | None = None,
):  # fmt: skip
    """Jitted (train_step, eval_step) with explicit shardings; the train step donates the state (not
    `frozen`, whose shardings are `frozen_shardings`: {} without LoRA). The eval step takes the
    model's whole parameters (`lora.combine(frozen, state.params)`).

    Each runs under `sharding.use_mesh`, so the activation constraints take effect; `.jitted` is the
    bare jitted function (for lowering ahead of time). on_nan='skip': see `skip_nonfinite`.
    """
    batch_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen_shardings = frozen_shardings or {}
    step_fn = functools.partial(train_step, model=model, tx=tx, grad_accum_steps=grad_accum_steps, objective=objective)
    if on_nan == "skip":
        step_fn = skip_nonfinite(step_fn)
    p_train = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sh, replicated, frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    p_eval = jax.jit(
        functools.partial(eval_step, model=model, objective=objective),
        in_shardings=(lora.combine(frozen_shardings, state_shardings.params), batch_sh),
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
# The builder: one run config -> checked config, mesh, model, abstract state and jitted steps


def check_batch(config, mesh, model_cfg) -> None:
    """BadValue unless the batch sizes and the model split over the mesh: both batches over
    data*fsdp*expert, the training batch into grad_accum_steps micro-batches that each do, and over the
    processes (each feeds its own rows)."""
    tc = config.train
    sharding.check_divisible(mesh, model_cfg, tc.batch_size, config.data.seq_len)
    sharding.check_divisible(mesh, model_cfg, tc.eval_batch_size)
    dp = sharding.data_parallel_size(mesh)
    if tc.batch_size % tc.grad_accum_steps or (tc.batch_size // tc.grad_accum_steps) % dp:
        raise BadValue(
            f"config.train.batch_size={tc.batch_size} must split into grad_accum_steps={tc.grad_accum_steps} "
            f"micro-batches that each divide over data*fsdp*expert={dp} devices"
        )
    if tc.batch_size % jax.process_count():
        raise BadValue(f"config.train.batch_size={tc.batch_size} must divide over {jax.process_count()} processes")
    if tc.objective != "lm":  # every micro-batch and every process's rows hold whole pairs
        pairs = math.lcm(2 * tc.grad_accum_steps, 2 * jax.process_count())
        for key, n in (("batch_size", pairs), ("eval_batch_size", 2 * jax.process_count())):
            if tc[key] % n:
                raise BadValue(
                    f"config.train.{key}={tc[key]} must be a multiple of {n}: objective={tc.objective!r} reads "
                    "pairs of rows, and each micro-batch and process needs whole pairs"
                )


def objective_of(config: ml_collections.ConfigDict) -> preference.Objective | None:
    """The preference objective of a (finalized) config, None for the family's own loss."""
    if config.train.objective == "lm":
        return None
    return preference.Objective(config.train.objective, config.pref.beta, config.pref.gamma)


def checked_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config checked (unknown keys, training values) and finalized; idempotent."""
    config_lib.check_keys(config)
    config_lib.check_values(config)  # before finalize fills in the derived values (0 = same as ...)
    return config_lib.finalize(config)


@dataclasses.dataclass(frozen=True)
class Built:
    """What `build` makes of a run config: everything fixed before a state exists."""

    config: ml_collections.ConfigDict  # checked and finalized
    mesh: jax.sharding.Mesh
    rules: Any  # logical axis rules
    model_cfg: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    state: TrainState  # ShapeDtypeStructs carrying their shardings (what restore and lowering take)
    state_shardings: TrainState
    batch: dict  # the global training batch: ShapeDtypeStructs [batch_size, seq_len] with the batch sharding
    p_train: Callable  # jitted (state, batch, rng, frozen) -> (state, metrics), donating the state (`make_steps`)
    p_eval: Callable  # jitted (params, batch) -> {'loss_sum', 'count'}
    frozen: Any  # the frozen base of a LoRA run as ShapeDtypeStructs with shardings; {} otherwise
    frozen_shardings: Any

    def create_state(self, rng: jax.Array) -> TrainState:
        """A fresh state, born sharded as `state_shardings` say."""
        seq_len = self.config.data.seq_len
        return create_sharded_state(self.model, self.tx, self.mesh, self.rules, rng, seq_len, self.state_shardings)[0]

    def create_frozen(self, rng: jax.Array) -> Any:
        """A random frozen base (benchmarks, tests; a run loads its base instead: `lora_base.load`)."""
        if not self.frozen:
            return {}
        init = lora_base.init_frozen(self.model, self.config.lora.base_dtype, self.config.data.seq_len)
        return create_sharded_state(
            self.model, self.tx, self.mesh, self.rules, rng, None, self.frozen_shardings, init
        )[0]  # fmt: skip


def build(config: ml_collections.ConfigDict, vocab_size: int, devices: Sequence | None = None) -> Built:
    """The run's checked config, mesh (over `devices`, default all), model for a tokenizer of
    `vocab_size`, abstract state and jitted steps; nothing is allocated or compiled.

    Raises a UserError for a config that cannot run: unknown keys or bad training values, a mesh
    the devices cannot take, a model or batch that does not split over it (`check_batch`).
    """
    config = checked_config(config)
    tc, seq_len = config.train, config.data.seq_len
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config)
    model_cfg = config_lib.model_config(config, vocab_size)
    check_batch(config, mesh, model_cfg)
    kernels.check_platform(model_cfg.attention, mesh.devices.flat[0].platform)
    model = family_lib.build(model_cfg)
    tx = optim.make_optimizer(config.optim)
    state, state_sh = abstract_state(model, tx, mesh, rules, seq_len)
    frozen, frozen_sh = _abstract(lora_base.init_frozen(model, config.lora.base_dtype, seq_len), mesh, rules)
    p_train, p_eval = make_steps(
        model, tx, mesh, rules, state_sh, tc.grad_accum_steps, tc.on_nan, frozen_sh, objective_of(config)
    )  # fmt: skip
    # The keys the configured data yields (weights, packing) decide the program: a jsonl run's step
    # reads weights that a plain text run's does not.
    spec = family_lib.get(model_cfg.family).batch_spec(
        model_cfg, tc.batch_size, seq_len, **data_lib.batch_options(config.data)
    )
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in spec.items()}
    return Built(config, mesh, rules, model_cfg, model, tx, state, state_sh, batch, p_train, p_eval, frozen, frozen_sh)

"""Reliability: a run killed at any point (even mid-save) and restarted equals the uninterrupted run
bit for bit, taking over the lock the killed run held; SIGTERM saves and exits 0; a corrupt latest
checkpoint falls back to the previous one; checkpoints restore onto other mesh shapes and device
counts; NaN/Inf losses stop or skip; a diverged state is never saved."""

import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import leafcheck
import ml_collections
import numpy as np
import pytest
import runlib as R

from llm_jax.data import lm_data as data_lib
from llm_jax.models import family as family_lib
from llm_jax.models.model import TransformerLM
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import Diverged, Unavailable
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import config as config_lib
from llm_jax.training import loop, optim
from llm_jax.training import state as state_lib
from llm_jax.training.saved_run import load_run

N_STEPS = 20
EVERY = 5  # checkpoints at 5, 10, 15, 20
DEVICES = 2  # kill tests: a 2-device data-parallel mesh (fewer shards, faster saves than 8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return R.write_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus.txt"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """(workdir, overrides) of an uninterrupted 20-step run on a 2-device data-parallel mesh."""
    over = R.tiny_overrides(corpus, N_STEPS, EVERY)
    ref = str(tmp_path_factory.mktemp("finished") / "ref")
    R.finish(R.start(ref, over, devices=DEVICES))
    assert R.logged_steps(ref) == list(range(1, N_STEPS + 1))
    return ref, over


@pytest.mark.slow
def test_killed_anywhere_resumes_exactly(tmp_path, finished_run, capsys):
    ref, over = finished_run
    ref_losses = R.losses_list(ref)

    wd = str(tmp_path / "chaos")
    kill_points, killed = [], []

    def restart():
        if killed and killed[-1]:  # kill -9 left the dead run's record in the lock file (its process is gone)
            assert R.lock_record(wd)["pid"] == killed[-1]
        p = R.start(wd, over, devices=DEVICES)
        p.after = killed[-1] if killed else None
        return p

    def took_over(p, out=None):
        """The restarted run `p` took over the lock of the run killed before it started."""
        text = f"took over the lock of {wd} from a run that ended without releasing it: pid {p.after} on"
        return text in (R.output(p) if out is None else out)

    def kill_mid_save(p, step):
        """SIGKILL while checkpoints/<step> is still being written (its tmp directory exists)."""
        tmp_name = f"{step}.orbax-checkpoint-tmp"
        R.wait_until(p, lambda: tmp_name in R.tmp_checkpoints(wd))
        R.freeze(p)  # SIGSTOP: every thread stops where it is; then check the save is still unfinished
        assert tmp_name in R.tmp_checkpoints(wd) and step not in R.finished_steps(wd), "save finished before the kill"
        R.kill_hard(p)
        killed.append(p.pid)
        kill_points.append(f"SIGKILL during the async save of step {step} ({where()})")

    def where():
        return f"last logged step {R.last_logged_step(wd)}, checkpoints {R.finished_steps(wd)}"

    def kill_between_saves(p, after):
        R.wait_until(p, lambda: R.last_logged_step(wd) >= after + 2 and after in R.finished_steps(wd))
        R.freeze(p)
        kill_points.append(f"SIGKILL between saves ({where()}, saving {R.tmp_checkpoints(wd) or 'nothing'})")
        R.kill_hard(p)
        killed.append(p.pid)

    def latest():
        return max(R.finished_steps(wd), default=0)

    def resumed_from(out, step):
        return f"checkpoints/{step} (step {step})" in out if step else "resumed" not in out

    # 1. Killed while the first checkpoint is being written.
    p = restart()
    kill_mid_save(p, EVERY)
    # 2. Restarted from scratch (the unfinished save is never used); killed between two saves.
    expect, p = latest(), restart()
    kill_between_saves(p, expect + EVERY)
    assert expect == 0 and resumed_from(R.output(p), expect), R.output(p)[-2000:]
    assert took_over(p), R.output(p)[-2000:]
    # 3. Resumed from the last checkpoint; killed while the next one is being written.
    expect, p = latest(), restart()
    kill_mid_save(p, expect + EVERY)
    assert resumed_from(R.output(p), expect) and took_over(p), R.output(p)[-2000:]
    # 4. Resumed; killed between saves; then a file of the newest checkpoint is damaged.
    expect, p = latest(), restart()
    kill_between_saves(p, expect + EVERY)
    assert resumed_from(R.output(p), expect) and took_over(p), R.output(p)[-2000:]
    *_, good, bad = R.finished_steps(wd)
    R.corrupt_one_file(os.path.join(R.ckpt_root(wd), str(bad)))
    # 5. Restart: warns naming the damaged checkpoint, moves it aside, resumes from the one before.
    #    SIGTERM mid-way: the current step finishes, is saved, and the process exits 0 (no step lost).
    p = restart()
    R.wait_until(p, lambda: "setup took" in R.output(p) and R.last_logged_step(wd) >= good + 2)
    R.freeze(p)
    p.send_signal(signal.SIGTERM)
    seen = R.last_logged_step(wd)
    R.thaw(p)
    out = R.finish(p)
    kill_points.append(f"SIGTERM after step {seen}, saved step {R.finished_steps(wd)[-1]}")
    assert re.search(rf"WARNING: checkpoint \S*checkpoints/{bad} is corrupt or incomplete", out), out[-3000:]
    assert took_over(p, out) and R.lock_record(wd) is None, "SIGTERM: a clean exit releases the lock"
    killed.append(None)
    assert f"checkpoints/{good} (step {good})" in out
    assert os.path.isdir(os.path.join(wd, ckpt_lib.CORRUPT_DIR, str(bad))), "the bad checkpoint is kept aside"
    saved = R.finished_steps(wd)[-1]
    assert "preempted" in out and saved == R.last_logged_step(wd) and seen <= saved < N_STEPS, (
        seen,
        saved,
        out[-2000:],
    )
    # 6. The last start finishes the run.
    out = R.finish(restart())
    assert f"checkpoints/{saved} (step {saved})" in out

    losses = R.losses_list(wd)
    assert losses == ref_losses, "every logged loss equals the uninterrupted run's (each step logged once)"
    assert R.metric(wd, "eval/loss") == R.metric(ref, "eval/loss")
    R.assert_bitwise_equal(R.read_state(wd, N_STEPS), R.read_state(ref, N_STEPS))
    # The loop state too: the running mean of the loss that divergence checks use went on exactly.
    assert R.read_loop_data(wd, N_STEPS) == R.read_loop_data(ref, N_STEPS)
    assert R.read_loop_data(wd, N_STEPS)["loss_mean"] > 0
    assert len(kill_points) == 5

    with capsys.disabled():
        print(f"\n{len(kill_points)} interruptions, each resumed exactly:\n  " + "\n  ".join(kill_points))


@pytest.mark.slow
def test_finished_run_continues_on_another_mesh(tmp_path, finished_run, capsys):
    """The finished 2-device data-parallel run continues on 8 devices as data=1 x fsdp=4 x tensor=2
    (in this process) straight from its checkpoint, no conversion step, and its next step equals
    the same continuation on the 2-device layout it was trained on: the loss, and every weight and
    optimizer moment to 1e-5 of its leaf. The continuation's lr (0.5, constant) moves every weight
    by far more than that; eps 1e-2 keeps AdamW from magnifying the meshes' float noise."""
    ref, over = finished_run
    more = {**over, "train.num_steps": N_STEPS + 1, "optim.schedule": "constant", "optim.lr": 0.5, "optim.eps": 1e-2}
    on_8, on_2 = str(tmp_path / "on_8"), str(tmp_path / "on_2")
    shutil.copytree(ref, on_8)
    shutil.copytree(ref, on_2)
    R.finish(R.start(on_2, more, devices=DEVICES))
    os.environ.setdefault("LLM_JAX_CPU_PEAK_FLOPS", "1e11")
    last = loop.train_and_evaluate(R.tiny_config({**more, "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), on_8)
    out = capsys.readouterr().out
    assert f"checkpoints/{N_STEPS} (step {N_STEPS})" in out and f"training steps {N_STEPS}..{N_STEPS + 1}" in out
    assert "over 8 cpu devices" in out and last["step"] == N_STEPS + 1
    assert R.logged_steps(on_8) == R.logged_steps(on_2) == list(range(1, N_STEPS + 2))
    assert R.losses_list(on_8)[-1][1] == pytest.approx(R.losses_list(on_2)[-1][1], rel=1e-6)
    read = lambda workdir, step: leafcheck.state_parts(R.read_state(workdir, step))
    before, got, want = read(ref, N_STEPS), read(on_8, N_STEPS + 1), read(on_2, N_STEPS + 1)
    no_grad = ("['key']['bias']",)  # no gradient in exact arithmetic (tests/leafcheck.py)
    leafcheck.assert_moved(before["params"], want["params"], frozen=no_grad, what="2-device step")
    for part in got:
        leafcheck.assert_close(got[part], want[part], noise=no_grad, what=part)
    assert int(got["rest"]["['step']"]) == N_STEPS + 1


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints (in-process, a small pytree)


# orbax leaves the failed read of the other array as an un-awaited error: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage",
    [
        "delete_largest_file",
        "truncate_largest_file",
        "truncate_tree_metadata",
        "delete_state_dir",
        "truncate_loop_state",
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, damage):
    state = {"w": jnp.arange(65536.0).reshape(256, 256), "b": jnp.ones((8,), jnp.int32)}
    mngr = ckpt_lib.manager(str(tmp_path), 5, async_save=False)
    for step in (1, 2, 3):
        ckpt_lib.save(mngr, step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step})
    mngr.close()
    latest = os.path.join(R.ckpt_root(str(tmp_path)), "3")
    largest = max(
        (os.path.join(r, f) for r, _, fs in os.walk(os.path.join(latest, "state")) for f in fs), key=os.path.getsize
    )  # the array data
    if damage == "delete_largest_file":
        os.remove(largest)
    elif damage == "truncate_largest_file":
        open(largest, "r+b").truncate(os.path.getsize(largest) // 2)
    elif damage == "truncate_tree_metadata":
        open(os.path.join(latest, "state", "_METADATA"), "r+b").truncate(10)
    elif damage == "delete_state_dir":
        import shutil

        shutil.rmtree(os.path.join(latest, "state"))
    else:
        open(os.path.join(latest, "data", "metadata"), "r+b").truncate(3)

    logs = []
    reader = ckpt_lib.manager(str(tmp_path), 5, read_only=True)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        state,
    )
    step, restored, data_state, bad = ckpt_lib.restore_latest(reader, abstract, log=logs.append)
    reader.close()
    assert (step, data_state, bad) == (2, {"step": 2}, [3])
    assert np.array_equal(restored["w"], np.asarray(state["w"]) * 2)
    assert len(logs) == 1 and re.search(r"WARNING: checkpoint \S*/checkpoints/3 is corrupt or incomplete", logs[0])
    ckpt_lib.move_aside(str(tmp_path), bad, log=logs.append)
    assert R.finished_steps(str(tmp_path)) == [1, 2]
    assert os.path.isdir(os.path.join(str(tmp_path), ckpt_lib.CORRUPT_DIR, "3")), "moved aside, not deleted"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    mngr = ckpt_lib.manager(str(tmp_path), 5, async_save=False)
    ckpt_lib.save(mngr, 1, {"w": jnp.ones((4,))}, {"step": 1})
    mngr.close()
    os.remove(os.path.join(R.ckpt_root(str(tmp_path)), "1", "state", "_METADATA"))
    reader = ckpt_lib.manager(str(tmp_path), 5, read_only=True)
    abstract = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    }
    with pytest.raises(Unavailable, match=r"no checkpoint in \S+ can be restored: step 1: "):
        ckpt_lib.restore_latest(reader, abstract, log=lambda m: None)


# ----------------------------------------------------------------------------------------------
# Mesh shape / device count changes


def _tiny_model_and_tx():
    c = config_lib.finalize(_tiny_config())
    model = TransformerLM(config_lib.model_config(c, 257))
    return c, model, optim.make_optimizer(c.optim)


def _tiny_config():
    return R.tiny_config()


def _mesh(data, fsdp, tensor, n):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), jax.devices()[:n])


def _abstract(model, tx, mesh, rules, seq_len):
    import flax.linen as nn

    boxed = jax.eval_shape(state_lib.init_state_fn(model, tx, seq_len), jax.random.key(0))
    shardings = sharding.boxed_shardings(boxed, mesh, rules)
    return ckpt_lib.abstract_like(nn.meta.unbox(boxed), shardings), shardings


def test_restore_onto_other_mesh_and_device_count(tmp_path):
    c, model, tx = _tiny_model_and_tx()
    rules = sharding.logical_rules(c)
    seq = c.data.seq_len
    mesh_a = _mesh(2, 4, 1, 8)  # saved on 8 devices as data=2 x fsdp=4
    state, sh_a = state_lib.create_sharded_state(model, tx, mesh_a, rules, jax.random.key(0), seq)
    # Non-trivial optimizer moments too (zeros would compare equal whatever happened).
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, state.opt_state))
    mngr = ckpt_lib.manager(str(tmp_path), 3)
    ckpt_lib.save(mngr, 7, state, {"step": 7})
    mngr.wait_until_finished()
    want = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}

    for shape, n in (((1, 8, 1), 8), ((2, 1, 2), 4), ((1, 2, 2), 4), ((1, 1, 1), 1)):
        mesh = _mesh(*shape, n)
        abstract, shardings = _abstract(model, tx, mesh, rules, seq)
        step, restored, data_state, bad = ckpt_lib.restore_latest(mngr, abstract)
        assert (step, data_state, bad) == (7, {"step": 7}, [])
        got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
        for k, v in got.items():
            assert v.sharding.mesh.devices.size == n and v.sharding.mesh.shape == mesh.shape, k
        R.assert_bitwise_equal({k: np.asarray(v) for k, v in got.items()}, want)
        # and the restored state is usable for a step on the new mesh
        params_sh = jax.tree.map(lambda x: x.sharding, restored.params)
        assert jax.tree.structure(params_sh) == jax.tree.structure(shardings.params)
    mngr.close()


# ----------------------------------------------------------------------------------------------
# Numerical guards (in-process: a train step poisoned at one step)


def _poison(monkeypatch, at_step):
    orig = state_lib.train_step

    def poisoned(state, batch, rng, frozen, **kw):
        new, metrics = orig(state, batch, rng, frozen, **kw)
        bad = state.step == at_step - 1  # the update that produces step `at_step`
        new = new.replace(params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params))
        return new, {**metrics, "loss": jnp.where(bad, jnp.inf, metrics["loss"])}

    monkeypatch.setattr(state_lib, "train_step", poisoned)


def _inprocess_config(corpus, **train_over):
    c = R.tiny_config({"data.source": "text", "data.path": corpus})
    c.train.update(num_steps=6, log_every=5, eval_every=6, eval_steps=1, sample_tokens=0, checkpoint_every=2)
    c.train.update(**train_over)
    return c


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    _poison(monkeypatch, at_step=3)
    wd = str(tmp_path / "run")
    # Step 4 was due to be saved but its state descends from the bad step 3: never saved.
    last_good = r"at step 3; step 4 was not saved\. The last good checkpoint is step 2 .* to resume from step 2"
    with pytest.raises(Diverged, match=r"training diverged: the training loss is inf .*" + last_good):
        loop.train_and_evaluate(_inprocess_config(corpus), wd)
    assert R.finished_steps(wd) == [2] and not R.tmp_checkpoints(wd)
    assert all(np.isfinite(v).all() for v in R.read_state(wd, 2).values())


@pytest.mark.slow
def test_nan_loss_skip_drops_that_update(tmp_path, corpus, monkeypatch, capsys):
    _poison(monkeypatch, at_step=3)
    wd = str(tmp_path / "run")
    last = loop.train_and_evaluate(
        _inprocess_config(corpus, on_nan="skip", checkpoint_every=1, keep_checkpoints=10), wd
    )
    assert last["step"] == 6 and last["train/skipped_steps"] == 1 and np.isfinite(last["train/loss"])
    assert "skipped: loss inf" in capsys.readouterr().out
    s2, s3 = R.read_state(wd, 2), R.read_state(wd, 3)
    assert int(s3["['step']"]) == 3  # the step advanced (next batch, next dropout key) ...
    R.assert_bitwise_equal(
        {k: v for k, v in s3.items() if k != "['step']"}, {k: v for k, v in s2.items() if k != "['step']"}
    )  # ... but nothing else changed
    assert all(np.isfinite(v).all() for v in R.read_state(wd, 6).values())


# ----------------------------------------------------------------------------------------------
# Divergence: a checkpoint is written only from a sane state


def test_running_mean_leaves_spikes_out():
    mean = None
    for loss in (5.0, 5.0, 4.0):
        mean = loop.updated_mean(mean, loss, 10.0)
    assert 4.0 < mean < 5.0
    assert loop.is_spike(60.0, mean, 10.0) and not loop.is_spike(40.0, mean, 10.0)
    assert loop.updated_mean(mean, 1e10, 10.0) == mean, "a spike does not move the mean"
    assert loop.updated_mean(mean, float("nan"), 10.0) == mean
    assert not loop.is_spike(0.5, 0.01, 10.0), "near zero, 50x is noise (less than 1 above the mean)"
    assert not loop.is_spike(1e10, mean, 0.0) and not loop.is_spike(1e10, None, 10.0)


def _loss_of(run, corpus) -> float:
    """Mean loss of a restored run's params on the first validation batch of `corpus`."""
    data = data_lib.load_data(run.config.data, tokenizer_dir=os.path.join(run.workdir, "tokenizer"), log=lambda m: None)
    batch = data.eval_batches(1, 8, run.config.data.seq_len, 0)[0]
    fn = jax.jit(lambda p, b: family_lib.of(run.model).loss_sum(run.model, p, b, None, True))
    with run.use_mesh():
        total, count = fn(run.params, batch)
    return float(total) / float(count)


@pytest.mark.slow
def test_lr_1e6_stops_before_saving_and_the_kept_checkpoint_is_good(tmp_path, corpus):
    """The warmup's first update has lr 0 (a good step 1); the second explodes the parameters while
    the step's own loss, of the parameters before it, still looks fine: only the loss of the state
    to save shows it. Nothing after step 1 is saved, and step 1 really is as good as the start."""
    wd = str(tmp_path / "run")
    c = _inprocess_config(corpus, num_steps=10, checkpoint_every=1, keep_checkpoints=10, log_every=1)
    c.optim.update(lr=1e6, warmup_steps=2)
    with pytest.raises(Diverged) as e:
        loop.train_and_evaluate(c, wd)
    message = str(e.value)
    assert re.match(
        r"training diverged: the loss of the parameters at step 2 is \S+, more than "
        r"config\.train\.spike_factor=10 times the running mean of the training loss \(5\.\d+\); "
        r"step 2 was not saved\. The last good checkpoint is step 1 in \S+/checkpoints: run the same "
        r"command with a lower learning rate \(e\.g\. --config\.optim\.lr=100000;",
        message,
    ), message
    assert "raise config.train.spike_factor (0 turns the check off)" in message
    assert R.finished_steps(wd) == [1] and not R.tmp_checkpoints(wd)
    params = {k: v for k, v in R.read_state(wd, 1).items() if "params" in k}
    assert all(np.isfinite(v).all() and np.abs(v).max() <= 1.0 for v in params.values()), "not exploded"
    (_, first_loss), *_ = R.losses_list(wd)
    assert abs(_loss_of(load_run(wd, step=1), corpus) - first_loss) < 0.05 * first_loss
    # Without the check (spike_factor=0) the exploded state is saved: what the check prevents.
    c.train.spike_factor = 0.0
    with pytest.raises(Diverged, match="the training loss is"):
        loop.train_and_evaluate(c, str(tmp_path / "unchecked"))
    last = max(R.finished_steps(str(tmp_path / "unchecked")))
    assert last >= 2 and max(np.abs(v).max() for v in R.read_state(str(tmp_path / "unchecked"), last).values()) > 1e3


@pytest.mark.slow
def test_diverged_run_resumes_from_the_named_checkpoint_with_a_lower_lr(tmp_path, corpus):
    wd = str(tmp_path / "run")
    loop.train_and_evaluate(_inprocess_config(corpus, num_steps=4, checkpoint_every=2), wd)
    good = R.read_state(wd, 4)
    c = _inprocess_config(corpus, num_steps=10, checkpoint_every=2)
    c.optim.lr = 1e6
    with pytest.raises(
        Diverged, match=r"step 6 was not saved\. The last good checkpoint is step 4 .* to resume from step 4"
    ):
        loop.train_and_evaluate(c, wd)
    assert R.finished_steps(wd) == [2, 4]
    R.assert_bitwise_equal(R.read_state(wd, 4), good)
    c.optim.lr = 1e-3  # what the message says: the same command with a lower learning rate
    assert loop.train_and_evaluate(c, wd)["step"] == 10
    assert R.logged_steps(wd) == [4, 5, 10], "step 5 of the diverged attempt is logged once, by the resumed run"

"""Checkpoint save -> restore equal to the bit, onto the same and onto other mesh shapes."""

import json
import math
import os
from types import SimpleNamespace

import flax.linen as nn
import jax
import leafcheck
import numpy as np
import pytest

from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime import sharding
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import optim
from llm_jax.training import state as state_lib
from llm_jax.training.config import base_config

SEQ = 16
CFG = ModelConfig(
    vocab_size=128, num_layers=2, num_heads=8, embed_dim=32, mlp_dim=64, max_len=SEQ, tie_embeddings=False
)


def mesh_of(shape):
    return sharding.make_mesh(
        SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices()[: math.prod(shape)]
    )


def state_shardings(mesh):
    abstract = jax.eval_shape(
        state_lib.init_state_fn(TransformerLM(CFG), optim.make_optimizer(base_config().optim), SEQ), jax.random.key(0)
    )
    return abstract, sharding.boxed_shardings(abstract, mesh, sharding.LOGICAL_RULES)


def random_state(mesh, seed=0):
    """A train state whose every leaf is random (no zeros or ones that could restore by accident),
    placed with the run's shardings on `mesh`. AdamW's second moments are |normal| (a variance is
    never negative), so a training step from this state is finite."""
    abstract, shardings = state_shardings(mesh)
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if np.issubdtype(x.dtype, np.integer):
            return rng.integers(1, 10_000, x.shape).astype(x.dtype)
        value = rng.standard_normal(x.shape).astype(x.dtype)
        return np.abs(value) if ".nu" in jax.tree_util.keystr(path) else value

    values = jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract))
    return jax.device_put(values, shardings), shardings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a random state at step 7, saved from an FSDP+tensor mesh 1x4x2."""
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    state, shardings = random_state(mesh_of((1, 4, 2)))
    mngr = ckpt_lib.manager(workdir, keep=3)
    ckpt_lib.save(mngr, 7, state, {"step": 7, "note": "hello"})
    mngr.wait_until_finished()
    mngr.close()
    return workdir, jax.device_get(state), shardings


def assert_bit_equal(restored, expected):
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_r = jax.tree.leaves(restored)
    assert len(flat_r) == len(flat_e)
    for (path, e), r in zip(flat_e, flat_r):
        r = np.asarray(r)
        assert r.dtype == e.dtype and r.shape == e.shape, jax.tree_util.keystr(path)
        # Compare the raw bytes: equal to the bit (also NaN payloads and -0.0).
        assert r.tobytes() == np.asarray(e).tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize(
    "shape", [(1, 4, 2), (8, 1, 1), (1, 1, 8), (2, 2, 2), (1, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_restore_is_bit_exact_on_any_mesh(saved, shape):
    workdir, expected, _ = saved
    mesh = mesh_of(shape)
    _, shardings = state_shardings(mesh)
    mngr = ckpt_lib.manager(workdir, keep=3)
    assert mngr.latest_step() == 7
    restored, data_state = ckpt_lib.restore(mngr, 7, ckpt_lib.abstract_like(expected, shardings))
    mngr.close()
    assert data_state == {"step": 7, "note": "hello"}
    assert_bit_equal(restored, expected)
    # Every array lands directly in the shardings asked for, on this mesh.
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding.mesh == mesh and x.sharding.spec == s.spec
    emb = restored.params["embed"]["embedding"]  # [vocab 128, embed 32]: vocab over tensor, embed over fsdp
    expect = (128 // mesh.shape["tensor"], 32 // mesh.shape["fsdp"])
    assert {sh.data.shape for sh in emb.addressable_shards} == {expect}


def train_one_step(state, mesh):
    """(new state, loss) of one step of the trainer's jitted step (`state.make_steps`) on `mesh`,
    at a constant lr 0.1 (the random step counter is past any warm-up) so the weights move by far
    more than the comparison's tolerance; eps 1e-2 keeps AdamW from magnifying float noise."""
    c = base_config().optim
    c.update(lr=0.1, schedule="constant", warmup_steps=0, eps=1e-2)
    tx = optim.make_optimizer(c)
    _, shardings = state_shardings(mesh)
    p_train, _ = state_lib.make_steps(TransformerLM(CFG), tx, mesh, sharding.LOGICAL_RULES, shardings, 1)
    tok = np.random.default_rng(3).integers(0, CFG.vocab_size, (8, SEQ + 1)).astype(np.int32)
    batch = sharding.host_to_global({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
    new, metrics = p_train(jax.device_put(state, shardings), batch, jax.random.key(1), {})
    return jax.device_get(new), float(metrics["loss"])


def test_restored_state_trains_like_the_original(saved):
    """A state restored onto another mesh (2x1x4) takes a training step to the same loss, new
    weights and optimizer moments (each leaf to 1e-5 of its largest value) as the original state
    on the mesh it was saved from (1x4x2); the step moved every weight by far more than that."""
    workdir, expected, saved_shardings = saved
    mesh = mesh_of((2, 1, 4))
    _, shardings = state_shardings(mesh)
    mngr = ckpt_lib.manager(workdir, keep=3)
    restored, _ = ckpt_lib.restore(mngr, 7, ckpt_lib.abstract_like(expected, shardings))
    mngr.close()
    assert isinstance(restored, state_lib.TrainState)
    original, loss = train_one_step(jax.device_put(expected, saved_shardings), mesh_of((1, 4, 2)))
    trained, restored_loss = train_one_step(restored, mesh)
    assert restored_loss == pytest.approx(loss, rel=1e-6)
    assert int(trained.step) == int(expected.step) + 1
    leafcheck.assert_moved(expected.params, original.params, what="original step")
    leafcheck.assert_close(trained.params, original.params, what="params")
    leafcheck.assert_close(trained.opt_state, original.opt_state, what="optimizer state")


def test_layout_keep_last_n_and_latest(tmp_path):
    state, _ = random_state(mesh_of((8, 1, 1)), seed=1)
    mngr = ckpt_lib.manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt_lib.save(mngr, step, state, {"step": step})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3
    mngr.close()
    # workdir/checkpoints/<step>/, complete (no temporary directories left behind)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    # A new manager on the same directory sees the same steps (what a resumed run does).
    mngr = ckpt_lib.manager(str(tmp_path), keep=2)
    assert mngr.latest_step() == 3
    _, data = ckpt_lib.restore(
        mngr, 2, ckpt_lib.abstract_like(jax.device_get(state), state_shardings(mesh_of((8, 1, 1)))[1])
    )
    assert data == {"step": 2}
    mngr.close()


def test_empty_workdir_has_no_checkpoint(tmp_path):
    mngr = ckpt_lib.manager(str(tmp_path), keep=2)
    assert mngr.latest_step() is None and mngr.all_steps() == []
    mngr.close()


# ----------------------------------------------------------------------------------------------
# Which read errors mean "damaged, fall back to an older checkpoint" and which surface


def orbax_wrapped(inner: BaseException) -> Exception:
    """The bare Exception orbax raises around TensorStore's error when an array read fails."""
    outer = Exception("Encountered error while reading array index: (slice(0, 256, 1),).")
    outer.__cause__ = inner
    return outer


DAMAGE = [  # what truncating or deleting each file of a saved checkpoint raised (orbax 0.11, TensorStore)
    json.JSONDecodeError("Unterminated string starting at", '{"a', 1),
    FileNotFoundError("File /ck/3/data/metadata not found."),
    ValueError('NOT_FOUND: Error opening "zarr" driver: Error reading "b/.zarray" in OCDBT database'),
    ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading "b/.zarray" in OCDBT database'),
    orbax_wrapped(ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database: Requested byte range')),
    orbax_wrapped(ValueError('FAILED_PRECONDITION: Error reading "w/0.0": Truncated Zstd-compressed stream')),
]
NOT_DAMAGE = [  # a permission, a transient I/O error, a bug: the same read may work once fixed
    PermissionError(13, "Permission denied", "/ck/3/state/_METADATA"),
    OSError(5, "Input/output error"),
    orbax_wrapped(ValueError('PERMISSION_DENIED: Error reading "w/0.0" in OCDBT database')),
    orbax_wrapped(ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database')),
    TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'"),
    KeyError("params"),
    ValueError("a bug's own message"),
]


@pytest.mark.parametrize("error", DAMAGE, ids=lambda e: repr(e)[:40])
def test_damage_errors_are_damage(error):
    assert ckpt_lib.is_damage(error)


@pytest.mark.parametrize("error", NOT_DAMAGE, ids=lambda e: repr(e)[:40])
def test_other_errors_are_not_damage(error):
    assert not ckpt_lib.is_damage(error)


def _reader_of_two_checkpoints(tmp_path):
    state = {"w": np.arange(8.0, dtype=np.float32)}
    mngr = ckpt_lib.manager(str(tmp_path), 5, async_save=False)
    for step in (1, 2):
        ckpt_lib.save(mngr, step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step})
    mngr.close()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    return ckpt_lib.manager(str(tmp_path), 5, read_only=True), abstract


@pytest.mark.parametrize("stage", ["metadata", "arrays"])
@pytest.mark.parametrize("error", NOT_DAMAGE[:5], ids=lambda e: repr(e)[:40])
def test_restore_latest_raises_a_read_error_that_is_not_damage(tmp_path, monkeypatch, stage, error):
    reader, abstract = _reader_of_two_checkpoints(tmp_path)

    def fail(*args, **kwargs):
        raise error

    if stage == "metadata":
        monkeypatch.setattr(reader, "item_metadata", fail)
    else:
        monkeypatch.setattr(ckpt_lib, "restore", fail)
    logs = []
    with pytest.raises(type(error)) as raised:
        ckpt_lib.restore_latest(reader, abstract, log=logs.append)
    reader.close()
    assert raised.value is error and logs == [], "not skipped as corrupt: checkpoint 2 is intact"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize("stage", ["metadata", "arrays"])
def test_restore_latest_skips_a_damaged_read(tmp_path, monkeypatch, stage):
    reader, abstract = _reader_of_two_checkpoints(tmp_path)
    damaged, real_meta, real_restore = DAMAGE[-1], reader.item_metadata, ckpt_lib.restore

    def item_metadata(step):
        if step == 2:
            raise damaged
        return real_meta(step)

    def restore(mngr, step, abstract_state):
        if step == 2:
            raise damaged
        return real_restore(mngr, step, abstract_state)

    if stage == "metadata":
        monkeypatch.setattr(reader, "item_metadata", item_metadata)
    else:
        monkeypatch.setattr(ckpt_lib, "restore", restore)
    logs = []
    step, restored, data_state, bad = ckpt_lib.restore_latest(reader, abstract, log=logs.append)
    reader.close()
    assert (step, data_state, bad) == (1, {"step": 1}, [2])
    assert np.array_equal(restored["w"], np.arange(8.0))
    assert len(logs) == 1 and "FAILED_PRECONDITION" in logs[0] and "corrupt or incomplete" in logs[0]

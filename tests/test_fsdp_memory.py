"""FSDP really shards the training state: per-device parameter + optimizer bytes at fsdp=8 are at
most 1/6 of the replicated (data=8) case, by the arrays' own shards and by XLA's memory analysis
of the compiled train step."""

import jax
import numpy as np
import pytest

from llm_jax.models.model import TransformerLM
from llm_jax.runtime import sharding
from llm_jax.tools.bench import compiled_memory
from llm_jax.training import config as config_lib
from llm_jax.training import optim
from llm_jax.training import state as state_lib


def _state_bytes_per_device(mesh_shape):
    config = config_lib.base_config()
    config.model.update(vocab_size=1024, num_layers=2, num_heads=4, embed_dim=128, mlp_dim=512, max_len=32)
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.mesh.update(**mesh_shape)
    config = config_lib.finalize(config)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config)
    model = TransformerLM(config_lib.model_config(config, 1024))
    tx = optim.make_optimizer(config.optim)
    state, sh = state_lib.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), 32)
    dev = jax.devices()[0]
    shard_bytes = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == dev)
    full_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    p_train, _ = state_lib.make_steps(model, tx, mesh, rules, sh, 1)
    tok = np.zeros((8, 32), np.int32)
    batch = sharding.host_to_global({"inputs": tok, "targets": tok}, mesh)
    with sharding.use_mesh(mesh, rules):
        compiled = p_train.jitted.lower(state, batch, jax.random.key(0), {}).compile()
    batch_bytes = 2 * tok.nbytes // sharding.data_parallel_size(mesh)  # this device's rows of inputs + targets
    analysed = compiled_memory(compiled)["argument_bytes"] - batch_bytes
    return shard_bytes, analysed, full_bytes


def test_fsdp8_state_is_at_most_a_sixth_of_replicated():
    assert jax.device_count() >= 8, "needs the 8-device CPU mesh of tests/conftest.py"
    rep_shards, rep_analysed, full = _state_bytes_per_device({"data": 8, "fsdp": 1, "tensor": 1})
    fsdp_shards, fsdp_analysed, full2 = _state_bytes_per_device({"data": 1, "fsdp": 8, "tensor": 1})
    assert full == full2 and rep_shards == full  # replicated: every device holds the whole state
    assert fsdp_shards <= rep_shards / 6, (fsdp_shards, rep_shards)
    # XLA's view of the compiled step's per-device arguments (state + a key) agrees.
    assert rep_analysed == pytest.approx(rep_shards, rel=0.01)
    assert fsdp_analysed <= rep_analysed / 6, (fsdp_analysed, rep_analysed)
    print(
        f"per-device state bytes: replicated {rep_shards:,}, fsdp=8 {fsdp_shards:,} "
        f"(ratio {fsdp_shards / rep_shards:.3f}); compiled arguments {rep_analysed:,} vs {fsdp_analysed:,}"
    )

"""Ahead-of-time compilation for TPU topologies (llm_jax.aot, llm_jax.tools.hlo).

The TPU compiler runs in this process next to conftest's 8 emulated CPU devices: libtpu describes
TPU chips through `jax.experimental.topologies` whatever JAX's default platform is, so
JAX_PLATFORMS=cpu does not hide it. Without libtpu these tests skip, except where
LLM_JAX_REQUIRE_LIBTPU is set (CI), where they fail instead. Every compile here is of a tiny model.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from llm_jax.runtime import sharding
from llm_jax.tools import aot, hlo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("LLM_JAX_REQUIRE_LIBTPU"),
    reason="TPU ahead-of-time compilation needs libtpu: pip install -e '.[tpu]'",
)


def _config(name: str, arg: str, overrides: dict | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return aot.with_overrides(module.get_config(arg), overrides or {})


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-m", "llm_jax.aot", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# Topology names (no libtpu needed)


@pytest.mark.parametrize(
    "name, slices, libtpu_name, chips, host",
    [
        ("v5p-8", 1, "v5p:2x2x1", 4, (2, 2, 1)),  # v5p counts TensorCores: 8 cores = 4 chips
        ("v5p-64", 1, "v5p:2x4x4", 32, (2, 2, 1)),
        ("v4-8", 1, "v4:2x2x1", 4, (2, 2, 1)),
        ("v5e-8", 1, "v5e:2x4", 8, (2, 4, 1)),  # one host holds all 8 chips
        ("v5litepod-16", 1, "v5e:4x4", 16, (2, 2, 1)),
        ("v6e-1", 1, "v6e:1x1", 1, (1, 1, 1)),  # a single chip needs explicit host bounds
        ("V5P:4x4x4", 1, "v5p:4x4x4", 64, (2, 2, 1)),
        ("v5e-4", 2, "v5e:2x2", 8, (2, 2, 1)),
    ],
)
def test_topology_names(name, slices, libtpu_name, chips, host):
    topo = aot.parse_topology(name, slices)
    assert (topo.libtpu_name, topo.chips, topo.host_bounds()) == (libtpu_name, chips, host)


@pytest.mark.parametrize("bad", ["v9z-8", "v5p", "v5p-12", "v5p-7", "v5e:2x2x2", "v5p:2x2", "tpu", ""])
def test_bad_topology_names_list_the_accepted_forms(bad):
    with pytest.raises(aot.TopologyError) as e:
        aot.parse_topology(bad)
    assert repr(bad) in str(e.value) and "accepted forms" in str(e.value) and "v5p:AxBxC" in str(e.value)


def test_without_libtpu_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot.LibtpuMissing, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices(aot.parse_topology("v5e-1"))


def test_unknown_topology_is_one_clear_line():
    out = _run_cli("--config", "configs/gpt2.py:tiny", "--topology", "v9z-8")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    line = [s for s in out.stderr.splitlines() if s.startswith("aot:")]
    assert len(line) == 1 and "unknown topology 'v9z-8'" in line[0] and "accepted forms" in line[0], out.stderr


# ----------------------------------------------------------------------------------------------
# Collectives in HLO text (hand-made module: no compiler needed)

HAND_MADE_HLO = """HloModule hand_made

%all-reduce-scatter.1 (input: f32[64,32]) -> f32[16,32] {
  %input = f32[64,32]{1,0} parameter(0)
  %all-reduce.5 = f32[64,32]{1,0:T(8,128)} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[16,32]{1,0} dynamic-slice(%all-reduce.5, %c, %c), dynamic_slice_sizes={16,32}
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %p = (s32[], bf16[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p.1 = (s32[], bf16[8,128]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %step = s32[]{:T(128)} constant(1)
  %next = s32[] add(%i.1, %step)
  %all-gather.2 = bf16[8,128]{1,0:T(8,128)(2,1)} all-gather(%x), dimensions={0}, replica_groups={{0,1,2,3}}
  %fusion.3 = f32[16,32]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (s32[], bf16[8,128]) tuple(%next, /*index=1*/%all-gather.2)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[], bf16[8,128]) while(%init), condition=%cond, body=%body
  %b = f32[4,4]{1,0} dynamic-update-slice(%zeros, %shard, %c, %c)
  %all-reduce.9 = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(%a, %b), replica_groups={{0,1}}, to_apply=%add
  %cp = (bf16[8]{0}, bf16[8]{0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1}}
  %cpd = bf16[8]{0} collective-permute-done(%cp)
  ROOT %r = f32[16]{0} copy(%a)
}
"""


def test_collectives_of_hand_made_hlo():
    ops, unknown = hlo.collective_ops(HAND_MADE_HLO)
    s = hlo.summarize(ops)
    assert unknown == 0
    # In the loop body (3 trips): one all-gather of bf16[8,128] and one reduce-scatter of f32[64,32].
    assert s["all-gather"] == {"ops": 1, "count": 3, "bytes": 3 * 8 * 128 * 2}
    assert s["reduce-scatter"] == {"ops": 1, "count": 3, "bytes": 3 * 64 * 32 * 4}
    # Outside: one combined all-reduce of two arrays, the second a shard written into zeros (an
    # all-gather in disguise), and one async permute (counted once, at its start).
    assert s["all-reduce"] == {"ops": 1, "count": 1, "bytes": (16 + 16) * 4, "gathered_bytes": 16 * 4}
    assert s["collective-permute"] == {"ops": 1, "count": 1, "bytes": 8 * 2, "windowed_bytes": 0}
    assert s["all-to-all"] == {"ops": 0, "count": 0, "bytes": 0}


def test_loop_trip_counts():
    known = HAND_MADE_HLO.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"5"}}')
    assert hlo.summarize(hlo.collective_ops(known)[0])["all-gather"]["count"] == 5
    # i += 2 while i < 3: two iterations (the TPU compiler's windowed matmul loops step by 2).
    two_steps = HAND_MADE_HLO.replace("constant(1)\n", "constant(2)\n")
    assert hlo.summarize(hlo.collective_ops(two_steps)[0])["all-gather"]["count"] == 2
    # A ring inside one of the TPU compiler's windowed matmul loops: permutes, marked as windowed.
    ring = "  %cp.2 = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%x)\n  ROOT %t ="
    windowed = HAND_MADE_HLO.replace("%body", "%windowed_dot_general_body_ag.4").replace("  ROOT %t =", ring)
    permutes = hlo.summarize(hlo.collective_ops(windowed)[0])["collective-permute"]
    assert permutes == {"ops": 2, "count": 4, "bytes": 3 * 16 + 16, "windowed_bytes": 3 * 16}
    no_bound = HAND_MADE_HLO.replace("direction=LT", "direction=NE")  # not a counted loop
    ops, unknown = hlo.collective_ops(no_bound)
    assert unknown == 1 and hlo.summarize(ops)["all-gather"]["count"] == 1


# One all-gather that the TPU compiler splits into a chain of async collective fusions: the start
# before a 3-trip loop, two continuations in its body, the done after it; every piece holds the
# same instruction (channel 7, chain 0) with the full result shape.
CHAIN_HLO = """HloModule chained

%start (s: bf16[4,8]) -> bf16[16,8] {
  %s = bf16[4,8]{1,0} parameter(0)
  ROOT %ag.1 = bf16[16,8]{1,0} all-gather(%s), channel_id=7, dimensions={0}, frontend_attributes={chain_id="0"}
}

%async_collective_fusion.1 (s.1: bf16[4,8]) -> bf16[16,8] {
  %s.1 = bf16[4,8]{1,0} parameter(0)
  ROOT %ag.2 = bf16[16,8]{1,0} all-gather(%s.1), channel_id=7, dimensions={0}, frontend_attributes={chain_id="0"}
}

%async_collective_fusion.2 (s.2: bf16[4,8]) -> bf16[16,8] {
  %s.2 = bf16[4,8]{1,0} parameter(0)
  ROOT %ag.3 = bf16[16,8]{1,0} all-gather(%s.2), channel_id=7, dimensions={0}, frontend_attributes={chain_id="0"}
}

%done (s.3: bf16[4,8]) -> bf16[16,8] {
  %s.3 = bf16[4,8]{1,0} parameter(0)
  ROOT %ag.4 = bf16[16,8]{1,0} all-gather(%s.3), channel_id=7, dimensions={0}, frontend_attributes={chain_id="0"}
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p.1 = (s32[], bf16[4,8]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %step = s32[]{:T(128)} constant(1)
  %next = s32[] add(%i.1, %step)
  %c.1 = bf16[16,8]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.1
  %c.2 = bf16[16,8]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.2
  %ag.5 = bf16[16,8]{1,0} all-gather(%x), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (s32[], bf16[4,8]) tuple(%next, %x)
}

ENTRY %main (a: bf16[4,8]) -> bf16[16,8] {
  %async-collective-start = bf16[16,8]{1,0} fusion(%a), kind=kCustom, calls=%start
  %w = (s32[], bf16[4,8]) while(%init), condition=%cond, body=%body
  ROOT %async-collective-done = bf16[16,8]{1,0} fusion(%a), kind=kCustom, calls=%done
}
"""


def test_a_chain_of_async_collective_fusions_is_one_collective():
    ops, _ = hlo.collective_ops(CHAIN_HLO)
    s = hlo.summarize(ops)
    # The chain once, at its start (not 1 + 2 x 3 + 1 times), beside a plain all-gather in the loop (3 times).
    assert s["all-gather"] == {"ops": 2, "count": 1 + 3, "bytes": (1 + 3) * 16 * 8 * 2}
    assert [(op.computation, op.per_step) for op in ops] == [("start", 1), ("body", 3)]


def test_oom_messages_are_parsed():
    early = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.19G) "
        "exceeds available HBM (15.75G)."
    )
    r = aot.parse_oom(early)
    assert r["per_device_bytes"] == int(20.19 * 2**30) and r["compiler_hbm_bytes"] == int(15.75 * 2**30)
    late = "XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 63.80G of 30.75G hbm."
    assert aot.parse_oom(late)["per_device_bytes"] == int(63.80 * 2**30)
    assert aot.parse_oom("INTERNAL: something else") is None


# ----------------------------------------------------------------------------------------------
# The abstract step (no libtpu needed: built over this process's CPU devices, never compiled)


@pytest.mark.parametrize(
    "data, keys",
    [
        ({}, {"inputs", "targets"}),
        (
            {"data.source": "jsonl", "data.max_chars": 0},
            {"inputs", "targets", "weights"},
        ),  # prompt-completion: completions only
        ({"data.source": "jsonl", "data.max_chars": 0, "data.packing": "documents"}, {"inputs", "targets", "weights"}),
        ({"data.packing": "documents"}, {"inputs", "targets", "weights", "segment_ids", "positions"}),
    ],
)
def test_batch_spec_has_the_arrays_of_the_configured_data(data, keys):
    """The step aot compiles reads the arrays the run's data yields (lm_data.batch_options)."""
    config = _config("gpt2", "tiny", data)
    step = aot.build_train_step(config, jax.devices())
    assert set(step.batch) == keys
    shape = (config.train.batch_size, config.data.seq_len)
    assert all(x.shape == shape and x.sharding == sharding.batch_sharding(step.mesh) for x in step.batch.values())


# ----------------------------------------------------------------------------------------------
# Compiling for TPU topologies


@needs_libtpu
@pytest.mark.parametrize(
    "topology, slices, devices, kind, hbm_gib",
    [("v5e-1", 1, 1, "TPU v5 lite", 16), ("v6e:2x2", 2, 8, "TPU v6 lite", 32)],
)
def test_tiny_config_compiles_for_topologies(topology, slices, devices, kind, hbm_gib):
    r = aot.report(_config("gpt2", "tiny"), topology, num_slices=slices)
    assert (r["num_devices"], r["device_kind"], r["hbm_bytes"]) == (devices, kind, hbm_gib * 2**30)
    assert r["fits"] is True and 0 < r["per_device_bytes"] < r["hbm_bytes"]
    assert r["headroom_bytes"] == r["hbm_bytes"] - r["per_device_bytes"]
    # The total is XLA's peak of live buffers: at least the resident state, at most every buffer at once.
    assert r["params_bytes"] + r["opt_state_bytes"] <= r["peak_bytes"] <= r["buffer_sum_bytes"]
    assert r["per_device_bytes"] == r["peak_bytes"] + r["program_bytes"]
    assert r["compile_s"] > 0 and set(r["collectives"]) == set(hlo.KINDS)
    assert devices == 1 or r["collectives"]["all-reduce"]["count"] > 0  # data parallel over 8 chips
    json.dumps(r)  # the command prints it as its last line


@needs_libtpu
def test_slices_go_along_data():
    devices = aot.topology_devices(aot.parse_topology("v5e-4", num_slices=2))
    mesh = sharding.make_mesh(
        aot.with_overrides(_config("gpt2", "tiny"), {"mesh.data": 2, "mesh.fsdp": 4}).mesh, devices
    )
    for row, slice_index in zip(mesh.devices, (0, 1)):
        assert {d.slice_index for d in row.flatten()} == {slice_index}


# Lane-aligned widths (multiples of 128 per shard), so that TPU tile padding does not blur the ratio.
WIDE_TINY = {"model.embed_dim": 512, "model.num_heads": 4, "model.mlp_dim": 2048}


@pytest.fixture(scope="module")
def dp_and_fsdp(tmp_path_factory):
    """Reports of the same model on v5p-8 (4 chips): replicated (data=4) and sharded (fsdp=4), HLO dumped."""
    out = {}
    for name, mesh in (("dp", {"mesh.data": 4, "mesh.fsdp": 1}), ("fsdp", {"mesh.data": 1, "mesh.fsdp": 4})):
        config = _config("gpt2", "tiny", {**WIDE_TINY, **mesh})
        out[name] = aot.report(config, "v5p-8", dump_dir=str(tmp_path_factory.mktemp(name)))
    return out


@needs_libtpu
def test_fsdp_argument_bytes_are_a_quarter_of_replicated(dp_and_fsdp):
    dp, fsdp = dp_and_fsdp["dp"], dp_and_fsdp["fsdp"]
    assert fsdp["argument_bytes"] == pytest.approx(dp["argument_bytes"] / 4, rel=0.10)
    dp_state, fsdp_state = (r["params_bytes"] + r["opt_state_bytes"] for r in (dp, fsdp))
    assert fsdp_state == pytest.approx(dp_state / 4, rel=0.10)


def _param_dims(config) -> set[tuple[int, ...]]:
    """Shapes of the model's weight matrices (vectors left out: a gathered bias proves nothing)."""
    import jax

    step = aot.build_train_step(config, aot.topology_devices(aot.parse_topology("v5p-8")))
    return {tuple(x.shape) for x in jax.tree.leaves(step.state.params) if len(x.shape) > 1}


def _all_gather_dims(report: dict) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in a report's dumped optimized HLO."""
    with open(next(p for p in report["dump"] if p.endswith(".optimized.hlo.txt"))) as f:
        ops, _ = hlo.collective_ops(f.read())
    dims = lambda shape: tuple(int(d) for d in shape.split("[")[1].rstrip("]").split(",") if d)
    return [dims(s) for op in ops if op.kind == "all-gather" for s in op.shapes]


@needs_libtpu
def test_fsdp_gathers_and_reduce_scatters_data_parallel_all_reduces(dp_and_fsdp):
    dp, fsdp = dp_and_fsdp["dp"], dp_and_fsdp["fsdp"]
    assert fsdp["collectives"]["all-gather"]["count"] > 0
    assert fsdp["collectives"]["reduce-scatter"]["count"] > 0
    assert dp["collectives"]["all-reduce"]["count"] > 0
    params = _param_dims(_config("gpt2", "tiny", WIDE_TINY))
    assert [d for d in _all_gather_dims(fsdp) if d in params], "FSDP gathers whole weight matrices"
    assert not [d for d in _all_gather_dims(dp) if d in params], "data parallelism never gathers a weight"


@needs_libtpu
def test_dump_writes_stablehlo_and_optimized_hlo(dp_and_fsdp):
    stable, optimized = dp_and_fsdp["fsdp"]["dump"]
    assert stable.endswith(".stablehlo.mlir") and "stablehlo" in open(stable).read()
    assert "all-gather" in open(optimized).read()


@needs_libtpu
def test_lora_reports_trainable_frozen_and_optimizer_bytes_per_chip():
    # QLoRA int4 over FSDP on 4 chips: the adapters are trained, the base is held packed (half a byte a weight).
    lora = {"lora.rank": 8, "lora.base": "unread", "lora.base_dtype": "int4", "mesh.data": 1, "mesh.fsdp": 4}
    r = aot.report(_config("gpt2", "tiny", {**WIDE_TINY, **lora}), "v5p-8")
    full = aot.build_train_step(_config("gpt2", "tiny", WIDE_TINY), aot.topology_devices(aot.parse_topology("v5p-8")))
    assert (
        r["num_params"]
        == r["trainable_params"] + r["frozen_params"]
        > sum(x.size for x in jax.tree.leaves(full.state.params))
    )
    # float32 adapters: A [in, r] splits over fsdp=4 with its kernel's input axis, B [r, out] is replicated.
    assert 4 * r["trainable_params"] / 4 < r["params_bytes"] < 4 * r["trainable_params"]
    assert r["opt_state_bytes"] == pytest.approx(2 * r["params_bytes"], rel=0.01)  # AdamW: two moments
    # Mostly int4 kernels (packed) beside float32 embeddings and norms: under 1 byte a weight, over half.
    assert r["frozen_params"] / 4 / 2 < r["frozen_bytes"] < r["frozen_params"] / 4
    assert r["argument_bytes"] >= r["params_bytes"] + r["frozen_bytes"] + r["opt_state_bytes"] and r["fits"]
    text = aot.format_report(r)
    assert "LoRA adapter parameters, rank 8" in text and "stored as int4" in text


@needs_libtpu
def test_a_step_gathers_each_weight_at_most_twice():
    # llama3-tiny as the 1b preset runs (layers scanned, remat 'dots', bfloat16 compute), FSDP over
    # v5e-8, fully fine-tuned and as LoRA over a float32 and a bfloat16 base. Each weight is gathered
    # once for the forward and at most once more for the backward, in bfloat16 whatever the base is
    # stored as (cast before the gather): no step moves more than twice the model's bfloat16 bytes,
    # plus the token ids. The TPU compiler overlaps some gathers with the layer loop as chains of
    # async collective fusions (see llm_jax/tools/hlo.py), which counted piece by piece read 2.5 times that.
    shape = {"model.scan_layers": True, "model.remat": "dots", "model.dtype": "bfloat16", "mesh.fsdp": 8}
    shape |= {"model.attention": "dot_product"}
    lora = {"lora.rank": 16, "lora.base": "unread"}
    runs = {"full": {}, "f32": {**lora, "lora.base_dtype": "float32"}, "bf16": {**lora, "lora.base_dtype": "bfloat16"}}
    gathered, bound = {}, {}
    for name, extra in runs.items():
        r = aot.report(_config("llama3", "tiny", {**shape, **extra}), "v5e-8")
        gathered[name] = r["collectives"]["all-gather"]["bytes"]
        bound[name] = 2 * 2 * r["num_params"] + 2 * r["batch_size"] * r["seq_len"] * 4
        assert 0 < gathered[name] <= bound[name], name
    adapters = 2 * 2 * r["trainable_params"]  # the adapters, gathered like their kernels
    assert gathered["f32"] == gathered["bf16"] <= gathered["full"] + adapters


@needs_libtpu
def test_too_large_reports_fits_false_with_the_numbers():
    out = _run_cli("--config", "configs/llama.py:1b", "--topology", "v5e-1", "--config.train.batch_size=1")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fits"] is False and r["per_device_bytes"] > r["hbm_bytes"] == 16 * 2**30
    assert r["params_bytes"] == 4 * r["num_params"] and r["opt_state_bytes"] > 2 * r["params_bytes"]
    assert r["compiler_hbm_bytes"] <= r["hbm_bytes"] and "DOES NOT FIT" in out.stdout


@needs_libtpu
def test_sweep_sorts_layouts_by_memory():
    rows = aot.sweep(_config("gpt2", "tiny"), "v5e:1x2", axes=("mesh",))
    layouts = {r["layout"] for r in rows}
    assert layouts == {"as configured", "mesh 1/2/1", "mesh 1/1/2"}  # data=-1 is the 2/1/1 split
    totals = [r["per_device_bytes"] for r in rows]
    assert totals == sorted(totals) and all(r["fits"] for r in rows)
    table = aot.format_sweep(rows)
    assert table.count(" yes ") == 3 and "mesh 1/2/1" in table


def test_sweep_table_marks_what_does_not_fit():
    base = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "grad_accum_steps": 1, "remat": "none", "compile_s": 1.0}
    base.update(params_bytes=2**30, frozen_bytes=0, opt_state_bytes=2**31, temp_bytes=None)
    rows = [
        {**base, "layout": "as configured", "per_device_bytes": 20 * 2**30, "fits": False},
        {"layout": "grad_accum 8", "invalid": "batch does not split", "per_device_bytes": None, "fits": False},
    ]
    table = aot.format_sweep(rows)
    assert " NO " in table and "invalid: batch does not split" in table and " yes " not in table
    assert aot.sweep_summary(rows)["sweep"][1]["invalid"] == "batch does not split"


def test_sweep_varies_the_expert_axis_of_a_mixture_of_experts():
    """An MoE preset's sweep splits its experts 2, 4, 8 ways (FSDP over the rest); a dense model's has no such row."""
    moe = dict(aot.sweep_candidates(_config("moe", "mixtral-8x7b"), 64, axes=("expert",)))
    assert list(moe) == ["as configured", "expert 2", "expert 4", "expert 8"]  # 8 experts: at most 8 ways
    assert moe["expert 8"] == {"mesh.data": 1, "mesh.fsdp": 8, "mesh.expert": 8, "mesh.sequence": 1, "mesh.tensor": 1}
    assert aot.sweep_candidates(_config("llama3", "1b"), 64, axes=("expert",)) == [("as configured", {})]

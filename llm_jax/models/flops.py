"""FLOP and MFU accounting, shared by the benchmark (`llm_jax.bench`) and the trainer's log line.

The counts here are pure functions of a ModelConfig; which count a model uses is its family's
choice (`ModelFamily.flops_per_token`, and `family.flops_per_token(cfg, seq_len)` for any config).

Model FLOPs per token follow MaxText's `calculate_tflops_training_per_device`: every matmul weight
costs 6 FLOPs per token (2 forward, 4 backward), and attention's score and value matmuls cost
6 * t * h * d per token per layer -- the causal half only (4 * t * h * d forward for the full square,
halved, times 3 for forward + backward). Embedding lookups, norms, biases and the optimizer are not
counted; remat recomputation is not counted either (it is hardware FLOPs, not model FLOPs). A
mixture-of-experts layer counts the weights a token actually multiplies (router, its k experts,
shared experts): MFU of an MoE model is on its active parameters, as MaxText counts it.

MFU = achieved model FLOP/s / peak FLOP/s of the devices in use. Peaks are dense bf16 matmul
figures per chip (float32 on TPU is bf16 passes; for float32 training on GPU the TF32 peak is
half). On CPU there is no table: the peak is a float32 matmul measured on the spot.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,  # SXM, same Hopper tensor cores as H100 SXM
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e reports its kind as 'TPU v5 lite'
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
_FP32_ON_GPU = 0.5  # TF32 tensor-core peak is half the bf16 one on A100/H100/H200


def _attention_params(cfg) -> int:
    """Matmul weights of one attention: q, k, v and out projections."""
    e, h, k, d = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    return e * (h + 2 * k) * d + h * d * e


def _mlp_params(cfg, hidden: int | None = None) -> int:
    """Matmul weights of one dense MLP of `hidden` units (default mlp_dim): 3 matrices when gated."""
    gated = cfg.mlp_activation in ("swiglu", "geglu")
    return (3 if gated else 2) * cfg.embed_dim * (cfg.mlp_dim if hidden is None else hidden)


def expert_params(cfg) -> int:
    """Matmul weights of one routed expert (a gated MLP of expert_dim units)."""
    return _mlp_params(cfg, cfg.expert_dim)


def inactive_params(cfg) -> int:
    """Parameters a token never multiplies: the experts its router did not pick, in every MoE layer
    ((E - k) experts each); total parameters minus these are the active ones. 0 for a dense model."""
    if not cfg.num_experts:
        return 0
    return cfg.moe_layers * (cfg.num_experts - cfg.experts_per_token) * expert_params(cfg)


def _layer_mlp_params(cfg, layer: int) -> int:
    """Active matmul weights of layer `layer`'s MLP: the dense one, or the router, k experts and the
    shared experts of an MoE layer."""
    if not cfg.is_moe(layer):
        return _mlp_params(cfg)
    shared = _mlp_params(cfg, cfg.shared_dim) if cfg.num_shared_experts else 0
    return cfg.embed_dim * cfg.num_experts + cfg.experts_per_token * expert_params(cfg) + shared


def decoder_matmul_params(cfg) -> int:
    """The matmul weights a token of a decoder-only LM multiplies: attention, (active) MLP, output map."""
    mlp = sum(_layer_mlp_params(cfg, i) for i in range(cfg.num_layers))
    return cfg.num_layers * _attention_params(cfg) + mlp + cfg.embed_dim * cfg.vocab_size


def decoder_flops_per_token(cfg, seq_len: int) -> float:
    """A decoder-only LM: 6 per matmul weight a token multiplies (MoE layers: its k experts, the router
    and the shared experts; the active parameters), and causal attention over `seq_len` positions."""
    attention = 6 * seq_len * cfg.num_heads * cfg.dim_per_head * cfg.num_layers  # causal: half of 12 * t * h * d
    return 6.0 * decoder_matmul_params(cfg) + attention


def lora_decoder_flops_per_token(cfg, seq_len: int, adapter_params: int) -> float:
    """A LoRA step of a decoder-only LM, counted as it is done: the frozen weights cost 4 per token
    (forward 2, the activations' gradient 2; no weight gradient), the adapters 6 (trained matmul
    weights), attention as in `decoder_flops_per_token`. The trainer's MFU keeps the 6N count of
    `decoder_flops_per_token` (the base's N, adapters left out), as PEFT benchmarks usually do."""
    return decoder_flops_per_token(cfg, seq_len) - 2.0 * decoder_matmul_params(cfg) + 6.0 * adapter_params


def encoder_decoder_flops_per_token(cfg, seq_len: int) -> float:
    """An encoder-decoder, per target token with as many source tokens (a source of `seq_len`):
    encoder blocks, decoder blocks with cross-attention, the output projection; attention full in
    the encoder and the cross-attention, causal in the decoder."""
    hd = cfg.num_heads * cfg.dim_per_head
    encoder = cfg.encoder_layers * (_attention_params(cfg) + _mlp_params(cfg))
    decoder = cfg.num_layers * (2 * _attention_params(cfg) + _mlp_params(cfg))
    attention = 12 * seq_len * hd * cfg.encoder_layers + (6 + 12) * seq_len * hd * cfg.num_layers
    return 6.0 * (encoder + decoder + cfg.embed_dim * cfg.vocab_size) + attention


def _device_peak(kind: str, dtype: str) -> float | None:
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest first: 'TPU v5 lite' before 'TPU v5'
        if name.lower() in kind.lower():
            peak = PEAK_FLOPS[name]
            if dtype == "float32" and not name.startswith("TPU"):
                peak *= _FP32_ON_GPU
            return peak
    return None


@functools.cache
def measure_cpu_matmul_flops(n: int = 1024, seconds: float = 0.5) -> float:
    """Best float32 matmul FLOP/s of this host over all its cores (jitted `n x n @ n x n`).

    One process's CPU devices share the host's cores, so this is the peak of all of them together.
    """
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), cpu)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(devices: Sequence[jax.Device], dtype: str = "bfloat16") -> tuple[float | None, str]:
    """(total peak FLOP/s of `devices`, how it was obtained); (None, reason) for an unknown device."""
    dev = devices[0]
    if dev.platform == "cpu":
        # $LLM_JAX_CPU_PEAK_FLOPS overrides the measurement (e.g. to compare runs on one scale).
        if os.environ.get("LLM_JAX_CPU_PEAK_FLOPS"):
            return float(os.environ["LLM_JAX_CPU_PEAK_FLOPS"]), "LLM_JAX_CPU_PEAK_FLOPS"
        return measure_cpu_matmul_flops(), "measured float32 matmul on this host"
    peak = _device_peak(dev.device_kind, dtype)
    if peak is None:
        return None, f"no peak known for device kind {dev.device_kind!r}"
    return peak * len(devices), f"{dev.device_kind} table x {len(devices)}"


def mfu(tokens_per_sec: float, flops_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1] (None when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_sec * flops_token / peak

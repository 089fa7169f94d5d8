"""Hugging Face architectures as data: the `Spec`s llm_jax converts, and choosing one.

Each architecture is one `Spec` (hf_table.py explains the tensor tables and layouts):
GPT2LMHeadModel (hf_gpt2.py); LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM (hf_llama.py); Gemma2ForCausalLM, Gemma3ForCausalLM (hf_gemma.py);
MixtralForCausalLM, Qwen3MoeForCausalLM (hf_moe.py). Import reads
config.json's `architectures` (`for_config`); export writes the architecture that computes exactly
what a model computes (`for_model`). A new architecture is one more Spec added to `SPECS`.
"""

from __future__ import annotations

from llm_jax.interop.hf_gemma import GEMMA2, GEMMA3
from llm_jax.interop.hf_gpt2 import GPT2
from llm_jax.interop.hf_llama import LLAMA, MISTRAL, QWEN2, QWEN3
from llm_jax.interop.hf_moe import MIXTRAL, QWEN3_MOE
from llm_jax.interop.hf_table import HFError, Spec, Tensor, sizes  # noqa: F401 - the tables' vocabulary
from llm_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# Choosing a spec

# Export writes the first one a model fits (unless the run was imported from another that fits).
SPECS = (GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, MIXTRAL, QWEN3_MOE)


def for_config(hf_cfg: dict) -> Spec:
    """The spec of config.json's `architectures`; anything else is an error naming it."""
    by_name = {s.architecture: s for s in SPECS}
    archs = hf_cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in by_name:
        raise HFError(
            f"config.json architectures={archs!r} is not supported; llm_jax converts exactly one of {sorted(by_name)}"
        )
    return by_name[archs[0]]


def for_model(cfg: ModelConfig, prefer: str | None = None) -> Spec:
    """The spec named `prefer` (an architecture, e.g. the one a run was imported from) if it computes
    exactly what `cfg` computes, else the first spec that does; an error listing each one's misfits."""
    by_name = {s.architecture: s for s in SPECS}
    if prefer in by_name and not by_name[prefer].misfits(cfg):
        return by_name[prefer]
    misfits = {}
    for spec in SPECS:
        misfits[spec.architecture] = spec.misfits(cfg)
        if not misfits[spec.architecture]:
            return spec
    raise HFError(
        "this model matches no Hugging Face architecture llm_jax exports: "
        + "; ".join(f"as {s.architecture} its fields {misfits[s.architecture]} differ (needs {s.needs})" for s in SPECS)
    )

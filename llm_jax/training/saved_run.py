"""`load_run`: a trained run directory back as a model, its params and everything needed to use it.

The one reader of a workdir for inference and conversion (generate, convert, translate, the
benchmarks, notebooks):

    run = load_run("runs/default")
    with run.use_mesh():
        texts = decode.complete(run.model, run.params, run.tokenizer, ["def "], 200, context=run.context)

`quantized(run, "int8")` is the same run with weight-only integer kernels (`--quant` of generate,
translate and evaluate).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from llm_jax.data import tokenizer as tok_lib
from llm_jax.models import family as family_lib
from llm_jax.models import lora, quant
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue, NotFound
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import config as config_lib
from llm_jax.training import lora_base
from llm_jax.training import workdir as workdir_lib


@dataclasses.dataclass
class Run:
    """A restored run. `params` are sharded on `mesh` by `rules` (host numpy arrays if `on_host`)."""

    workdir: str
    config: ml_collections.ConfigDict
    tokenizer: tok_lib.Tokenizer
    model: Any  # the family's flax module
    params: Any
    mesh: jax.sharding.Mesh
    rules: Any
    step: int
    context: int  # the longest context the model was trained at: decoding never feeds more
    loop_data: dict  # the checkpoint's loop state (step, tokenizer fingerprint, ...)

    @contextlib.contextmanager
    def use_mesh(self):
        """The context in which to apply the model or decode: its mesh and logical rules."""
        with sharding.use_mesh(self.mesh, self.rules):
            yield


def inference_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh if its shape fits the number of devices here, else all devices data-parallel
    (params replicated): a run trained on 8 devices decodes on 1. Only that mismatch falls back; any
    other error of the mesh (a bug, a config this version cannot read) is raised."""
    m = config.mesh
    try:
        sharding.resolve_mesh_shape(sharding.mesh_sizes(m), jax.device_count())
    except BadValue:  # trained on another number of devices
        return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    return sharding.make_mesh(m)


def trained_context(config: ml_collections.ConfigDict, loop_data: dict, max_len: int) -> int:
    """The longest context a run's model was trained at: recorded in its checkpoints (the import's
    pre-training context, then the longest `data.seq_len` trained at), else `data.seq_len`."""
    return min(max_len, int(loop_data.get("trained_context") or config.data.seq_len))


def load_run(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
             on_host: bool = False) -> Run:  # fmt: skip
    """Reads `workdir`'s config.json and tokenizer, rebuilds its model and restores the params of
    checkpoint `step` (default: the latest), sharded on `mesh` (default: the run's mesh if it fits
    this machine, else all devices data-parallel), or as host numpy arrays when `on_host`.

    Raises FileNotFoundError (no run, tokenizer or checkpoint there) or ValueError (a checkpoint
    that does not fit the config, a config this version cannot read), each naming the path.
    """
    config = config_lib.load_run_config(workdir)
    try:
        tokenizer = tok_lib.load(workdir_lib.tokenizer_dir(workdir))
    except FileNotFoundError as e:
        raise NotFound(f"{e}: --workdir must be a run directory written by llm_jax.main") from None
    model = family_lib.build(config_lib.model_config(config, tokenizer.vocab_size))
    mesh = inference_mesh(config) if mesh is None else mesh
    rules = sharding.logical_rules(config)
    boxed = family_lib.abstract_params(model)
    unboxed = nn.meta.unbox(boxed)
    if on_host:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unboxed)
    else:
        abstract = ckpt_lib.abstract_like(unboxed, sharding.boxed_shardings(boxed, mesh, rules))
    if model.cfg.lora_rank:  # a LoRA run: its adapters, on the base they were trained on
        return _load_lora_run(workdir, config, tokenizer, model, mesh, rules, boxed, step, on_host)
    step, params, loop_data = ckpt_lib.restore_params(workdir, abstract, step)
    context = trained_context(config, loop_data, model.cfg.max_len)
    return Run(workdir, config, tokenizer, model, params, mesh, rules, step, context, loop_data)


def _load_lora_run(workdir, config, tokenizer, model, mesh, rules, boxed, step, on_host) -> Run:
    """`load_run` of a LoRA run: the adapters of its checkpoint combined with the checkpoint of
    `config.lora.base` they were trained on (`lora_base.BASE_STEP`), as `base_dtype` stores it.
    `on_host`: read on the mesh, then brought to the host (a LoRA model is one to fine-tune on)."""
    adapters_boxed, _ = lora.split(boxed)
    abstract = ckpt_lib.abstract_like(
        nn.meta.unbox(adapters_boxed), sharding.boxed_shardings(adapters_boxed, mesh, rules)
    )
    step, adapters, loop_data = ckpt_lib.restore_params(workdir, abstract, step)
    frozen = lora_base.abstract_frozen(model, config.lora.base_dtype, mesh, rules)
    _, base = lora_base.load(config, model.cfg, mesh, rules, frozen, loop_data.get(lora_base.BASE_STEP))
    params = lora.combine(base, adapters)
    if on_host:
        params = jax.device_get(params)
    context = trained_context(config, loop_data, model.cfg.max_len)
    return Run(workdir, config, tokenizer, model, params, mesh, rules, step, context, loop_data)


QUANT_KINDS = ("none", "int8", "int4")


def check_quant(kind: str) -> None:
    """One line for a weight quantization that does not exist (commands check before loading)."""
    if kind not in QUANT_KINDS:
        raise BadValue(f"--quant={kind!r} is not a weight quantization: use none, int8 or int4")


def quantized(run: Run, kind: str) -> Run:
    """`run` with every dense kernel stored as `kind` ('int8' / 'int4') integers and a float32 scale
    per output channel (`models/quant.py`), the model rebuilt with `weight_quant=kind`; 'none'
    returns `run` itself. Embeddings, a separate lm_head and MoE experts stay as they are. A LoRA
    run's adapters are merged into the kernels first (integers cannot take the sum; a QLoRA base is
    dequantized for it), so the result is the plain model computing the adapted function, up to the
    rounding."""
    check_quant(kind)
    if kind == "none":
        return run
    model, params = quantize_params(run.model, run.params, kind, run.mesh, run.rules)
    return dataclasses.replace(run, model=model, params=params)


def quantize_params(model: nn.Module, params: Any, kind: str, mesh: jax.sharding.Mesh, rules) -> tuple[nn.Module, Any]:
    """(the model with `weight_quant=kind` and no adapters, its params) from a model and its params.

    The kernels and scales are laid out by the quantized model's own logical shardings on `mesh`:
    the quantization is one jitted program from the (sharded) float params with those
    out_shardings, so no device holds more than its shards. Host (numpy) params come back as such.
    """
    cfg = model.cfg
    qmodel = family_lib.build(dataclasses.replace(cfg, weight_quant=kind, lora_rank=0))
    boxed = family_lib.abstract_params(qmodel)
    abstract = nn.meta.unbox(boxed)

    def quantize(params):
        params = quant.dequantize(params)  # a no-op unless the base is stored as integers (QLoRA)
        if cfg.lora_rank:
            params = lora.merge(params, cfg.lora_alpha, cfg.lora_rank)
        return quant.quantize(params, abstract, kind)

    on_host = not isinstance(jax.tree.leaves(params)[0], jax.Array)
    out = jax.jit(quantize, out_shardings=sharding.boxed_shardings(boxed, mesh, rules))(params)
    return qmodel, jax.device_get(out) if on_host else out

"""Weight-only int8 / int4 two ways on the same model and float weights: ours (`--quant`,
`llm_jax/models/quant.py`) against qwix's post-training quantization (google/qwix, `pip install qwix`).

    .venv/bin/python experiments/qwix_compare.py --style llama --layers 12 --width 768 --heads 12 \
        --new_tokens 64 [--batches 1,8] [--batch 8] [--repeats 5] [--quant int8,int4] [--qwix_tile 64]
        [--workdir RUN]   # a saved run's model and weights instead of bench_decode's random ones

The model is `llm_jax.bench_decode`'s (`bench_decode.model_config`, random float32 weights) or a
saved run's. Sides, all from the same float params:
  float        the float32 model
  ours_<k>     `saved_run.quantize_params` (what `--quant k` serves): integer kernels, one float32
               scale per output channel, scale applied after the matmul
  qwix_<k>     `qwix.quantize_model(model, qwix.PtqProvider([QtRule(weight_qtype=k)]))` and
               `qwix.quantize_params`: weights only (no act_qtype), per output channel (qwix's
               default: a scale per non-contracting axis), the same Dense kernels (rule on
               attn/ and mlp/; the embedding and the lm_head stay float, as ours)
  qwix_int4_g<T>  (--qwix_tile T > 0) qwix int4 with a scale per T inputs (subchannel, `tile_size`),
               which ours lacks
qwix intercepts `jax.lax.dot_general` and `Module.param` inside the linen modules, so our `Dense`
needs no change, except that it casts its kernel with `.astype` and qwix 0.1.8's `WithAux.astype`
fails on its own unboxed QArray (`ValueError: Unsupported type: <class
'qwix._src.core.qarray.QArray'>`, from `flax_util.update_boxed`); `_patch_qwix` makes it cast the
QArray's dequantized dtype (`QArray.astype`), which is what flax's `promote_dtype` path does.

Errors (one fixed batch of `--batch` random prompts continued greedily by the float model for
`--new_tokens`; each side's full-sequence logits on that sequence): max and mean |dlogit| over the
float logits' standard deviation, argmax agreement at the generated positions (teacher-forced),
and `greedy_match`: each side's own greedy decoding (`decode.generate`) equal to float's, token
by token. `weight_rel_rms`: ||W - dequantized W|| / ||W|| over all the quantized kernels.
Speed: `decode.generate` of `--new_tokens` (prefill included, compiled once, a warm-up call
excluded) at each of `--batches`, every side called in turn `--repeats` times, each round starting
one side later (medians); MFU as `llm_jax.bench_decode` reports it, over the float32 matmul peak
measured after the first timing (`peak_flops`; `peak_flops_before`: measured at the start).
Weight bytes: `quant.weight_bytes` (int4 counted packed) and as stored here (XLA on CPU keeps int4
a byte each). Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax.runtime import hostmem  # noqa: E402 - first: host memory settings before numpy and JAX start threads

hostmem.keep_freed_memory()  # as the command lines do (llm_jax/cli.py); `import llm_jax` alone does not

# isort: split
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import qwix  # noqa: E402
from absl import app, flags  # noqa: E402
from qwix._src.providers import ptq as qwix_ptq  # noqa: E402

from llm_jax.inference import decode  # noqa: E402
from llm_jax.models import family as family_lib  # noqa: E402
from llm_jax.models import flops, quant  # noqa: E402
from llm_jax.models.model import count_params  # noqa: E402
from llm_jax.runtime import sharding  # noqa: E402
from llm_jax.tools import bench_decode as bd  # noqa: E402
from llm_jax.training import saved_run  # noqa: E402

flags.DEFINE_list("batches", ["1", "8"], "Batch sizes to time decoding at.")
flags.DEFINE_integer("qwix_tile", 64, "Also qwix int4 with a scale per this many inputs (0: not).")
flags.DEFINE_string("workdir", None, "A saved run to quantize instead of bench_decode's random model.")
bd.define_flags()

DENSE = r".*(attn|mlp)/\w+"  # qwix module paths of our Dense layers: layers_3/attn/query, layers_3/mlp/wo


def _patch_qwix():
    """qwix 0.1.8 `WithAux.astype` rebuilds a box around the QArray and fails when the param tree is
    unboxed (what `apply` gets); cast the QArray's dequantized dtype instead, as `QArray.astype` does."""
    qwix_ptq.WithAux.astype = lambda self, dtype: self.replace(array=self.array.astype(dtype))


def ours(model, params, kind):
    """(model, params) of `--quant kind`, made as `llm_jax.bench_decode` makes them."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    return saved_run.quantize_params(model, params, kind, mesh, sharding.logical_rules())


def qwix_side(model, params, kind, tile=None):
    """(model, params) of qwix's PTQ of the same Dense kernels, weights only."""
    rule = qwix.QtRule(module_path=DENSE, weight_qtype=kind, tile_size=tile)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = family_lib.abstract_params(qmodel)  # WithAux leaves say how to quantize each kernel
    return qmodel, jax.jit(lambda p: qwix.quantize_params(p, abstract))(params)


def dequantized_kernels(params, path=()) -> dict:
    """{path of the layer: its float32 kernel} of every quantized kernel of either side's tree."""
    out = {}
    for key, value in params.items():
        if isinstance(value, qwix_ptq.WithAux):  # qwix: the kernel itself
            out[path] = qwix.dequantize(value.array).astype(jnp.float32)
        elif isinstance(value, dict) and "kernel_scale" in value:
            out[path + (key,)] = quant.dequantize({key: value})[key]["kernel"]
        elif isinstance(value, dict):
            out.update(dequantized_kernels(value, path + (key,)))
    return out


def weight_error(float_params, q_params) -> tuple[float, list]:
    """(||W - W_hat|| / ||W|| over the quantized kernels, their paths)."""
    deq = dequantized_kernels(q_params)
    num = den = 0.0
    for path, w_hat in deq.items():
        w = float_params
        for key in path:
            w = w[key]
        w = w["kernel"]
        num += float(jnp.sum((w - w_hat.reshape(w.shape)) ** 2))
        den += float(jnp.sum(w**2))
    return (num / den) ** 0.5, sorted("/".join(p) for p in deq)


def errors(sides: dict, prompts: np.ndarray, new_tokens: int) -> dict:
    """Per quantized side: logit errors on float's greedy sequence, argmax and greedy agreement."""
    tokens, start = decode.left_pad(prompts.tolist())
    gen = {n: np.asarray(decode.generate(m, p, tokens, start, jax.random.key(0), max_new_tokens=new_tokens).tokens)
           for n, (m, p) in sides.items()}  # fmt: skip
    seq = jnp.asarray(np.concatenate([prompts, gen["float"][:, :-1]], axis=1))  # [b, p + n - 1]
    logits = {n: np.asarray(jax.jit(m.apply)({"params": p}, seq), np.float32) for n, (m, p) in sides.items()}
    ref, std = logits["float"], float(np.std(logits["float"]))
    at = slice(prompts.shape[1] - 1, None)  # positions whose next token was generated
    out = {"float_logit_std": std}
    for name in sides:
        if name == "float":
            continue
        d = np.abs(logits[name] - ref)
        out[name] = {
            "max_dlogit_rel": float(d.max()) / std,
            "mean_dlogit_rel": float(d.mean()) / std,
            "argmax_agreement": float(np.mean(logits[name][:, at].argmax(-1) == ref[:, at].argmax(-1))),
            "greedy_match": float(np.mean(gen[name] == gen["float"])),
        }
    return out


def prompts_of(cfg, batch: int, prompt_len: int) -> np.ndarray:
    """bench_decode's random prompts [batch, prompt_len] in `cfg`'s vocabulary."""
    return bd.prompts_of(types.SimpleNamespace(batch=batch, vocab=cfg.vocab_size, prompt_len=prompt_len))


def timings(sides: dict, batch: int, f) -> dict:
    """{side: median tokens/s, MFU} of `decode.generate` at `batch`, the sides called in turn."""
    cfg = sides["float"][0].cfg
    prompts = prompts_of(cfg, batch, f.prompt_len)
    runners = {n: bd.runner(m, p, prompts, f.new_tokens)[0] for n, (m, p) in sides.items()}
    times = bd.time_alternating(runners, f.repeats, rotate=True)
    peak, _ = flops.peak_flops(jax.devices(), "float32")
    fed, forward = bd.decode_flops(cfg, f.prompt_len, f.new_tokens)
    out = {"peak_flops": peak}
    for name, t in times.items():
        s = statistics.median(t)
        out[name] = {"tokens_per_sec": batch * f.new_tokens / s, "mfu": flops.mfu(batch * fed / s, forward, peak)}
        out[name]["vs_float"] = statistics.median(times["float"]) / s
    return out


def build_sides(f) -> dict:
    """{name: (model, params)}: the float model and every quantized side of it."""
    if f.workdir:
        run = saved_run.load_run(f.workdir)
        model, params = run.model, run.params
    else:
        model, params = bd.init_model(bd.model_config(f))
    sides = {"float": (model, params)}
    for kind in f.quant or ["int8", "int4"]:
        sides[f"ours_{kind}"] = ours(model, params, kind)
        sides[f"qwix_{kind}"] = qwix_side(model, params, kind)
    if f.qwix_tile and "int4" in (f.quant or ["int4"]):
        sides[f"qwix_int4_g{f.qwix_tile}"] = qwix_side(model, params, "int4", f.qwix_tile)
    return sides


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    _patch_qwix()
    peak_before = flops.measure_cpu_matmul_flops(seconds=1.0) if jax.devices()[0].platform == "cpu" else None
    sides = build_sides(f)
    cfg, float_params = sides["float"][0].cfg, sides["float"][1]
    result = {"params": count_params(float_params), "peak_flops_before": peak_before, "jax": jax.__version__}
    result.update(qwix=qwix.__version__, workdir=f.workdir, prompt_len=f.prompt_len, new_tokens=f.new_tokens)
    result["sides"] = list(sides)
    if not f.workdir:
        result["config"] = dict(style=f.style, layers=cfg.num_layers, width=cfg.embed_dim, mlp=cfg.mlp_dim,
                                heads=cfg.num_heads, vocab=cfg.vocab_size)  # fmt: skip
    kernels = {}
    for name, (_, p) in sides.items():
        here = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p))
        result[name] = {"weight_bytes": quant.weight_bytes(p), "weight_bytes_here": here}
        if name != "float":
            result[name]["weight_rel_rms"], kernels[name] = weight_error(float_params, p)
    paths = {tuple(k) for k in kernels.values()}
    assert len(paths) == 1, f"the sides quantize different kernels: {kernels}"  # the same layers, both ways
    result["quantized_kernels"] = len(next(iter(kernels.values())))
    err = errors(sides, prompts_of(cfg, f.batch, f.prompt_len), f.new_tokens)
    result["float_logit_std"] = err.pop("float_logit_std")
    for name, side_err in err.items():
        result[name].update(side_err)
    for batch in map(int, f.batches):
        bd.log(f"timing batch {batch}")
        result[f"batch_{batch}"] = timings(sides, batch, f)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

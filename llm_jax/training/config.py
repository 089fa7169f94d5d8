"""The run config: every key (configs/*.py start from `base_config()`), its checks, and how a saved
run's config is read back.

Configs are `ml_collections.ConfigDict`s, nested by concern: `model`, `data`, `optim`, `train`,
`mesh`. Files in `configs/` override what they need; the command line overrides the rest
(`--config.optim.lr=1e-3`). Every key exists here, so a mistyped key is an error.

`config.model` is `ModelConfig`'s fields, generated from the dataclass (None = unset, typed so the
command line can set it), and `model_config` reads it back with `ModelConfig(**config.model)`.

One spelling of "unset" per kind of key: in `config.model`, None (ModelConfig's own); elsewhere ''
for a string (a path, a name: none given) and 0 for a count or size ("derive it" or "no limit", as
the key's comment says); -1 is not "unset" but "all the rest" (the mesh axes). The command lines'
flags leave an optional value None. Runs saved with other spellings are upgraded on reading
(`upgrade`).

`config.data` holds the keys of every data source; a run uses only its own source's keys
(SOURCE_KEYS). A key of another source set to a non-default value is an error (`check_keys`), and
the config.json written into a run leaves other sources' keys out (`run_json`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing

import ml_collections
from ml_collections import config_dict

from llm_jax.models import preference
from llm_jax.models.model import ModelConfig
from llm_jax.runtime.errors import BadValue, NotFound

# Keys a config may carry although base_config() lacks them (free-form dicts).
OPTIONAL_KEYS = ("mesh.rules",)
# Keys renamed when config.model became ModelConfig's fields: old key -> new key.
RENAMED_KEYS = {
    "model.rope_scaling.type": "model.rope_scaling",
    "model.rope_scaling.factor": "model.rope_scaling_factor",
    "model.rope_scaling.low_freq_factor": "model.rope_low_freq_factor",
    "model.rope_scaling.high_freq_factor": "model.rope_high_freq_factor",
    "model.rope_scaling.original_max_len": "model.rope_original_max_len",
}
# Run configs saved before then used 0 or -1 for "unset" where ModelConfig uses None.
_LEGACY_UNSET = {"vocab_size": 0, "num_kv_heads": 0, "head_dim": 0, "attention_bias": -1, "mlp_bias": -1}


def model_section() -> ml_collections.ConfigDict:
    """`config.model`: one key per ModelConfig field, with its default; None defaults become typed
    placeholders, so `--config.model.num_kv_heads=2` works on the command line."""
    hints = typing.get_type_hints(ModelConfig)
    m = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if "section" in f.metadata:  # set from another section (`config.lora`), see `model_kwargs`
            continue
        if f.default is None:
            (kind,) = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            m[f.name] = config_dict.placeholder(kind)
        else:
            m[f.name] = f.default
    return m


# `config.lora.base_dtype` -> how the frozen base is stored (QLoRA: integers, `ModelConfig.weight_quant`).
BASE_DTYPES = ("float32", "bfloat16", "int8", "int4")


def lora_section() -> ml_collections.ConfigDict:
    """`config.lora`: the ModelConfig fields of LoRA (`lora_rank` as `rank`, ...) plus the frozen base."""
    s = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if f.metadata.get("section") == "lora":
            s[f.metadata["key"]] = f.default
    # A run directory (llm_jax.main's or `convert from_hf`'s) whose newest checkpoint is the frozen
    # base the adapters train on; the run's checkpoints then hold the adapters only. Needs rank > 0.
    s.base = ""
    s.base_dtype = "float32"  # the frozen base's storage: one of BASE_DTYPES ('int8' / 'int4': QLoRA)
    return s


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """ModelConfig's fields from a run config: `config.model` plus the LoRA fields of `config.lora`
    (and `weight_quant` from an integer `base_dtype`)."""
    kw = config.model.to_dict()
    lora = config.get("lora") or lora_section()
    for f in dataclasses.fields(ModelConfig):
        if f.metadata.get("section") == "lora":
            kw[f.name] = lora[f.metadata["key"]]
    if lora.base_dtype in ("int8", "int4"):
        kw["weight_quant"] = lora.base_dtype
    return kw


def model_keys(cfg: ModelConfig) -> dict:
    """`config.model`'s keys and values of a ModelConfig (its fields but those of other sections)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if "section" not in f.metadata}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_section()
    c.lora = lora_section()

    c.data = d = ml_collections.ConfigDict()
    # 'stdlib' | 'text' | 'tfds' | 'jsonl' (prompt-completion) | 'parallel' (translation) | 'preference' (DPO)
    d.source = "stdlib"
    # source='text': a UTF-8 file, a glob or a comma-separated list (.jsonl: a document per line, .gz read
    # through gzip); 'jsonl': {"prompt", "completion"} lines; 'parallel': a directory (see below);
    # 'preference': {"prompt", "chosen", "rejected"} lines (llm_jax/data/preference.py)
    d.path = ""
    d.text_key = "text"  # source='text', .jsonl files: the field holding each document
    d.val_path = ""  # source='jsonl' / 'preference': validation examples (default: the last val_fraction of path)
    d.val_fraction = 0.1
    d.max_chars = 0  # >0: use at most this many characters of the source (quick runs)
    d.tfds_name = ""  # source='tfds': e.g. 'tiny_shakespeare', 'lm1b', 'c4/en'
    d.tfds_data_dir = ""
    d.tfds_train_split = "train"
    d.tfds_val_split = "validation"
    d.tfds_text_key = "text"
    d.max_docs = 0  # >0: at most this many documents per tfds split
    d.tokenizer = "byte"  # 'byte' | 'char' | 'sentencepiece' | 'hf'
    d.vocab_size = 2048  # sentencepiece vocabulary size
    d.tokenizer_path = ""  # tokenizer='hf': a tokenizer.json
    d.tokenizer_train_chars = 5_000_000  # sentencepiece is trained on at most this much text
    d.seq_len = 128
    d.packing = "none"  # 'none' | 'documents' (attention and positions restart at each document)
    d.long_documents = False  # True: every window inside one document of >= seq_len + 1 tokens (long context)
    # Prepared token files (llm_jax/data/prepare.py): '' = $LLM_JAX_CACHE or ~/.cache/llm_jax; share it across hosts
    d.cache_dir = ""
    d.prepare_workers = 0  # tokenizing processes; 0: one per core (none under 16 MB of text)
    d.prepare_shard_mb = 32.0  # text per shard (and per prepare task)
    # What of each file's content keys the prepared set (with its size and mtime): 'fast' (its head, tail
    # and sampled blocks) | 'full' (every byte, read once per run start)
    d.verify = "fast"
    # source='parallel': {path}/{split}.{lang}[.gz], aligned line by line (llm_jax/data/parallel.py).
    d.src_lang = "en"
    d.tgt_lang = "de"
    d.train_split = "train"
    d.val_split = "val"

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.schedule = "cosine"  # 'cosine' | 'constant' (both after linear warmup)
    o.warmup_steps = 100
    o.decay_steps = 0  # 0: train.num_steps
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.grad_clip = 1.0

    c.train = t = ml_collections.ConfigDict()
    # 'lm' (the family's loss) | 'dpo' (a LoRA run: the base is the reference) | 'simpo' (no reference);
    # 'dpo' and 'simpo' train on source='preference' pairs (llm_jax/models/preference.py)
    t.objective = "lm"
    t.batch_size = 32  # global, across all devices and processes (preference objectives: 2 rows per pair)
    t.grad_accum_steps = 1  # micro-batches per update (batch_size must divide)
    t.num_steps = 1000
    t.log_every = 50
    t.eval_every = 250
    t.eval_steps = 20  # validation batches per evaluation (a fixed set)
    t.eval_batch_size = 0  # 0: train.batch_size
    t.target_eval_loss = 0.0  # >0: stop (and save) once the validation loss reaches it
    t.checkpoint_every = 500
    t.keep_checkpoints = 3
    t.on_nan = "stop"  # non-finite loss/grads: 'stop' (raise, naming the step) | 'skip' (drop that update)
    # A checkpoint is written only if the loss of the state to save is at most spike_factor times the
    # running mean of the training loss (and 1 above it); otherwise the run stops, naming the last good
    # checkpoint. 0: no check.
    t.spike_factor = 10.0
    t.wait_for_lock = 0.0  # seconds to wait for another run that holds the workdir (0: refuse at once)
    t.overwrite = False  # workdir holds another model's run: True moves it aside (never deleted) and starts over
    t.sample_every = 0  # 0: only at the end
    t.sample_prompt = ""
    t.sample_tokens = 200
    t.sample_temperature = 0.8
    t.sample_top_k = 0
    t.decode_eval_every = 0  # >0: every this many steps (and at the end), the family's decoding metrics (BLEU)
    t.decode_eval_examples = 0  # validation examples they use; 0: all
    # lm-eval tasks while training (the `eval` extra; llm_jax/evaluation/periodic.py, run by llm_jax.main):
    # task names or task YAML files, comma-separated; scores logged as tasks/<task>/<metric>.
    t.eval_tasks = ""
    t.eval_tasks_every = 0  # >0: every this many steps and at the end; 0: at the end only
    t.eval_tasks_limit = 0  # examples per task at most; 0: all
    t.eval_tasks_include_path = ""  # a directory of extra task YAML files

    # Preference tuning (config.train.objective 'dpo' / 'simpo').
    c.pref = pf = ml_collections.ConfigDict()
    pf.beta = 0.0  # the rewards' scale; 0: the objective's default (dpo 0.1, simpo 2.0)
    pf.gamma = 1.0  # simpo: the target reward margin

    # Beam search (translation: llm_jax.translate and the trainer's BLEU).
    c.decode = dc = ml_collections.ConfigDict()
    dc.beam_size = 4
    dc.length_penalty = 0.6  # GNMT alpha; 0: none
    dc.max_len_a = 1.5  # a translation has at most max_len_a * source tokens + max_len_b tokens
    dc.max_len_b = 10
    dc.batch_size = 64

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # -1: all devices not used by the other axes
    ms.fsdp = 1
    ms.expert = 1  # experts of mixture-of-experts layers sharded over it
    ms.sequence = 1  # context parallelism: activations sharded along the sequence
    ms.tensor = 1
    return c


def pretraining(c: ml_collections.ConfigDict, *, seq_len: int, batch_size: int, lr: float) -> ml_collections.ConfigDict:
    """`c` set up to pre-train a large decoder on GPUs or TPUs (the billion-parameter presets):
    bfloat16 compute with float32 parameters, scanned layers (one layer's compile), remat of all but
    the matmuls, the fused attention kernel, FSDP over every device, AdamW with a long cosine."""
    c.model.update(scan_layers=True, remat="dots", attention="dot_product", dtype="bfloat16", param_dtype="float32")
    c.model.dropout_rate = 0.0
    c.data.seq_len = seq_len
    c.optim.update(lr=lr, warmup_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.train.update(batch_size=batch_size, num_steps=100_000, log_every=50, eval_every=2000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


def cpu_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` shrunk to a seconds-long CPU run on the standard library's sources (a preset's `tiny`):
    float32, unscanned, byte tokens, 10 steps at a learning rate that moves the loss in them."""
    c.model.update(scan_layers=False, remat="none", dtype="float32", attention="einsum")
    c.optim.update(lr=3e-3, warmup_steps=2)
    c.data.update(source="stdlib", tokenizer="byte", tokenizer_path="", seq_len=64, max_chars=300_000)
    c.train.update(
        batch_size=8, num_steps=10, log_every=5, eval_every=10, eval_steps=2, checkpoint_every=10, sample_tokens=32
    )
    return c


# The config.data keys that belong to some sources only (every other data key serves them all):
# key -> the sources that read it. Prepared token files (llm_jax/data/prepare.py) serve the sources
# that stream text; 'jsonl' and 'parallel' tokenize in memory.
_STREAMED = ("stdlib", "text", "tfds")
SOURCE_KEYS = {
    "path": ("text", "jsonl", "parallel", "preference"),
    "text_key": ("text",),
    "val_path": ("jsonl", "preference"),
    "val_fraction": ("stdlib", "text", "jsonl", "preference"),
    "max_chars": ("stdlib", "text"),
    "tfds_name": ("tfds",),
    "tfds_data_dir": ("tfds",),
    "tfds_train_split": ("tfds",),
    "tfds_val_split": ("tfds",),
    "tfds_text_key": ("tfds",),
    "max_docs": ("tfds",),
    "long_documents": _STREAMED,
    "cache_dir": _STREAMED,
    "prepare_workers": _STREAMED,
    "prepare_shard_mb": _STREAMED,
    "verify": ("stdlib", "text"),
    "src_lang": ("parallel",),
    "tgt_lang": ("parallel",),
    "train_split": ("parallel",),
    "val_split": ("parallel",),
}
SOURCES = ("stdlib", "text", "tfds", "jsonl", "parallel", "preference")


# ----------------------------------------------------------------------------------------------
# Checks


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (empty dicts stay leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def renamed_key_message(key: str) -> str | None:
    """'config.OLD is now config.NEW' for a key renamed since a run or script was written, else None."""
    key = key.removeprefix("config.")
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return f"config.{key} is now config.{new}"
    return None


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Unknown keys are errors: a config file that sets `c.train.chekpoint_every` must not run silently;
    so is a data key of another source than the run's (`check_source_keys`)."""
    known = flatten(base_config().to_dict())
    given = flatten(config.to_dict())
    bad = [k for k in given if k not in known and not any(k == o or k.startswith(o + ".") for o in OPTIONAL_KEYS)]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, known, n=1)
            renamed = renamed_key_message(k)
            hints.append(renamed or f"config.{k}" + (f" (did you mean config.{close[0]}?)" if close else ""))
        raise BadValue(
            f"unknown config key{'s' if len(bad) > 1 else ''}: {', '.join(hints)}. Every key is defined in "
            "llm_jax/training/config.py:base_config(); fix the spelling in the config file or on the command line"
        )
    check_source_keys(config.data)


def foreign_keys(data: ml_collections.ConfigDict) -> list[str]:
    """The keys of `config.data` that the run's source does not read (SOURCE_KEYS), in table order."""
    return [k for k, sources in SOURCE_KEYS.items() if data.source not in sources]


def check_source_keys(data: ml_collections.ConfigDict) -> None:
    """A data key of another source set away from its default is an error naming the key, its
    source(s) and the run's: the run would silently ignore it (e.g. src_lang on a 'text' run)."""
    if data.source not in SOURCES:
        return  # the data loaders name the bad source, with the choices
    defaults = base_config().data
    for key in foreign_keys(data):
        if key in data and data[key] != defaults[key]:
            owners = " or ".join(repr(s) for s in SOURCE_KEYS[key])
            raise BadValue(
                f"config.data.{key}={data[key]!r} is a key of source={owners}, but config.data.source="
                f"{data.source!r}; remove it or set the source"
            )


def check_train(tc) -> None:
    """Values of `config.train` that no later step would catch before they do harm."""
    if tc.on_nan not in ("stop", "skip"):
        raise BadValue(f"config.train.on_nan={tc.on_nan!r}: use 'stop' or 'skip'")
    if tc.spike_factor != 0 and not tc.spike_factor > 1:
        raise BadValue(f"config.train.spike_factor={tc.spike_factor} must be above 1 (e.g. 10), or 0 for no check")
    if not tc.wait_for_lock >= 0:
        raise BadValue(f"config.train.wait_for_lock={tc.wait_for_lock} must be a number of seconds >= 0")
    for name in (
        "num_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "batch_size",
        "grad_accum_steps",
        "eval_steps",
    ):
        if not tc[name] > 0:
            raise _value_error(f"train.{name}", tc[name], "must be positive")
    for name in ("eval_tasks_every", "eval_tasks_limit"):
        if tc.get(name, 0) < 0:
            raise BadValue(
                f"config.train.{name}={tc[name]} must be >= 0 (0: {'at the end' if 'every' in name else 'all'})"
            )


# The numeric keys of config.optim, config.decode and config.train beyond `check_train`'s, with
# their range (config.data: `check_data`; config.model: ModelConfig's own checks).
# Each is checked before any data is prepared or any file written (`check_values`).
_POSITIVE = ("optim.lr", "optim.eps", "decode.beam_size", "decode.batch_size")
_NON_NEGATIVE = (
    "optim.warmup_steps", "optim.decay_steps",
    "optim.weight_decay", "optim.grad_clip", "train.eval_batch_size", "train.target_eval_loss",
    "train.sample_every", "train.sample_tokens", "train.sample_temperature", "train.sample_top_k",
    "train.decode_eval_every", "train.decode_eval_examples", "decode.length_penalty", "decode.max_len_a",
    "decode.max_len_b",
)  # fmt: skip
# key -> (low, high, whether high itself is allowed): fractions and rates.
_FRACTIONS = {"optim.min_lr_ratio": (0.0, 1.0, True), "optim.b1": (0.0, 1.0, False), "optim.b2": (0.0, 1.0, False)}
# Text per prepare task and shard, in MB: below this, millions of tiny files; above, one worker's
# piece of text no longer fits a host's memory comfortably.
SHARD_MB_RANGE = (0.01, 4096.0)


def _value_error(key: str, value, rule: str) -> BadValue:
    default = base_config()
    for part in key.split("."):
        default = default[part]
    return BadValue(f"config.{key}={value!r} {rule}; the default is {default!r}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Sizes, lengths, fractions and rates of every section (and `ModelConfig`'s own checks), one
    line naming the key and the fix; run before any data is prepared or any file written."""
    check_train(config.train)
    ModelConfig(**model_kwargs(config))  # its checks (dropout_rate, sizes) before the data is prepared
    check_lora(config.lora)
    check_objective(config)
    flat = flatten(config.to_dict())
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise _value_error(key, flat[key], "must be positive")
    for key in _NON_NEGATIVE:
        if not flat[key] >= 0:
            raise _value_error(key, flat[key], "must be >= 0")
    for key, (lo, hi, closed) in _FRACTIONS.items():
        if not (lo <= flat[key] <= hi if closed else lo <= flat[key] < hi):
            raise _value_error(key, flat[key], f"must be in [{lo:g}, {hi:g}{']' if closed else ')'}")
    check_data(config.data)


def check_lora(lora: ml_collections.ConfigDict) -> None:
    """`config.lora`: a base needs adapters, adapters need a base; the base's storage type known."""
    if lora.base_dtype not in BASE_DTYPES:
        raise _value_error("lora.base_dtype", lora.base_dtype, f"must be one of {list(BASE_DTYPES)}")
    if lora.rank < 0:
        raise _value_error("lora.rank", lora.rank, "must be 0 (no adapters) or positive")
    if lora.rank and not lora.base:
        raise BadValue(
            f"config.lora.rank={lora.rank} needs the frozen base: set config.lora.base to a run directory "
            "(one written by llm_jax.main or `llm_jax.convert from_hf`)"
        )
    if lora.base and not lora.rank:
        raise BadValue(f"config.lora.base={lora.base!r} is set but config.lora.rank=0: set a rank (e.g. 16)")
    if lora.base_dtype != "float32" and not lora.rank:
        raise BadValue(f"config.lora.base_dtype={lora.base_dtype!r} is for a LoRA run: set config.lora.rank")


def check_objective(config: ml_collections.ConfigDict) -> None:
    """`config.train.objective` and `config.pref`: a preference objective trains a decoder-only model
    on preference pairs (and those pairs need one); DPO's reference is a LoRA run's base."""
    objective, source = config.train.objective, config.data.source
    if objective not in preference.OBJECTIVES:
        raise _value_error("train.objective", objective, f"must be one of {list(preference.OBJECTIVES)}")
    if (objective == "lm") != (source != "preference"):
        raise BadValue(
            f"config.train.objective={objective!r} with config.data.source={source!r}: preference pairs train with "
            "objective 'dpo' or 'simpo' (configs/dpo.py), and those objectives need source='preference'"
        )
    if objective != "lm" and (config.model.family or "lm") != "lm":
        raise BadValue(f"config.train.objective={objective!r} trains a decoder-only model: config.model.family='lm'")
    if objective == "dpo" and not config.lora.rank:
        raise BadValue(
            "config.train.objective='dpo' needs a LoRA run (config.lora.rank and config.lora.base; configs/dpo.py): "
            "its reference policy is the frozen base with the adapters off. Full fine-tuning DPO is not supported; "
            "objective='simpo' needs no reference"
        )
    for key in ("beta", "gamma"):
        if not config.pref[key] >= 0:
            raise _value_error(f"pref.{key}", config.pref[key], "must be >= 0")
    if objective != "simpo" and config.pref.gamma != base_config().pref.gamma:
        raise BadValue(f"config.pref.gamma={config.pref.gamma} is SimPO's margin; remove it or set objective='simpo'")


def check_data(data: ml_collections.ConfigDict) -> None:
    """The values of `config.data` that shape what is prepared (llm_jax.prepare checks only these)."""
    for key in ("seq_len", "tokenizer_train_chars"):
        if not data[key] > 0:
            raise _value_error(f"data.{key}", data[key], "must be positive")
    for key in ("max_chars", "max_docs", "prepare_workers"):
        if not data[key] >= 0:
            raise _value_error(f"data.{key}", data[key], "must be >= 0")
    if data.tokenizer == "sentencepiece" and not data.vocab_size > 0:
        raise _value_error("data.vocab_size", data.vocab_size, "must be positive for tokenizer='sentencepiece'")
    held_out = data.source in ("stdlib", "text") or (data.source in ("jsonl", "preference") and not data.val_path)
    if held_out and not 0 < data.val_fraction < 1:
        raise _value_error(
            "data.val_fraction", data.val_fraction, "must be in (0, 1): the share of the text held out for validation"
        )
    if data.verify not in ("fast", "full"):
        raise BadValue(f"config.data.verify={data.verify!r}: use 'fast' (sampled content hash) or 'full'")
    lo, hi = SHARD_MB_RANGE
    if data.source in _STREAMED and not lo <= data.prepare_shard_mb <= hi:
        raise _value_error(
            "data.prepare_shard_mb", data.prepare_shard_mb, f"must be in [{lo:g}, {hi:g}] (MB of text per shard)"
        )


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills in derived defaults (0 = 'same as ...'); returns a new, locked config."""
    c = ml_collections.ConfigDict(config.to_dict())
    if c.optim.decay_steps <= 0:
        c.optim.decay_steps = c.train.num_steps
    if c.train.eval_batch_size <= 0:
        c.train.eval_batch_size = c.train.batch_size
    if c.lora.base:  # read again by every later command, from any directory
        c.lora.base = os.path.abspath(c.lora.base)
    if c.pref.beta <= 0:
        c.pref.beta = preference.DEFAULT_BETA.get(c.train.objective, 0.0)
    c.lock()
    return c


def model_config(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> ModelConfig:
    """The frozen ModelConfig of a run: `ModelConfig(**config.model)`, its vocabulary resolved."""
    cfg = ModelConfig(**model_kwargs(config)).resolved(tokenizer_vocab)
    if config.data.seq_len > cfg.max_len:
        raise BadValue(
            f"config.data.seq_len={config.data.seq_len} is longer than the model's position table "
            f"config.model.max_len={cfg.max_len}; raise max_len or shorten seq_len"
        )
    return cfg


# ----------------------------------------------------------------------------------------------
# Saved runs


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=1, sort_keys=True)


def run_json(config: ml_collections.ConfigDict) -> str:
    """The config.json written into a run: `to_json` without the data keys of other sources than
    the run's, which check_source_keys keeps at their defaults (`load_run_config` fills them back
    in from base_config(), as for a key added since the run was saved)."""
    d = config.to_dict()
    if d.get("data", {}).get("source") in SOURCES:
        for key in foreign_keys(config.data):
            d["data"].pop(key, None)
    return json.dumps(d, indent=1, sort_keys=True)


def upgrade(saved: dict) -> dict:
    """A run's saved config dict in today's key layout (runs written before a key was renamed)."""
    saved = json.loads(json.dumps(saved))  # a deep copy
    model = saved.get("model")
    if not isinstance(model, dict):
        return saved
    rope = model.get("rope_scaling")
    if isinstance(rope, dict):
        for old, new in RENAMED_KEYS.items():
            leaf = old.rsplit(".", 1)[1]
            if leaf in rope:
                model[new.split(".", 1)[1]] = rope[leaf]
    for key, unset in _LEGACY_UNSET.items():
        if key in model and model[key] == unset:
            model[key] = None
        elif key in ("attention_bias", "mlp_bias") and model.get(key) in (0, 1):
            model[key] = bool(model[key])
    return saved


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's config.json laid over today's defaults (so runs saved before a key existed load).

    Raises FileNotFoundError when `workdir` has no config.json.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise NotFound(f"{path} does not exist: --workdir must be a run directory written by llm_jax.main")
    with open(path) as f:
        try:
            saved = upgrade(json.load(f))
        except json.JSONDecodeError as e:
            raise BadValue(f"{path} is not valid JSON ({e}); it is not a run's config, or it was damaged") from None
    config = base_config()
    config.update(saved)
    return config

"""The run config's full set of keys (configs/*.py start from `base_config()`) and the model config
derived from it.

Configs are `ml_collections.ConfigDict`s, nested by concern: `model`, `data`, `optim`, `train`,
`mesh`. Files in `configs/` override what they need; the command line overrides the rest
(`--config.optim.lr=1e-3`). Every key exists here, so a mistyped key on the command line is an error.
"""

from __future__ import annotations

import json

import ml_collections

from llm_jax.model import ModelConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.preset = "custom"  # informational: 'gpt2', 'llama', ...
    m.vocab_size = 0  # 0: the tokenizer's, padded up to vocab_multiple
    m.vocab_multiple = 128  # pad the vocab so it splits over tensor parallelism and matmul tiles
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention
    m.embed_dim = 128
    m.mlp_dim = 512
    m.head_dim = 0  # 0: embed_dim // num_heads
    m.max_len = 256  # position table / KV cache size; >= data.seq_len
    m.positions = "learned"  # 'learned' | 'rope'
    m.rope_theta = 10000.0
    # Hugging Face rope scaling (imported Llama 3.x / long-context checkpoints).
    m.rope_scaling = ml_collections.ConfigDict(
        dict(
            type="none",  # 'none' | 'linear' | 'llama3'
            factor=1.0,
            low_freq_factor=1.0,  # llama3 only
            high_freq_factor=4.0,  # llama3 only
            original_max_len=8192,  # llama3 only: the pre-training context
        )
    )
    m.norm = "layernorm"  # 'layernorm' | 'rmsnorm'
    m.norm_eps = 1e-5
    m.mlp_activation = "gelu"  # 'gelu' | 'swiglu'
    m.use_bias = True
    m.attention_bias = -1  # -1: same as use_bias; 0/1: q/k/v/out projection biases off/on
    m.mlp_bias = -1  # -1: same as use_bias; 0/1: MLP biases off/on
    m.dropout_rate = 0.0
    m.tie_embeddings = True
    m.scan_layers = False
    m.remat = "none"  # 'none' | 'full' | 'dots'
    m.attention = "einsum"  # 'einsum' | 'dot_product'
    m.loss_chunk = 0  # >0: cross-entropy in sequence chunks of this size, never the full [b, t, v] logits
    m.dtype = "float32"  # compute dtype ('bfloat16' for mixed precision)
    m.param_dtype = "float32"  # master weights
    m.init_std = 0.02

    c.data = d = ml_collections.ConfigDict()
    d.source = "stdlib"  # 'stdlib' | 'text' | 'tfds' | 'jsonl' (prompt-completion fine-tuning)
    d.path = ""  # source='text': a UTF-8 text file; 'jsonl': {"prompt", "completion"} lines
    d.val_path = ""  # source='jsonl': validation examples (default: the last val_fraction of path)
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
    t.batch_size = 32  # global, across all devices and processes
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
    t.overwrite = False  # workdir holds another model's run: True moves it aside (never deleted) and starts over
    t.sample_every = 0  # 0: only at the end
    t.sample_prompt = ""
    t.sample_tokens = 200
    t.sample_temperature = 0.8
    t.sample_top_k = 0

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # -1: all devices not used by the other axes
    ms.fsdp = 1
    ms.tensor = 1
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills in derived defaults (0 = 'same as ...'); returns a new, locked config."""
    c = ml_collections.ConfigDict(config.to_dict())
    if c.optim.decay_steps <= 0:
        c.optim.decay_steps = c.train.num_steps
    if c.train.eval_batch_size <= 0:
        c.train.eval_batch_size = c.train.batch_size
    c.lock()
    return c


def model_config(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> ModelConfig:
    """The frozen ModelConfig of a run: vocabulary from the tokenizer, padded to `vocab_multiple`."""
    m = config.model
    vocab = m.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ValueError(
            f"config.model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
            "set it to 0 (use the tokenizer's) or to at least that"
        )
    if m.vocab_multiple > 1:
        vocab = -(-vocab // m.vocab_multiple) * m.vocab_multiple
    if config.data.seq_len > m.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} is longer than the model's position table "
            f"config.model.max_len={m.max_len}; raise max_len or shorten seq_len"
        )
    return ModelConfig(
        vocab_size=vocab,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads or None,
        embed_dim=m.embed_dim,
        mlp_dim=m.mlp_dim,
        head_dim=m.head_dim or None,
        max_len=m.max_len,
        positions=m.positions,
        rope_theta=m.rope_theta,
        rope_scaling=m.rope_scaling.type,
        rope_scaling_factor=m.rope_scaling.factor,
        rope_low_freq_factor=m.rope_scaling.low_freq_factor,
        rope_high_freq_factor=m.rope_scaling.high_freq_factor,
        rope_original_max_len=m.rope_scaling.original_max_len,
        norm=m.norm,
        norm_eps=m.norm_eps,
        mlp_activation=m.mlp_activation,
        use_bias=m.use_bias,
        attention_bias=None if m.attention_bias < 0 else bool(m.attention_bias),
        mlp_bias=None if m.mlp_bias < 0 else bool(m.mlp_bias),
        dropout_rate=m.dropout_rate,
        tie_embeddings=m.tie_embeddings,
        scan_layers=m.scan_layers,
        remat=m.remat,
        attention=m.attention,
        loss_chunk=m.loss_chunk,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        init_std=m.init_std,
    )


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=1, sort_keys=True)

"""`ModelConfig`: the one frozen dataclass that defines a network (both families).

Every architecture llm_jax builds, from GPT-2 to Gemma 3, is a setting of these fields on the
shared blocks of `llm_jax/models/model.py` and `llm_jax/models/attention.py`; the Hugging Face
tables (`llm_jax/interop/hf_specs.py`) map each checkpoint's config.json onto them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.runtime.errors import BadValue

ATTENTIONS = ("einsum", "dot_product", "blockwise", "splash", "cudnn")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _runtime(default):
    """A field that changes how the model computes, not its parameters: a resumed run may change it."""
    return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network. Frozen: hashable, safe as a jit static argument.

    The run config's `config.model` section is made of exactly these fields (llm_jax/training/config.py builds
    it from them), and `ModelConfig(**config.model)` reads it back: a new field is one edit here.
    None means "unset" wherever a field has a derived default.
    """

    family: str = "lm"  # the model family (llm_jax/models/family.py): 'lm' = decoder-only, 'encdec' = encoder-decoder
    preset: str = _runtime("custom")  # informational: 'gpt2-small', 'llama-1b', 'hf:gpt2', ...
    vocab_size: int | None = None  # None: the tokenizer's; either way padded up to vocab_multiple
    vocab_multiple: int = 128  # so the vocabulary splits over tensor parallelism and matmul tiles
    num_layers: int = 4  # decoder blocks (the only stack of a decoder-only LM)
    num_encoder_layers: int | None = None  # encdec: encoder blocks; None: num_layers
    share_embeddings: bool = True  # encdec: source and target read one table (a joint vocabulary)
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: multi-head; fewer than num_heads: grouped-query attention
    embed_dim: int = 128
    mlp_dim: int = 512
    head_dim: int | None = None  # None: embed_dim // num_heads
    max_len: int = 256  # size of the learned position table; the longest sequence the model accepts
    positions: str = "learned"  # 'learned' | 'rope' | 'sinusoidal' (the original Transformer's, no parameters)
    rope_theta: float = 10000.0
    # Hugging Face rope scaling: 'none' | 'linear' (frequencies / factor) | 'llama3' (Llama 3.1).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the context length of pre-training
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5
    mlp_activation: str = "gelu"  # 'gelu' | 'swiglu' (silu gate) | 'geglu' (tanh-GELU gate, Gemma)
    use_bias: bool = True
    attention_bias: bool | None = None  # q/k/v/out projection biases; None: use_bias
    mlp_bias: bool | None = None  # MLP biases; None: use_bias
    attention_out_bias: bool | None = None  # the output projection's bias; None: attention_bias (Qwen2: False)
    # Per-layer attention kind, cycled over the layers: 'g' = global (causal over everything), 'l' =
    # local (the last `sliding_window` positions, itself included). 'g' everywhere is the classic
    # model; Mistral is 'l'; Gemma 2 'lg' (layer 0 local, 1 global, ...); Gemma 3 'lllllg'.
    layer_pattern: str = "g"
    sliding_window: int | None = None  # local layers' window (positions seen, self included)
    local_rope_theta: float | None = None  # local layers' RoPE base, unscaled (Gemma 3); None: as global layers
    qk_norm: bool = False  # RMSNorm over the head dim of queries and keys before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale), scale initialised at 0 (Gemma)
    post_norms: bool = False  # each sublayer's output is normed before the residual add (Gemma 2/3)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(embed_dim) (Gemma)
    query_scale: float | None = None  # attention logits scaled by query_scale**-0.5 (Gemma); None: head_dim
    attn_softcap: float | None = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # output logits -> cap * tanh(logits / cap) (Gemma 2)
    # Mixture of experts (llm_jax/models/moe.py): MoE layers replace the dense MLP by `num_experts`
    # gated MLPs, of which a router picks `experts_per_token` per token (Mixtral, Qwen3-MoE, OLMoE).
    num_experts: int = 0  # 0: the dense MLP in every layer
    experts_per_token: int = 2  # top-k
    expert_mlp_dim: int | None = None  # each expert's hidden size; None: mlp_dim
    moe_every: int = 1  # layer i is MoE iff i >= moe_first_dense and (i - moe_first_dense) % moe_every == 0
    moe_first_dense: int = 0  # the first layers stay dense (DeepSeek's first_k_dense_replace)
    router_score: str = "softmax"  # 'softmax' (Mixtral, Qwen3-MoE) | 'sigmoid' (DeepSeek-V3) over the experts
    norm_topk: bool = True  # the top-k weights renormalised to sum to 1
    num_shared_experts: int = 0  # experts every token goes through, one dense MLP beside the routed ones
    shared_expert_dim: int | None = None  # each shared expert's hidden size; None: expert_mlp_dim
    # 'dropless' (sorted tokens, ragged_dot grouped matmuls: GPU/TPU) | 'blocks' (dropless in padded
    # blocks, fast on CPU) | 'capacity' (ceil(cf * tokens * k / E) per expert, overflow dropped)
    moe_dispatch: str = _runtime("dropless")
    capacity_factor: float = _runtime(1.25)  # 'capacity': each expert takes ceil(cf * tokens * k / E) copies
    aux_loss_weight: float = _runtime(0.01)  # load-balancing loss E * sum_e f_e * P_e (Switch, Mixtral)
    router_z_weight: float = _runtime(0.001)  # router z-loss: mean logsumexp(logits)^2 (ST-MoE)
    dropout_rate: float = _runtime(0.0)
    tie_embeddings: bool = True
    scan_layers: bool = False  # one compiled block applied num_layers times (params stacked on 'layers')
    remat: str = _runtime("none")  # 'none' | 'full' | 'dots'
    # 'einsum' (reference) | 'dot_product' (jax.nn.dot_product_attention) | 'blockwise' (flash-style, pure
    # JAX: memory linear in the length) | 'splash' (TPU kernel) | 'cudnn' (GPU kernel); llm_jax/models/kernels.py
    attention: str = _runtime("einsum")
    attention_block: int = _runtime(512)  # 'blockwise' / 'splash': query and key rows per block
    loss_chunk: int = _runtime(0)  # >0: the training loss projects and soft-maxes this many positions at a time
    label_smoothing: float = _runtime(0.0)  # training loss only: this much target mass spread over the vocabulary
    dtype: str = _runtime("float32")  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the (master) weights
    # Weight-only quantization of every dense kernel (`layers.Dense`): 'none' | 'int8' | 'int4', a float32
    # scale per output channel. Set by `generate/translate/evaluate --quant` and by QLoRA's base_dtype.
    weight_quant: str = _runtime("none")
    # LoRA adapters (`layers.Dense`), set from the run config's `config.lora` section (not config.model):
    # rank 0 = none; `lora_targets`: layer names or regexes over parameter paths, comma-separated.
    lora_rank: int = dataclasses.field(default=0, metadata={"section": "lora", "key": "rank"})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"section": "lora", "key": "alpha"})
    lora_targets: str = dataclasses.field(default="query,key,value,out", metadata={"section": "lora", "key": "targets"})
    lora_dropout: float = dataclasses.field(
        default=0.0, metadata={"section": "lora", "key": "dropout", "runtime": True}
    )
    init_std: float = 0.02

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise BadValue(f"ModelConfig: {msg}")

        need(
            self.vocab_size is None or self.vocab_size > 0,
            f"vocab_size={self.vocab_size} must be positive (leave it unset for the tokenizer's vocabulary)",
        )
        need(self.vocab_multiple > 0, f"vocab_multiple={self.vocab_multiple} must be positive")
        need(self.num_layers > 0, f"num_layers={self.num_layers} must be positive")
        need(self.num_heads > 0, f"num_heads={self.num_heads} must be positive")
        need(
            self.head_dim is not None or self.embed_dim % self.num_heads == 0,
            f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
            "change one of them or set head_dim",
        )
        need(
            self.num_heads % self.kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}",
        )
        need(
            self.positions in ("learned", "rope", "sinusoidal"),
            f"positions={self.positions!r}: use 'learned', 'rope' or 'sinusoidal'",
        )
        need(self.num_encoder_layers is None or self.num_encoder_layers > 0, "num_encoder_layers must be positive")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(
            self.positions != "rope" or self.dim_per_head % 2 == 0,
            f"rope needs an even head_dim, got {self.dim_per_head}",
        )
        need(
            self.rope_scaling in ("none", "linear", "llama3"),
            f"rope_scaling={self.rope_scaling!r}: use 'none', 'linear' or 'llama3'",
        )
        need(self.rope_scaling_factor > 0, f"rope_scaling_factor={self.rope_scaling_factor} must be positive")
        need(
            self.rope_scaling != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor,
            f"llama3 rope scaling needs rope_high_freq_factor={self.rope_high_freq_factor} > "
            f"rope_low_freq_factor={self.rope_low_freq_factor}",
        )
        need(self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'")
        need(
            self.mlp_activation in ("gelu", "swiglu", "geglu"),
            f"mlp_activation={self.mlp_activation!r}: use 'gelu', 'swiglu' or 'geglu'",
        )
        need(
            self.layer_pattern and set(self.layer_pattern) <= {"g", "l"},
            f"layer_pattern={self.layer_pattern!r}: use a string of 'g' (global) and 'l' (local) layers, e.g. 'lg'",
        )
        need(
            "l" not in self.layer_pattern or (self.sliding_window or 0) > 0,
            f"layer_pattern={self.layer_pattern!r} has local layers: set sliding_window to a positive window",
        )
        need(
            self.sliding_window is None or self.sliding_window > 0,
            f"sliding_window={self.sliding_window} must be positive (or unset)",
        )
        need(
            self.family == "lm" or self.layer_pattern == "g",
            "local layers (layer_pattern with 'l') are decoder-only; the encoder-decoder uses 'g'",
        )
        for name in ("query_scale", "attn_softcap", "final_softcap", "local_rope_theta"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name}={value} must be positive (or unset)")
        need(not self.qk_norm or self.norm == "rmsnorm", "qk_norm is an RMSNorm: set norm='rmsnorm'")
        need(not self.norm_plus_one or self.norm == "rmsnorm", "norm_plus_one is an RMSNorm form: set norm='rmsnorm'")
        need(self.remat in ("none", "full", "dots"), f"remat={self.remat!r}: use 'none', 'full' or 'dots'")
        need(self.attention in ATTENTIONS, f"attention={self.attention!r}: use one of {', '.join(ATTENTIONS)}")
        need(self.attention_block > 0, f"attention_block={self.attention_block} must be positive")
        need(
            not (self.attention == "cudnn" and self.attn_softcap),
            "attention='cudnn' has no soft-capping (attn_softcap): use 'splash' on TPU or 'blockwise'",
        )
        need(self.loss_chunk >= 0, f"loss_chunk={self.loss_chunk} must be 0 (off) or a positive chunk length")
        need(self.dtype in _DTYPES, f"dtype={self.dtype!r}: use one of {sorted(_DTYPES)}")
        need(self.param_dtype in _DTYPES, f"param_dtype={self.param_dtype!r}: use one of {sorted(_DTYPES)}")
        need(0.0 <= self.dropout_rate < 1.0, f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        self._check_moe(need)
        self._check_post_training(need)

    def _check_post_training(self, need):
        need(
            self.weight_quant in ("none", "int8", "int4"),
            f"weight_quant={self.weight_quant!r}: use 'none', 'int8' or 'int4'",
        )
        need(self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be 0 (no adapters) or positive")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        need(
            not self.lora_rank or self.lora_target_list,
            "lora_targets is empty: name the layers to adapt, e.g. 'query,value'",
        )

    def _check_moe(self, need):
        need(self.num_experts >= 0, f"num_experts={self.num_experts} must be 0 (dense) or positive")
        if not self.num_experts:
            return
        need(
            0 < self.experts_per_token <= self.num_experts,
            f"experts_per_token={self.experts_per_token} must be in [1, num_experts={self.num_experts}]",
        )
        need(self.expert_mlp_dim is None or self.expert_mlp_dim > 0, "expert_mlp_dim must be positive (or unset)")
        need(self.moe_every > 0, f"moe_every={self.moe_every} must be positive")
        need(
            0 <= self.moe_first_dense < self.num_layers,
            f"moe_first_dense={self.moe_first_dense} must be in [0, num_layers={self.num_layers})",
        )
        need(
            self.router_score in ("softmax", "sigmoid"),
            f"router_score={self.router_score!r}: use 'softmax' or 'sigmoid'",
        )
        need(self.num_shared_experts >= 0, f"num_shared_experts={self.num_shared_experts} must be 0 or positive")
        need(self.shared_expert_dim is None or self.shared_expert_dim > 0, "shared_expert_dim must be positive")
        need(
            self.moe_dispatch in ("dropless", "blocks", "capacity"),
            f"moe_dispatch={self.moe_dispatch!r}: use 'dropless', 'blocks' or 'capacity'",
        )
        need(self.capacity_factor > 0, f"capacity_factor={self.capacity_factor} must be positive")
        need(
            self.aux_loss_weight >= 0 and self.router_z_weight >= 0,
            "aux_loss_weight and router_z_weight must be 0 (off) or positive",
        )
        need(
            self.mlp_activation in ("swiglu", "geglu"),
            f"experts are gated MLPs: set mlp_activation='swiglu' (or 'geglu'), not {self.mlp_activation!r}",
        )
        need(
            self.family == "lm",
            "mixture-of-experts layers are decoder-only: set num_experts=0 for the encoder-decoder",
        )
        need(
            not self.scan_layers or (self.moe_every == 1 and self.moe_first_dense == 0),
            f"scan_layers needs every layer MoE (moe_every=1, moe_first_dense=0), not moe_every={self.moe_every} "
            f"and moe_first_dense={self.moe_first_dense}; set scan_layers=False",
        )

    def resolved(self, tokenizer_vocab: int) -> ModelConfig:
        """This config with its final vocabulary: vocab_size (or the tokenizer's) padded to vocab_multiple."""
        vocab = self.vocab_size or tokenizer_vocab
        if vocab < tokenizer_vocab:
            raise BadValue(
                f"config.model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
                "leave it unset (the tokenizer's) or set it to at least that"
            )
        return dataclasses.replace(self, vocab_size=-(-vocab // self.vocab_multiple) * self.vocab_multiple)

    @property
    def encoder_layers(self) -> int:
        return self.num_encoder_layers or self.num_layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attention_use_bias(self) -> bool:
        return self.use_bias if self.attention_bias is None else self.attention_bias

    @property
    def attention_out_use_bias(self) -> bool:
        return self.attention_use_bias if self.attention_out_bias is None else self.attention_out_bias

    def is_local(self, layer: int | jax.Array) -> bool | jax.Array:
        """Whether layer `layer` (an int, or a traced index under scan_layers) attends locally:
        a Python bool when that is known statically, else a traced bool."""
        if set(self.layer_pattern) == {"g"} or set(self.layer_pattern) == {"l"}:
            return self.layer_pattern[0] == "l"
        if isinstance(layer, int):
            return self.layer_pattern[layer % len(self.layer_pattern)] == "l"
        pattern = jnp.array([c == "l" for c in self.layer_pattern])
        return pattern[layer % len(self.layer_pattern)]

    def is_moe(self, layer: int | jax.Array) -> bool:
        """Whether layer `layer` has the mixture-of-experts MLP. Under scan_layers (a traced index)
        every layer is MoE or none is (the config checks it)."""
        if not self.num_experts:
            return False
        if not isinstance(layer, int):
            return True
        return layer >= self.moe_first_dense and (layer - self.moe_first_dense) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        """How many layers are MoE."""
        return sum(self.is_moe(i) for i in range(self.num_layers))

    @property
    def expert_dim(self) -> int:
        """Each routed expert's hidden size."""
        return self.expert_mlp_dim or self.mlp_dim

    @property
    def shared_dim(self) -> int:
        """The hidden size of the shared experts together (one dense MLP); 0 without them."""
        return self.num_shared_experts * (self.shared_expert_dim or self.expert_dim)

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def mlp_use_bias(self) -> bool:
        return self.use_bias if self.mlp_bias is None else self.mlp_bias

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]


# Fields a resumed run may change (see `_runtime`).
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("runtime"))

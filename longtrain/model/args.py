"""Model arguments for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) and a size registry."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# The Hugging Face architectures one decoder covers; the differences are a few named args.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face `layer_types` values we run


@dataclass
class ModelArgs:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    head_dim: int = 128  # Qwen3 and Mistral-Nemo set it apart from dim / n_heads
    intermediate_size: int = 11008  # SwiGLU hidden width
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096  # as written in config.json (see hf.py for its per-rope meaning)
    # RoPE in transformers-5 `rope_parameters` form, rope_theta included (see rope.py).
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_embeddings: bool = False  # Llama 3.2 1B/3B tie the output projection to the embedding
    qkv_bias: bool = False  # Qwen2; Llama's `attention_bias` sets qkv_bias and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1, Qwen2 `use_sliding_window`; None: full causal attention
    # Per layer "full_attention" or "sliding_attention" (Qwen2/Qwen3 `layer_types`, derived from
    # `max_window_layers`); None: every layer uses `sliding_window` (Mistral).
    layer_types: list[str] | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Export bookkeeping (hf.py), so that save_hf(load_hf(x)) writes an equivalent directory:
    # config.json keys longtrain does not interpret (pad_token_id, max_window_layers, ...), written back as read,
    hf_extra: dict = field(default_factory=dict)
    # and the directory the model was loaded from (tokenizer and generation_config.json are copied from it).
    source_dir: str | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types has {bad}; allowed: {', '.join(LAYER_TYPES)}")

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer: `sliding_window` where the layer slides, else None."""
        if self.layer_types is None:
            return [self.sliding_window] * self.n_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]

    def num_params(self, include_embedding: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.intermediate_size
        norms = 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)
        body = self.n_layers * (attn + mlp + norms) + self.dim
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_embeddings else emb
        return body + out + (emb if include_embedding else 0)


# Named sizes. `debug` is tiny for tests; the others are the shapes used in benchmarks (random init).
MODEL_FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, max_position_embeddings=256),
    "llama3.2-1b": ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                             intermediate_size=8192, norm_eps=1e-5, max_position_embeddings=131072,
                             rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                             tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama3.2-3b": ModelArgs(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                             intermediate_size=8192, norm_eps=1e-5, max_position_embeddings=131072,
                             rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                             tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama3.1-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                             intermediate_size=14336, norm_eps=1e-5, max_position_embeddings=131072,
                             rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                             bos_token_id=128000, eos_token_id=128001),
}


def model_flavor(name: str, **overrides) -> ModelArgs:
    if name not in MODEL_FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; valid: {', '.join(MODEL_FLAVORS)}")
    return replace(MODEL_FLAVORS[name], **overrides)

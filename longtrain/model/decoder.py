"""One decoder for the Llama family: RMSNorm, GQA attention with RoPE, SwiGLU MLP.

Reads top to bottom: RMSNorm, Attention, MLP, Block, Transformer. The model knows nothing of meshes
or ranks; attention goes through an `AttentionFn` (kernels/attention.py) that parallel code may swap
(`set_attention`) for a context-parallel one.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.kernels.attention import AttentionFn, AttnMask, attention_reference
from longtrain.model.args import ModelArgs
from longtrain.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back before the weight, as Hugging Face Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.attn_fn: AttentionFn = attention_reference
        # RoPE application; parallel/fused_kernels.py swaps in the fused Triton one (same signature).
        self.rotary_fn: Callable[[Tensor, Tensor, Tensor], Tensor] = apply_rotary

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The per-token part before attention: projections, q/k norm, RoPE (sequence-tiled paths call it alone)."""
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism the local projection holds a slice of the heads.
        q = self.q_proj(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        k = self.k_proj(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        v = self.v_proj(x).view(bs, seqlen, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary_fn(q, cos, sin), self.rotary_fn(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask) -> Tensor:
        bs, seqlen, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        out, _lse = self.attn_fn(q, k, v, mask, self.scale)  # (bs, seqlen, n_heads, head_dim)
        return self.o_proj(out.reshape(bs, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _build_rotary(args: ModelArgs) -> RotaryEmbedding:
    """RotaryEmbedding whose fp64 master `inv_freq` is computed on CPU, its buffer on the ambient device.

    Under `torch.device("meta")` (build on meta, load or init later) a master computed on meta would hold
    no values; `to_empty`/`to` later restore the fp32 buffer from the CPU master.
    """
    ambient = torch.empty(0).device  # the device a `with torch.device(...)` block selects
    with torch.device("cpu"):
        rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
    return rotary.to(ambient)


class Transformer(nn.Module):
    """Decoder-only LM. Parameter names follow Hugging Face's, minus the `model.` prefix (see hf.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rotary = _build_rotary(args)

    @property
    def output_weight(self) -> Tensor:
        """(vocab, dim) weight of the output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """Route every layer's attention through `attn_fn` (a backend or a context-parallel wrapper)."""
        for layer in self.layers:
            layer.self_attn.attn_fn = attn_fn

    def set_rope(self, rope: dict, max_position_embeddings: int | None = None) -> None:
        """Change the RoPE scaling in place (a new training stage or an extension without training)."""
        self.args.rope = dict(rope)
        if max_position_embeddings is not None:
            self.args.max_position_embeddings = max_position_embeddings
        device = self.rotary.inv_freq.device
        self.rotary = _build_rotary(self.args).to(device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init as Hugging Face does (normal(0, initializer_range), norms at 1, biases at 0)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.args.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                module.weight.copy_(w)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None,
                      doc_ids: Tensor | None = None, mask: AttnMask | None = None,
                      rope_seq_len: int | None = None) -> Tensor:
        """Final normed hidden states (bs, seqlen, dim), before the output projection.

        position_ids: (bs, seqlen) int64 rotary positions (default 0..seqlen-1).
        doc_ids: (bs, seqlen) document of each token for packed sequences (mask follows documents).
        mask: a prebuilt AttnMask (context parallelism passes one with global token indices).
        rope_seq_len: the length that selects length-dependent rope frequencies (dynamic, longrope);
            default max(position_ids) + 1 as transformers does. Context parallelism must pass the global
            value: each shard's own maximum differs, and so would its frequencies.
        """
        bs, seqlen = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=input_ids.device).expand(bs, seqlen)
        if mask is None:
            mask = AttnMask.causal(bs, seqlen, input_ids.device, doc_ids, self.args.sliding_window)
        cos, sin = self.rotary(position_ids, rope_seq_len)
        # Qwen2/Qwen3 may mix sliding-window and full layers: derive one mask per distinct window
        # (a fresh `cache`, since backends cache structures that depend on the window).
        masks: dict[int | None, AttnMask] = {mask.window: mask}
        h = self.embed_tokens(input_ids)  # (bs, seqlen, dim)
        for layer, window in zip(self.layers, self.args.layer_windows()):
            if window not in masks:
                masks[window] = replace(mask, window=window, cache={})
            h = layer(h, cos, sin, masks[window])
        return self.norm(h)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        """Logits (bs, seqlen, vocab). For short inputs; training uses hidden_states + a chunked loss."""
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        return F.linear(h, self.output_weight)

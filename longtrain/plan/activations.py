"""Per token and decoder block: what autograd saves, what backward recomputes, and its working set.

The count follows decoder.py, the kernels and the switches (tests/unit/test_memory_plan.py checks it against
`saved_tensors_hooks` on CPU): the fused Triton RMSNorm keeps its bf16 input and an fp32 rstd, the eager one
an fp32 copy and two bf16 tensors; RoPE keeps only cos/sin; attention keeps q, k, v, out and the fp32 LSE; the
SwiGLU MLP keeps gate and up and the down projection's input (eager: silu(gate) too). The backward working set
of a layer adds the gradients in flight and the fused attention backward's workspace, which depends on the
backend (`attention_workspace`). Sequence-tiled blocks accumulate the gradients of their sliced inputs in
whole-sequence buffers (`slice_backward` allocates the full tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.kernels.attention import BACKENDS
from longtrain.model.args import ModelArgs
from longtrain.plan.switches import ATTENTION_BACKENDS, DTYPE_BYTES


@dataclass
class PerToken:
    """Bytes per token of one decoder block."""

    x: int  # residual stream (block input / output, their gradients)
    qkv: int  # q, k, v after RoPE
    out: int  # attention output
    lse: int  # fp32 log-sum-exp per query head
    attn_ws: int  # fused attention backward workspace (attention_workspace)
    gate: int  # one intermediate_size tensor (gate, up, ...)
    mlp_saved: int  # what the untiled MLP keeps beyond its input
    norms: int  # what both RMSNorms keep, their outputs (the projections' inputs) included
    norm_keeps_x: bool  # the first RMSNorm saves the block input itself (fused), not an fp32 copy (eager)


def attention_workspace(a: ModelArgs, b: int, attention: str) -> int:
    """Bytes per token the attention backward allocates beyond dq, dk, dv and the incoming d_out: the backend's
    own rule (kernels/attention_backends.py `workspace`)."""
    backend = BACKENDS.get(attention)
    if backend is None:
        raise ValueError(f"plan_memory: attention {attention!r} is not known; valid: {', '.join(ATTENTION_BACKENDS)}")
    if backend.workspace is None:
        raise NotImplementedError(f"plan_memory: attention {attention!r} is not modelled ({backend.not_modelled}); "
                                  f"valid: {', '.join(ATTENTION_BACKENDS)}")
    return backend.workspace(a.n_heads, a.n_kv_heads, a.head_dim, b)


def per_token(a: ModelArgs, b: int, fused: bool, attention: str) -> PerToken:
    """The per-token sizes of one block in a `b`-byte dtype, with the fused kernels or eager."""
    q = a.n_heads * a.head_dim
    x, gate = a.dim * b, a.intermediate_size * b
    ws = attention_workspace(a, b, attention)
    if fused:  # Triton RMSNorm keeps its input x and an fp32 rstd; SwiGLU keeps gate and up
        norms, mlp = 2 * (x + x + 4), 3 * gate
    else:  # eager RMSNorm: fp32 copy, rsqrt, normalised bf16 and the weighted output; silu(gate) kept too
        norms, mlp = 2 * (4 * a.dim + 4 + 2 * x), 4 * gate
    return PerToken(x=x, qkv=(a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b, out=q * b, lse=a.n_heads * 4,
                    attn_ws=ws, gate=gate, mlp_saved=mlp, norms=norms, norm_keeps_x=fused)


def layer_saved_bytes_per_token(a: ModelArgs, dtype: str = "bfloat16", fused_kernels: bool = False) -> int:
    """Bytes autograd saves per token for one decoder block without checkpointing or tiling (fused attention)."""
    p = per_token(a, DTYPE_BYTES[dtype], fused_kernels, "auto")  # the saved set is the same for every fused backend
    return p.norms + p.qkv + p.out + p.lse + p.mlp_saved


def block_bytes(p: PerToken, ac_mode: str, offload: bool, mlp_tiled: bool, seq_tile: bool) -> tuple[int, int, int]:
    """(kept per layer through the step, recomputed for the layer in backward, backward working set), per token.

    `kept` stays on the GPU for every layer (0 with offload); `recomputed` exists only for the layer being
    back-propagated; `work` is that layer's gradients in flight at its worst moment.
    """
    if seq_tile:
        # Only the block input and attention's tensors are whole-sequence; the tiled parts' gradients are
        # accumulated in whole-sequence buffers for x and out (slice_backward), plus dout's contiguous copy.
        layer = p.x + p.qkv + p.out + p.lse
        work = p.x + p.out + p.x + p.qkv + p.attn_ws  # dY, d_out, d_x, dq/dk/dv, workspace
    else:
        layer = p.norms + p.qkv + p.out + p.lse + (0 if mlp_tiled else p.mlp_saved)
        # Worst of: the MLP backward (dY, d_act, d_gate, d_up, the activation freed) and the attention
        # backward (dY, d_out, dq/dk/dv, workspace; the MLP's tensors already freed).
        mlp_moment = 0 if mlp_tiled else p.x + 2 * p.gate
        work = max(mlp_moment, p.x + p.out + p.qkv + p.attn_ws - (0 if mlp_tiled else p.mlp_saved))
    # A checkpoint saves the block input; the recomputed layer shares it where it saves x itself.
    shared_x = p.x if seq_tile or p.norm_keeps_x else 0
    match ac_mode:
        case "none":
            kept, recomputed = layer, 0
        case "selective":  # the block input and attention's outputs are kept, the rest recomputed
            kept = p.x + p.out + p.lse
            recomputed = layer - shared_x - p.out - p.lse
        case "full":
            kept, recomputed = p.x, layer - shared_x
        case _:
            raise AssertionError(ac_mode)
    if offload:
        # Nothing per layer stays; in backward the layer's saved tensors come back from the host. The
        # re-entrant checkpoint (full + offload) also holds the recomputed block output during its backward.
        recomputed, kept = recomputed + kept + (p.x if ac_mode == "full" else 0), 0
    return kept, recomputed, work

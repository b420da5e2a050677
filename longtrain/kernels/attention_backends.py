"""The concrete attention backends by name, each with the rules that belong to it; `auto` (attention_auto.py)
picks among them per call and sits above.

Each backend module's docstring says what it accepts; attention.py is the public face (get_attention_backend).
Adding a backend is one `CONCRETE_BACKENDS` entry here (plus its module): the memory planner reads its backward
workspace (plan/activations.py) and selective checkpointing the ops whose outputs it keeps
(parallel/activation_checkpoint.py) from that entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longtrain.kernels.attention_base import AttentionFn, attention_reference


@dataclass(frozen=True)
class AttentionBackend:
    """One attention backend: how to load it and what the planner and selective checkpointing know of it."""

    load: Callable[[], AttentionFn]  # the function; imported on use (flex compiles, flash-attn may be absent)
    # (n_heads, n_kv_heads, head_dim, bytes per element) -> bytes per token its backward allocates beyond dq, dk,
    # dv and the incoming d_out; None: the planner does not model it (`not_modelled` says why)
    workspace: Callable[[int, int, int, int], int] | None
    saved_ops: Callable[[], set]  # ops whose outputs selective checkpointing keeps (those present here)
    not_modelled: str = ""  # why the planner has no workspace for it


def aten_ops(*names: str) -> set:
    """The `.default` overloads of the aten ops named, those this torch build has."""
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


# The fused kernels behind F.scaled_dot_product_attention that no backend calls directly: a model calling it
# itself (not through a backend) keeps its attention under selective checkpointing too.
SDPA_FUNCTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_flash_attention_for_cpu", "_efficient_attention_forward")


# ---------------------------------------------------------------------------------------------------------------
# Loaders: imported on use.


def _sdpa_flash() -> AttentionFn:
    from longtrain.kernels.attention_sdpa import attention_sdpa_flash
    return attention_sdpa_flash


def _sdpa_cudnn() -> AttentionFn:
    from longtrain.kernels.attention_sdpa import attention_sdpa_cudnn
    return attention_sdpa_cudnn


def _flex() -> AttentionFn:
    from longtrain.kernels.attention_flex import attention_flex
    return attention_flex


def _flash_attn() -> AttentionFn:
    from longtrain.kernels.attention_flash_attn import attention_flash_attn
    return attention_flash_attn


def _fa4() -> AttentionFn:
    from longtrain.kernels.attention_flash_attn import attention_fa4
    return attention_fa4


# ---------------------------------------------------------------------------------------------------------------
# Backward workspaces: bytes per token beyond dq, dk, dv and d_out (tests/unit/test_memory_plan.py).


def _cudnn_workspace(n_heads: int, n_kv_heads: int, head_dim: int, b: int) -> int:
    # dO copied into O's (bs, h, s, d) strides (attention_sdpa.py), an fp32 dq accumulator and, with GQA, dk/dv
    # per query head. cuDNN's workspace is internal: this is the accounting the 512K 1B and 256K 3B measurements
    # (cuDNN) confirm, not read from source.
    q = n_heads * head_dim
    return q * b + q * 4 + (2 * q * b if n_kv_heads < n_heads else 0)


def _flash2_workspace(n_heads: int, n_kv_heads: int, head_dim: int, b: int) -> int:
    # FlashAttention-2 mha_bwd: dq_accum fp32, softmax_d fp32 per head, dk/dv_expanded per query head.
    q = n_heads * head_dim
    return q * 4 + n_heads * 4 + (2 * q * b if n_kv_heads < n_heads else 0)


def _fa4_workspace(n_heads: int, n_kv_heads: int, head_dim: int, b: int) -> int:
    # flash-attn-4 _flash_attn_bwd (4.0.0b36): dq_accum fp32, dpsum and lse_log2 fp32 per head; with GQA fp32
    # dk_accum/dv_accum per KV head (dK/dV summed in the kernel, never expanded). head_dim is rounded up to 32
    # (64 with SM90's dKV_swapAB: not for the head dims 64 and 128 of Llama).
    hd = -(-head_dim // 32) * 32
    return n_heads * (hd * 4 + 8) + (2 * n_kv_heads * hd * 4 if n_kv_heads < n_heads else 0)


# ---------------------------------------------------------------------------------------------------------------
# Ops selective checkpointing keeps.


def _fa4_ops() -> set:
    # flash-attn-4 runs behind longtrain's own op pair; importing the module registers torch.ops.longtrain.fa4_fwd.
    import longtrain.kernels.attention_flash_attn  # noqa: F401

    return {torch.ops.longtrain.fa4_fwd.default}


def _flash_attn_ops() -> set:
    # flash-attn 2 registers torch.library ops when imported (its forward returns out and softmax_lse).
    flash = getattr(torch.ops, "flash_attn", None)
    ops = set()
    for n in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        op = getattr(flash, n, None) if flash is not None else None
        if op is not None:
            ops.add(op.default if hasattr(op, "default") else op)
    return ops


CONCRETE_BACKENDS: dict[str, AttentionBackend] = {
    # Many small ops: no single op to keep, recomputed like the rest.
    "reference": AttentionBackend(lambda: attention_reference, None, set,
                                  "it materialises a seq x seq score matrix per head"),
    "sdpa_cudnn": AttentionBackend(_sdpa_cudnn, _cudnn_workspace,
                                   lambda: aten_ops("_scaled_dot_product_cudnn_attention")),
    "sdpa_flash": AttentionBackend(_sdpa_flash, _flash2_workspace, lambda: aten_ops("_flash_attention_forward")),
    "flex": AttentionBackend(_flex, None, set, "it adds a BlockMask and layout copies"),
    "flash_attn": AttentionBackend(_flash_attn, _flash2_workspace, _flash_attn_ops),
    "fa4": AttentionBackend(_fa4, _fa4_workspace, _fa4_ops),
}


def concrete_backend(name: str) -> AttentionFn:
    """The backend function registered under `name` (one of CONCRETE_BACKENDS).

    Raises:
        ValueError: `name` is not a concrete backend.
    """
    if name not in CONCRETE_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(CONCRETE_BACKENDS)}")
    return CONCRETE_BACKENDS[name].load()

"""External flash-attention packages as backends (used only when installed; absent on CPU):

- `flash_attn`: flash-attention 2 (`pip install flash-attn`), variable-length over the flattened batch
  with `cu_seqlens` (Dao, arXiv:2307.08691).
- `fa4`: flash-attention 4, the CuTe-DSL kernels for Hopper/Blackwell (`pip install flash-attn-4`,
  module `flash_attn.cute`); it compiles each new shape configuration on first call (~4 s on an H100).

Both accept the layouts of attention_layout.py (causal, full, empty, varlen). flash-attn 2's autograd does not
differentiate the LSE, so a gradient reaching it (ring attention's merge) raises instead of being dropped;
flash-attn-4's does (its backward takes dLSE).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from longtrain.kernels.attention_base import AttnMask
from longtrain.kernels.attention_layout import classify
from longtrain.kernels.attention_sdpa import _check_inputs, _empty


class _LseWithoutGrad(torch.autograd.Function):
    """Passes the LSE through; raises if a gradient arrives for it (the kernel cannot take one)."""

    @staticmethod
    def forward(ctx, lse: Tensor, anchor: Tensor, name: str) -> Tensor:
        ctx.name = name
        ctx.set_materialize_grads(False)
        return lse.clone()

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        if grad is not None:
            raise NotImplementedError(f"attention backend {ctx.name!r} cannot differentiate its LSE (needed by "
                                      "ring attention's merge); use 'sdpa_flash' or 'flex'")
        return None, None, None


def _import(name: str, module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NotImplementedError(f"attention backend {name!r} needs the package {package!r} "
                                  f"(pip install {package}); it is not importable here: {e}") from e


def _varlen_args(q: Tensor, k: Tensor, mask: AttnMask, name: str):
    """(kind, cu_seqlens, max_seqlen, causal) for a call over the flattened batch."""
    bs, sq = q.shape[:2]
    layout = classify(mask, sq, k.shape[1])
    match layout.kind:
        case "causal" | "full":
            if sq != k.shape[1] and layout.kind == "causal":
                raise NotImplementedError(f"attention backend {name!r}: causal block with sq != sk")
            cu = torch.arange(0, (bs + 1) * sq, sq, device=q.device, dtype=torch.int32)  # one segment per row
            return layout.kind, cu, sq, layout.kind == "causal"
        case "varlen":
            return layout.kind, layout.cu_seqlens, layout.max_seqlen, True
        case "empty":
            return layout.kind, None, 0, False
        case _:
            raise NotImplementedError(f"attention backend {name!r} cannot take this mask ({layout.reason}); "
                                      "use 'flex' (or 'reference') for it")


def _window(mask: AttnMask) -> tuple[int, int]:
    return (-1, -1) if mask.window is None else (mask.window - 1, 0)


def attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """flash-attention 2 package, variable-length.

    Raises:
        NotImplementedError: flash-attn not installed, not CUDA/bf16/fp16, or an unsupported mask.
    """
    fa = _import("flash_attn", "flash_attn", "flash-attn")
    _check_inputs("flash_attn", q, k)
    kind, cu, max_s, causal = _varlen_args(q, k, mask, "flash_attn")
    if kind == "empty":
        return _empty(q)
    bs, sq, h, d = q.shape
    out, lse, _ = fa.flash_attn_varlen_func(
        q.reshape(bs * sq, h, d), k.reshape(-1, k.shape[2], d), v.reshape(-1, v.shape[2], d), cu, cu, max_s, max_s,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=_window(mask), return_attn_probs=True)
    lse = lse.view(h, bs, sq).transpose(0, 1).float()  # (h, total) -> (bs, h, sq)
    return out.view(bs, sq, h, d), _LseWithoutGrad.apply(lse, q, "flash_attn")


# flash-attn-4's kernels run behind a torch.library op pair so that they are single dispatcher ops: selective
# activation checkpointing can then keep the forward's outputs (out, LSE) instead of recomputing attention
# (its policy sees ops, and the package's own autograd.Function is invisible to it). The ops call the
# package's `_flash_attn_fwd` / `_flash_attn_bwd`, the functions its public `flash_attn_func` /
# `flash_attn_varlen_func` wrap (checked against flash-attn-4 4.0.0b36).


def _fa4_interface():
    return _import("fa4", "flash_attn.cute.interface", "flash-attn-4")


def _fa4_window(window_left: int) -> tuple[int | None, int | None]:
    return (None, None) if window_left < 0 else (window_left, 0)


@torch.library.custom_op("longtrain::fa4_fwd", mutates_args=(), device_types="cuda")
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int, scale: float,
            causal: bool, window_left: int) -> tuple[Tensor, Tensor]:
    """(out, lse): dense q/k/v (bs, s, h, d) with cu_seqlens None, or flattened (total, h, d) with cu_seqlens."""
    left, right = _fa4_window(window_left)
    varlen = cu_seqlens is not None
    out, lse, *_ = _fa4_interface()._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen if varlen else None,
        max_seqlen_k=max_seqlen if varlen else None, softmax_scale=scale, causal=causal,
        window_size_left=left, window_size_right=right, return_lse=True)
    return out, lse


@torch.library.custom_op("longtrain::fa4_bwd", mutates_args=(), device_types="cuda")
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
            cu_seqlens: Tensor | None, max_seqlen: int, scale: float, causal: bool,
            window_left: int) -> tuple[Tensor, Tensor, Tensor]:
    left, right = _fa4_window(window_left)
    varlen = cu_seqlens is not None
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(
        q, k, v, out, dout, lse, scale, causal, 0.0, window_size_left=left, window_size_right=right,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen if varlen else None,
        max_seqlen_k=max_seqlen if varlen else None, dlse=dlse)
    return dq, dk, dv


def _fa4_setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.args = (max_seqlen, scale, causal, window_left)


def _fa4_backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = fa4_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def attention_fa4(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """flash-attention 4 (CuTe DSL, `flash_attn.cute`): dense rows through the batched kernel, packed documents
    through the variable-length one. Its backward takes a gradient for the LSE, so this backend also serves
    ring attention's merge; selective checkpointing keeps its outputs (the `longtrain::fa4_fwd` op).

    Raises:
        NotImplementedError: flash-attn-4 not installed, not CUDA/bf16/fp16, or an unsupported mask.
    """
    _fa4_interface()
    _check_inputs("fa4", q, k)
    kind, cu, max_s, causal = _varlen_args(q, k, mask, "fa4")
    if kind == "empty":
        return _empty(q)
    window_left = -1 if mask.window is None else mask.window - 1
    if kind in ("causal", "full"):
        # lse: (bs, h, sq), fp32
        return fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), None, q.shape[1], scale, causal, window_left)
    bs, sq, h, d = q.shape
    out, lse = fa4_fwd(q.reshape(bs * sq, h, d), k.reshape(-1, k.shape[2], d), v.reshape(-1, v.shape[2], d),
                       cu, max_s, scale, causal, window_left)
    return out.view(bs, sq, h, d), lse.view(h, bs, sq).transpose(0, 1)  # (h, total) -> (bs, h, sq)

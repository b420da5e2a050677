"""External flash-attention packages as backends (used only when installed; absent on CPU):

- `flash_attn`: flash-attention 2 (`pip install flash-attn`), variable-length over the flattened batch
  with `cu_seqlens` (Dao, arXiv:2307.08691).
- `fa4`: flash-attention 4, the CuTe-DSL kernels for Hopper/Blackwell (`pip install flash-attn-4`,
  module `flash_attn.cute`); it compiles each new shape configuration on first call (~4 s on an H100).

Both accept the layouts of attention_layout.py (causal, full, empty, varlen). Their own autograd does not
differentiate the LSE, so a gradient reaching the LSE (ring attention's merge) raises instead of being
dropped: use `sdpa_flash` (which folds the LSE gradient into the fused backward) for context parallelism.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from longtrain.kernels.attention import AttnMask
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


def attention_fa4(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """flash-attention 4 (CuTe DSL, `flash_attn.cute`), variable-length.

    Raises:
        NotImplementedError: flash-attn-4 not installed, not CUDA/bf16/fp16, or an unsupported mask.
    """
    fa4 = _import("fa4", "flash_attn.cute", "flash-attn-4")
    _check_inputs("fa4", q, k)
    kind, cu, max_s, causal = _varlen_args(q, k, mask, "fa4")
    if kind == "empty":
        return _empty(q)
    bs, sq, h, d = q.shape
    window = (None, None) if mask.window is None else (mask.window - 1, 0)
    out, lse = fa4.flash_attn_varlen_func(
        q.reshape(bs * sq, h, d), k.reshape(-1, k.shape[2], d), v.reshape(-1, v.shape[2], d),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_s, max_seqlen_k=max_s, softmax_scale=scale,
        causal=causal, window_size=window)
    lse = lse.view(h, bs, sq).transpose(0, 1).float()  # (h, total) -> (bs, h, sq)
    return out.view(bs, sq, h, d), _LseWithoutGrad.apply(lse, q, "fa4")

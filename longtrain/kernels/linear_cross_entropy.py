"""Output projection + cross-entropy without the full (tokens x vocab) logits.

Layout: hidden (..., dim) in the compute dtype, weight (vocab, dim), labels (...) int64 with -100 = ignore.
Returns the fp32 *sum* of the per-token cross-entropy over valid labels (the caller divides by the
global valid-token count, PITFALLS.md "Loss and gradients").

What is fused: the tokens are processed in chunks of `chunk_tokens`; each chunk's logits exist only in
the compute dtype (one chunk at a time), the loss uses an fp32 log-sum-exp, and the gradients for hidden
and weight are computed in the same pass (d logits = softmax - onehot, Liger-kernel's "fused linear
cross-entropy" idea, arXiv:2410.10989). Backward then only scales the stored gradients by grad_output, so
the logits are computed once. Peak extra memory: one chunk of logits (compute dtype + fp32 copy), the
(vocab, dim) fp32 weight-gradient accumulator and the (tokens, dim) hidden gradient.

A 128K-token sequence with a 128K vocabulary would need 33 GB of bf16 logits (66 GB for an fp32 loss);
with 4096-token chunks it needs ~3 GB.

`impl="torch"` is pure eager torch (any device, the oracle target in tests); `impl="compile"` runs the
same chunk epilogue through `torch.compile` (fuses the softmax/one-hot/cast work on the GPU);
`impl="triton"` runs it as one Triton kernel that overwrites the chunk's logits with their gradient
(kernels/cross_entropy_grad.py: no fp32 copy, no second buffer); `impl="auto"` (the default) is "triton"
on CUDA and "torch" elsewhere. `linear_cross_entropy_reference` keeps the full fp32 logits: the oracle.

The weight gradient sums over chunks in fp32. On CUDA each chunk's product is accumulated by the GEMM itself
(`addmm` with an fp32 output from bf16/fp16 inputs): a separate bf16 product, its fp32 copy and the add
moved ~5 GB per 2K-token chunk at a 128K vocabulary and rounded each chunk's sum to bf16 first (-18% loss
time at 32K tokens on the H100, docs/benchmarks.md).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from longtrain.kernels.cross_entropy_grad import ce_loss_and_grad_reference
from longtrain.types import IGNORE_INDEX

# Auto chunk: at most this many logits elements per chunk (2**28 fp32 = 1 GiB), a power of two of tokens.
_MAX_CHUNK_ELEMENTS = 2**28
IMPLS = ("auto", "torch", "compile", "triton")


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Sum of cross-entropy over valid labels, with full fp32 logits. hidden (N, dim), weight (V, dim), labels (N,)."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk of fp32 logits stays under 1 GiB (a power of two, >= 16)."""
    tokens = max(16, _MAX_CHUNK_ELEMENTS // max(1, vocab_size))
    return 1 << int(math.floor(math.log2(tokens)))


def _chunk_loss_and_dlogits(h: Tensor, w: Tensor, y: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk: fp32 loss sum and, if `need_grad`, d loss / d logits (h.dtype) for grad_output = 1.

    h (n, dim), w (V, dim), y (n,) int64 with -100 = ignore.
    """
    logits = h @ w.t()  # (n, V) in the compute dtype: the only copy of this chunk's logits in that dtype
    loss, dlogits = ce_loss_and_grad_reference(logits, y, IGNORE_INDEX, need_grad)
    return loss.sum(), dlogits


@lru_cache(maxsize=None)
def _compiled_chunk() -> Callable:
    return torch.compile(_chunk_loss_and_dlogits, dynamic=True)


def _chunk_triton(h: Tensor, w: Tensor, y: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """As _chunk_loss_and_dlogits, through the in-place Triton kernel: the logits buffer becomes d logits."""
    from longtrain.kernels.cross_entropy_grad import ce_loss_and_grad_inplace  # needs triton: on use

    logits = h @ w.t()  # (n, V) in the compute dtype
    loss = ce_loss_and_grad_inplace(logits, y, IGNORE_INDEX, write_grad=need_grad).sum()
    return loss, (logits if need_grad else None)


def _chunk_fn(impl: str, device: torch.device) -> Callable:
    match impl:
        case "auto":
            return _chunk_fn("triton" if device.type == "cuda" else "torch", device)
        case "torch":
            return _chunk_loss_and_dlogits
        case "compile":
            return _compiled_chunk()
        case "triton":
            return _chunk_triton
        case _:
            raise ValueError(f"linear_cross_entropy impl {impl!r} is not known; valid: {', '.join(IMPLS)}")


def _accumulate_weight_grad(dw: Tensor, dl: Tensor, h: Tensor) -> None:
    """dw (V, dim) fp32 += dl.t() @ h, with dl (n, V) and h (n, dim) in the compute dtype."""
    if dw.is_cuda and dl.dtype in (torch.bfloat16, torch.float16):
        # One GEMM with an fp32 result from bf16/fp16 inputs: no low-precision product, no separate add pass.
        torch.addmm(dw, dl.t(), h, out_dtype=torch.float32, out=dw)
    else:  # fp32, or CPU (no mixed-dtype GEMM there); unchanged so the CPU demo's float order stays as measured
        dw += (dl.t() @ h).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, impl: str,
                want_grad: bool) -> Tensor:
        fn = _chunk_fn(impl, hidden.device)
        # Under no_grad (evaluation) skip the gradient work entirely.
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (N, dim), contiguous: every row is written by its chunk's GEMM
        dh_all = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        dw_all = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            y = labels[start:end]
            h = hidden[start:end]
            l_c, dl = fn(h, weight, y, need_grad)
            loss += l_c
            if dh_all is not None:
                torch.mm(dl, weight, out=dh_all[start:end])  # (n, dim), written in place
            if dw_all is not None:
                _accumulate_weight_grad(dw_all, dl, h)
        ctx.save_for_backward(*(t for t in (dh_all, dw_all) if t is not None))
        ctx.has = (dh_all is not None, dw_all is not None)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        dh = dw = None
        if ctx.has[0]:
            g = saved.pop(0)
            dh = g * grad_out.to(g.dtype)
        if ctx.has[1]:
            dw = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_tokens: int | None = None,
                         impl: str = "auto") -> Tensor:
    """Sum of cross-entropy over labels != -100 (fp32 scalar); 0 (not NaN) and zero gradients when none is valid.

    Args:
        hidden: (..., dim) final hidden states in the compute dtype.
        weight: (vocab, dim) output projection (the embedding when tied).
        labels: (...) int64 targets, already shifted; -100 = ignore.
        chunk_tokens: tokens per chunk; None picks `auto_chunk_tokens(vocab)` (<= 1 GiB of fp32 logits).
        impl: "torch" (eager, any device), "compile" (torch.compile of the chunk epilogue), "triton" (the
            in-place Triton epilogue; CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (triton on CUDA,
            torch elsewhere).

    Returns:
        fp32 scalar: the loss sum over valid tokens, with exact gradients for hidden and weight.

    Raises:
        ValueError: shapes do not match, a valid label is outside [0, vocab), bad chunk size or impl.
    """
    dim = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, {dim}), got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must match hidden's leading "
                         f"dims {tuple(hidden.shape[:-1])}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    _chunk_fn(impl, hidden.device)  # validate the option before any work
    h = hidden.reshape(-1, dim)  # (N, dim)
    y = labels.reshape(-1).to(torch.int64)  # (N,)
    vocab = weight.shape[0]
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= vocab))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: label {int(y[bad][0])} is outside [0, {vocab}) "
                         f"(use {IGNORE_INDEX} to ignore a token)")
    chunk = chunk_tokens or auto_chunk_tokens(vocab)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, chunk, impl, want_grad)

"""Fused RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) in Triton, forward and backward.

Layout: x (..., dim) any float dtype, contiguous in the last dim; weight (dim,). Semantics as Hugging Face
Llama (and `rmsnorm_reference`): normalise in fp32, cast to x.dtype, then multiply by the weight.
What is fused: forward is one pass per row (sum of squares, scale, weight) and keeps the fp32 1/rms per
row for backward; backward is one pass per row for dx plus per-program partial sums for dweight (reduced
by a small torch sum), instead of the ~8 elementwise kernels and fp32 temporaries of the eager version.

Exposed as the torch.library op `longtrain::rmsnorm` with a fake (meta) kernel and autograd, so
torch.compile and FSDP can trace it. Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

# triton.jit decides at decoration (import) time whether kernels run in the CPU interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Pure-torch RMSNorm, as decoder.RMSNorm computes it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def triton_usable(t: Tensor) -> bool:
    """Can the Triton kernels run on `t`'s device here (CUDA, or CPU under TRITON_INTERPRET=1)?"""
    if triton is None:
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET)


def _require_triton(name: str, t: Tensor) -> None:
    if triton is None:
        raise NotImplementedError(f"{name} needs the package 'triton' (pip install triton)")
    if not triton_usable(t):
        raise NotImplementedError(f"{name} runs on CUDA (or on CPU with TRITON_INTERPRET=1), got {t.device}")


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, dim, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        xhat = (x * rstd).to(w.dtype)  # cast before the weight, as Hugging Face
        tl.store(y_ptr + row * dim + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, dim, rows_per_prog,
                            BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < dim
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in range(0, rows_per_prog):
            row = pid * rows_per_prog + r
            if row < n_rows:
                x = tl.load(x_ptr + row * dim + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * dim + cols, mask=m, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                xhat = x * rstd
                dw += dy * xhat
                g = dy * w  # gradient w.r.t. xhat
                dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / dim))
                tl.store(dx_ptr + row * dim + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dw_part_ptr + pid * dim + cols, dw, mask=m)


@torch.library.custom_op("longtrain::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _require_triton("longtrain::rmsnorm", x)
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim).contiguous()  # (rows, dim)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    rstd = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    if x2.shape[0]:
        _rmsnorm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, dim, eps,
                                            BLOCK=triton.next_power_of_2(dim))
    return y.view(*x.shape[:-1], dim), rstd


@_rmsnorm_fwd.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("longtrain::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    _require_triton("longtrain::rmsnorm", x)
    dim = x.shape[-1]
    x2, dy2 = x.reshape(-1, dim).contiguous(), dy.reshape(-1, dim).contiguous()  # (rows, dim)
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    # Enough programs to fill the GPU; each reduces its rows' dweight contribution in fp32.
    n_progs = max(1, min(n_rows, 4 * 132))
    rows_per_prog = triton.cdiv(n_rows, n_progs) if n_rows else 1
    dw_part = torch.zeros(n_progs, dim, device=x.device, dtype=torch.float32)
    if n_rows:
        _rmsnorm_bwd_kernel[(n_progs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, n_rows, dim, rows_per_prog,
                                        BLOCK=triton.next_power_of_2(dim))
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


@_rmsnorm_bwd.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy: Tensor, _drstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rmsnorm_bwd(dy, x, weight, rstd)
    return dx, dw, None


_rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused RMSNorm (Triton). x (..., dim), weight (dim,) -> (..., dim) in promote(x.dtype, weight.dtype).

    Raises:
        NotImplementedError: triton is not installed, or the device is neither CUDA nor CPU under
            TRITON_INTERPRET=1.
    """
    return _rmsnorm_fwd(x, weight, eps)[0]

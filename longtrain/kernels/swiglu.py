"""Fused SwiGLU activation (Shazeer 2020, arXiv:2002.05202): silu(gate) * up, forward and backward in Triton.

Layout: gate and up of the same shape (..., intermediate) and dtype. What is fused: forward reads gate and
up once and writes the product once, in fp32 internally (eager torch writes silu(gate) to memory, rounds
it to bf16, then reads it back for the product); backward produces d_gate and d_up in one pass from
(d_out, gate, up), recomputing the sigmoid instead of storing silu(gate).

Exposed as the torch.library op `longtrain::swiglu` with a fake kernel and autograd. Runs on CUDA, or on
CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longtrain.kernels.rmsnorm import _require_triton, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)
        tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=m)

BLOCK = 1024


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """Pure-torch SwiGLU, as decoder.MLP computes it."""
    return F.silu(gate) * up


@torch.library.custom_op("longtrain::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    _require_triton("longtrain::swiglu", gate)
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, BLOCK=BLOCK)
    return y


@_swiglu_fwd.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty_like(gate)


@torch.library.custom_op("longtrain::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _require_triton("longtrain::swiglu", gate)
    d, g, u = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](d, g, u, dg, du, n, BLOCK=BLOCK)
    return dg, du


@_swiglu_bwd.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd(dy, gate, up)


_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused silu(gate) * up (Triton); same shape and dtype as the inputs.

    Raises:
        ValueError: gate and up differ in shape or dtype.
        NotImplementedError: triton missing, or a device other than CUDA / CPU under TRITON_INTERPRET=1.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match in shape and dtype")
    return _swiglu_fwd(gate, up)

"""Fused rotary position embedding application (Su et al. 2021, arXiv:2104.09864) in Triton.

Layout: x (bs, s, heads, head_dim) any float dtype; cos/sin (bs, s, rotary_dim) fp32 as
`RotaryEmbedding` returns them (half-split layout as Hugging Face Llama: channel c < rotary_dim/2 pairs
with c + rotary_dim/2; channels >= rotary_dim pass through: partial rotary). The angles stay fp32 (never
rounded to the model dtype: PITFALLS.md, AnchorAttention); the rotation is computed in fp32 and rounded
once. What is fused: one program per token loads cos/sin once for all heads and writes the rotated heads
in one pass (eager torch: slices, a negated concat, two products and a sum, each a kernel with a bf16 or
fp32 temporary). Backward is the inverse rotation (the same kernel with the sine negated).

Exposed as the torch.library op `longtrain::rope_apply` with a fake kernel and autograd. Runs on CUDA, or
on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.kernels.rmsnorm import _require_triton, triton
from longtrain.kernels.rope_reference import apply_rotary

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, head_dim, rot, sign,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        c = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        half = rot // 2
        in_row = (h < heads) & (c < head_dim)
        rotating = c < rot
        first = c < half
        partner = tl.where(first, c + half, c - half)
        base = x_ptr + tok * heads * head_dim + h * head_dim
        x = tl.load(base + c, mask=in_row, other=0.0).to(tl.float32)
        xp = tl.load(base + partner, mask=in_row & rotating, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + tok * rot + c, mask=rotating, other=1.0)
        sn = tl.load(sin_ptr + tok * rot + c, mask=rotating, other=0.0) * sign
        # rotate_half(x)[c] = -x[c + half] for c < half, x[c - half] otherwise
        rotated = tl.where(first, -xp, xp)
        y = tl.where(rotating, x * cs + rotated * sn, x)
        tl.store(y_ptr + tok * heads * head_dim + h * head_dim + c, y.to(y_ptr.dtype.element_ty), mask=in_row)


def rope_apply_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Pure-torch rotation: rope_reference.py's `apply_rotary` (the decoder's default)."""
    return apply_rotary(x, cos, sin)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    bs, s, heads, head_dim = x.shape
    rot = cos.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    cos_c = cos.float().expand(bs, s, rot).contiguous()  # (bs, s, rot) fp32
    sin_c = sin.float().expand(bs, s, rot).contiguous()
    if xc.numel():
        _rope_kernel[(bs * s,)](xc, cos_c, sin_c, y, heads, head_dim, rot, sign,
                                BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim))
    return y


@torch.library.custom_op("longtrain::rope_apply", mutates_args=())
def _rope_apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _require_triton("longtrain::rope_apply", x)
    return _launch(x, cos, sin, 1.0)


@_rope_apply.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("longtrain::rope_apply_bwd", mutates_args=())
def _rope_apply_bwd(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _require_triton("longtrain::rope_apply", dy)
    return _launch(dy, cos, sin, -1.0)  # the transpose of a rotation is the rotation by -angle


@_rope_apply_bwd.register_fake
def _(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    _x, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dy: Tensor):
    cos, sin = ctx.saved_tensors
    return _rope_apply_bwd(dy, cos, sin), None, None


_rope_apply.register_autograd(_backward, setup_context=_setup_context)


def rope_apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Fused RoPE (Triton), a drop-in for `apply_rotary`. x (bs, s, h, d); cos/sin (bs, s, rotary_dim) fp32.

    Raises:
        ValueError: cos/sin not fp32, rotary_dim odd or larger than head_dim, or shapes that do not match.
        NotImplementedError: triton missing, or a device other than CUDA / CPU under TRITON_INTERPRET=1.
    """
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rope_apply: cos/sin must be float32 (PITFALLS.md), got {cos.dtype}/{sin.dtype}")
    rot = cos.shape[-1]
    if rot % 2 or rot > x.shape[-1] or cos.shape != sin.shape or cos.shape[1] != x.shape[1]:
        raise ValueError(f"rope_apply: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} do not "
                         "match (need (bs, s, rotary_dim) with an even rotary_dim <= head_dim)")
    return _rope_apply(x, cos, sin)

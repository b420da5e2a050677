"""The pure-torch RoPE rotation: the decoder's default `rotary_fn` and the reference of the fused kernel
(rope_apply.py). It sits in kernels/ so that the kernel's reference does not reach up into model/."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` channels of each head (half-split layout, as Hugging Face Llama).

    x: (bs, s, n_heads, head_dim); cos/sin: (bs, s, rotary_dim) fp32. Math in fp32, result in x.dtype.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    xf = x_rot.float()
    x1, x2 = xf[..., : rot // 2], xf[..., rot // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return torch.cat((out.to(x.dtype), x_pass), dim=-1) if x_pass.numel() else out.to(x.dtype)

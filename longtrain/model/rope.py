"""Rotary position embeddings and their scaling methods (to be completed: see the rope registry issue).

The rope block uses Hugging Face's `rope_parameters` vocabulary (transformers 5), e.g.
`{"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 8192}`.

Precision (PITFALLS.md): `inv_freq` is computed in fp64 and kept in fp32 (never cast with the model);
angles `pos * inv_freq` are fp32, or fp64 when positions reach 2**18, where fp32 loses ~0.06 rad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

FP64_ANGLES_FROM = 2**18  # positions at or beyond this use fp64 angles


def rotary_dim(head_dim: int, rope: dict) -> int:
    """Channels that rotate: partial rotary (e.g. 0.5) rotates the first `head_dim * factor` of each head."""
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    return dim - dim % 2


def compute_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int,
                     seq_len: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies (fp64, CPU) and the attention scaling applied to cos/sin.

    `seq_len` matters only for methods that depend on the current length (dynamic, longrope).
    """
    dim = rotary_dim(head_dim, rope)
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    match rope.get("rope_type", "default"):
        case "default":
            return inv_freq, 1.0
        case "linear":
            return inv_freq / float(rope["factor"]), 1.0
        case other:
            raise ValueError(f"rope_type {other!r} not implemented yet")


def depends_on_length(rope: dict) -> bool:
    return rope.get("rope_type", "default") in ("dynamic", "longrope")


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for int64 position ids. Holds no parameters; `inv_freq` stays fp32 under `.to(dtype)`."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = dict(rope)
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_scaling = compute_inv_freq(self.rope, head_dim, max_position_embeddings)
        self._inv_freq64 = inv_freq  # master copy, fp64 on CPU, outside the module's buffers
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast inv_freq to bf16 (PITFALLS.md): let the move happen, then
        # restore fp32 from the fp64 master on whatever device the buffer landed on.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq64.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (bs, s) int64 -> cos, sin (bs, s, rotary_dim) fp32, attention scaling applied."""
        assert position_ids.dtype == torch.int64, f"position ids must be int64, got {position_ids.dtype}"
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        max_pos = int(position_ids.max()) if position_ids.numel() else 0
        if depends_on_length(self.rope):
            inv64, scaling = compute_inv_freq(self.rope, self.head_dim, self.max_position_embeddings, max_pos + 1)
            inv_freq = inv64.to(device=position_ids.device, dtype=torch.float32)
        if max_pos >= FP64_ANGLES_FROM:
            angle_dtype, inv = torch.float64, (inv64 if depends_on_length(self.rope) else self._inv_freq64)
            inv = inv.to(position_ids.device) if position_ids.device.type != "mps" else inv.float()
        else:
            angle_dtype, inv = torch.float32, inv_freq
        angles = position_ids[..., None].to(angle_dtype) * inv.to(angle_dtype)  # (bs, s, rotary_dim / 2)
        emb = torch.cat((angles, angles), dim=-1)  # (bs, s, rotary_dim)
        return (emb.cos() * scaling).float(), (emb.sin() * scaling).float()


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

"""Route a decoder's RMSNorms, RoPE application and SwiGLU MLPs through the fused Triton kernels.

Applied from outside by `parallel.apply` (step 2), like every other change to a model's modules; it lives
here, not in kernels/, because it patches the decoder's classes and kernels/ never imports model/.
"""

from __future__ import annotations

import types

from torch import Tensor, nn

from longtrain.kernels.rmsnorm import rmsnorm as fused_rmsnorm
from longtrain.kernels.rmsnorm import triton_usable
from longtrain.kernels.rope_apply import rope_apply
from longtrain.kernels.swiglu import swiglu as fused_swiglu
from longtrain.model.decoder import MLP, Attention, RMSNorm


def _fused_rmsnorm_forward(self, x: Tensor) -> Tensor:
    return fused_rmsnorm(x, self.weight, self.eps)


def _fused_mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def apply_fused_kernels(model: nn.Module, rmsnorm: bool = True, rope: bool = True, swiglu: bool = True) -> None:
    """Route a longtrain Transformer's RMSNorms, RoPE application and SwiGLU MLPs through the fused Triton
    kernels (kernels/rmsnorm.py, rope_apply.py, swiglu.py). Applied from outside, on the instances; the
    parameters, their names and the results (up to rounding) are unchanged.

    Args:
        model: a longtrain `Transformer` (or any module holding decoder RMSNorm / Attention / MLP modules).
        rmsnorm, rope, swiglu: which kernels to switch on.

    Raises:
        NotImplementedError: triton is missing or the model's device cannot run it (CUDA, or CPU under
            TRITON_INTERPRET=1).
    """
    param = next(model.parameters())
    if not triton_usable(param):
        raise NotImplementedError(f"apply_fused_kernels: the Triton kernels run on CUDA (or on CPU with "
                                  f"TRITON_INTERPRET=1) with triton installed; model is on {param.device}")
    for module in model.modules():
        if rmsnorm and isinstance(module, RMSNorm):
            module.forward = types.MethodType(_fused_rmsnorm_forward, module)
        elif rope and isinstance(module, Attention):
            module.rotary_fn = rope_apply
        elif swiglu and isinstance(module, MLP):
            module.forward = types.MethodType(_fused_mlp_forward, module)


__all__ = ["apply_fused_kernels"]

"""Attention: one interface, several backends. This module is their public face; import from here.

Every backend is a function `attn(q, k, v, mask: AttnMask, scale) -> (out, lse)`; the contract, the mask and
the fp32 reference backend are in attention_base.py, the concrete backends by name in attention_backends.py,
and `auto` (the fastest correct backend per call) in attention_auto.py, above them all.
"""

from __future__ import annotations

from longtrain.kernels.attention_backends import CONCRETE_BACKENDS, concrete_backend
from longtrain.kernels.attention_base import ANCHOR_DOC, AttentionFn, AttnMask, attention_reference

ATTENTION_BACKENDS = CONCRETE_BACKENDS + ("auto",)


def get_attention_backend(name: str) -> AttentionFn:
    """Return the attention function registered under `name`.

    Backends (each file's docstring says what it accepts):
        reference   attention_base.py; fp32 oracle, any device, any mask.
        sdpa_flash  attention_sdpa.py; torch's flash-attention 2, CUDA bf16/fp16, documents as varlen.
        sdpa_cudnn  attention_sdpa.py; cuDNN fused attention, CUDA bf16/fp16, documents per call.
        flex        attention_flex.py; flex_attention block masks, any mask; compiled on CUDA.
        flash_attn  attention_flash_attn.py; the flash-attn 2 package (when installed), varlen.
        fa4         attention_flash_attn.py; flash-attn-4 `flash_attn.cute` (when installed), varlen.
        auto        attention_auto.py; per call, the fastest backend that takes the device, dtype, head dim
                    and mask (table there).

    Raises:
        ValueError: `name` is not a known backend.
    """
    if name == "auto":
        from longtrain.kernels.attention_auto import attention_auto  # it imports the concrete backends

        return attention_auto
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(ATTENTION_BACKENDS)}")
    return concrete_backend(name)


__all__ = ["ANCHOR_DOC", "ATTENTION_BACKENDS", "AttentionFn", "AttnMask", "attention_reference",
           "get_attention_backend"]

"""Attention: one interface, several backends. This module is their public face; import from here.

Every backend is a function `attn(q, k, v, mask: AttnMask, scale) -> (out, lse)`; the contract, the mask and
the fp32 reference backend are in attention_base.py, the concrete backends by name in attention_backends.py,
and `auto` (the fastest correct backend per call) in attention_auto.py, above them all.
"""

from __future__ import annotations

from longtrain.kernels.attention_auto import AUTO_BACKEND
from longtrain.kernels.attention_backends import CONCRETE_BACKENDS, SDPA_FUNCTION_OPS, AttentionBackend, aten_ops
from longtrain.kernels.attention_base import ANCHOR_DOC, AttentionFn, AttnMask, attention_reference

# Every backend by name with its rules (attention_backends.py); the names a recipe's `model.attention` takes.
BACKENDS: dict[str, AttentionBackend] = CONCRETE_BACKENDS | {"auto": AUTO_BACKEND}
ATTENTION_BACKENDS = tuple(BACKENDS)


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
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(ATTENTION_BACKENDS)}")
    return BACKENDS[name].load()


def selective_save_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: every backend's, and F.scaled_dot_product_attention's
    fused kernels (those present in this torch build and the installed packages)."""
    return aten_ops(*SDPA_FUNCTION_OPS).union(*(b.saved_ops() for b in BACKENDS.values()))


__all__ = ["ANCHOR_DOC", "ATTENTION_BACKENDS", "BACKENDS", "AttentionBackend", "AttentionFn", "AttnMask",
           "attention_reference", "get_attention_backend", "selective_save_ops"]

"""The concrete attention backends by name; `auto` (attention_auto.py) picks among them per call and sits above.

Each backend module's docstring says what it accepts; attention.py is the public face (get_attention_backend).
"""

from __future__ import annotations

from longtrain.kernels.attention_base import AttentionFn, attention_reference

CONCRETE_BACKENDS = ("reference", "sdpa_flash", "sdpa_cudnn", "flex", "flash_attn", "fa4")


def concrete_backend(name: str) -> AttentionFn:
    """The backend function registered under `name` (one of CONCRETE_BACKENDS).

    Raises:
        ValueError: `name` is not a concrete backend.
    """
    # Imported on use: flex compiles, and the flash-attn packages may be absent.
    match name:
        case "reference":
            return attention_reference
        case "sdpa_flash":
            from longtrain.kernels.attention_sdpa import attention_sdpa_flash
            return attention_sdpa_flash
        case "sdpa_cudnn":
            from longtrain.kernels.attention_sdpa import attention_sdpa_cudnn
            return attention_sdpa_cudnn
        case "flex":
            from longtrain.kernels.attention_flex import attention_flex
            return attention_flex
        case "flash_attn":
            from longtrain.kernels.attention_flash_attn import attention_flash_attn
            return attention_flash_attn
        case "fa4":
            from longtrain.kernels.attention_flash_attn import attention_fa4
            return attention_fa4
        case _:
            raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(CONCRETE_BACKENDS)}")

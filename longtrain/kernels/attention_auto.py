"""`auto`: per call, the fastest backend that computes this attention correctly.

The choice depends on the device, dtype, head dim and the mask's layout (attention_layout.py) and is
cached on the mask, so it is made once per forward pass. The table follows the measurements in
docs/benchmarks.md ("Attention backends" and "flash-attn-4": bf16 on an H100, Llama-3.2-1B attention shape):

| device | dtype          | head_dim          | layout                 | backend     |
|--------|----------------|-------------------|------------------------|-------------|
| cpu    | any            | any               | any                    | reference   |
| cuda   | fp32           | any               | any                    | flex        |
| cuda   | bf16 / fp16    | not %8 or > 256   | any                    | flex        |
| cuda   | bf16 / fp16    | %8, <= 256        | causal/full/varlen (*) | fa4         |
| cuda   | bf16 / fp16    | %8, <= 256        | causal / full / empty  | DENSE_CHOICE|
| cuda   | bf16 / fp16    | %8, <= 256        | + sliding window       | sdpa_flash  |
| cuda   | bf16 / fp16    | %8, <= 256        | varlen, mean doc < 8K  | sdpa_flash  |
| cuda   | bf16 / fp16    | %8, <= 256        | varlen, mean doc >= 8K | sdpa_cudnn  |
| cuda   | bf16 / fp16    | %8, <= 256        | general (CP docs, ...) | flex        |

(*) when flash-attn-4 is installed, the GPU is Hopper or newer (compute capability >= 9) and head_dim is one
where it was checked (FA4_HEAD_DIMS: 64, 128); there it is faster than cuDNN, causal and with packed documents
(docs/benchmarks.md, "flash-attn-4"). Its LSE is differentiable, so ring attention can use it.

On CPU `reference` is chosen over `flex`: eager flex materialises the same score matrix and has no
backward on CPU. flash_attn (version 2) is never chosen automatically: its LSE is not differentiable
(ring attention needs it); name it explicitly.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from longtrain.kernels.attention_backends import CONCRETE_BACKENDS, AttentionBackend, concrete_backend
from longtrain.kernels.attention_base import AttnMask
from longtrain.kernels.attention_layout import classify

# Which of the two torch fused kernels is faster for dense causal bf16: cuDNN at 8K, 32K and 128K on the H100
# (docs/benchmarks.md, "Attention backends").
DENSE_CHOICE = "sdpa_cudnn"
# Packed documents: flash varlen (one launch) vs cuDNN per document; per document wins from long documents on
# (same table, 8 equal documents at 8K / 32K / 128K).
PER_DOC_CUDNN_FROM = 8192  # mean document length at which per-document cuDNN overtakes flash varlen
# Head dims at which flash-attn-4 4.0.0b36 was checked against the reference, forward and backward
# (benchmarks/attention.py --check). At head_dim 16 with GQA (the debug flavor, 4 q / 2 kv heads) its gradients
# disagreed with every other backend under check_parallel (docs/benchmarks.md, "flash-attn-4"): auto keeps it
# to the checked dims; naming `fa4` explicitly still reaches it for any dim.
FA4_HEAD_DIMS = (64, 128)


@functools.cache
def fa4_usable(device_index: int) -> bool:
    """flash-attn-4 importable and this GPU Hopper or newer."""
    try:
        ok = importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no flash_attn package at all
        ok = False
    return ok and torch.cuda.get_device_capability(device_index)[0] >= 9


def _fa4_for(head_dim: int, device_index: int) -> bool:
    """auto's flash-attn-4 condition: a checked head dim, the package importable, a Hopper-or-newer GPU."""
    return head_dim in FA4_HEAD_DIMS and fa4_usable(device_index)


def dense_choice_here(name: str, head_dim: int) -> str:
    """The kernel `name` resolves to for dense causal rows of `head_dim` on this machine's GPU (for planning).

    Only `auto` is resolved, and only where a GPU is visible; elsewhere the name comes back unchanged (the
    memory plan then takes the larger workspace of the candidates).
    """
    if name != "auto" or not torch.cuda.is_available():
        return name
    return "fa4" if _fa4_for(head_dim, torch.cuda.current_device()) else DENSE_CHOICE


def choose_backend(q: Tensor, k: Tensor, mask: AttnMask) -> str:
    """The backend name `auto` uses for this call (the table in the module docstring)."""
    if q.device.type != "cuda":
        return "reference"
    head_dim = q.shape[-1]
    if q.dtype.itemsize != 2 or head_dim % 8 or head_dim > 256:
        return "flex"
    layout = classify(mask, q.shape[1], k.shape[1])
    if layout.kind in ("causal", "full", "varlen") and _fa4_for(head_dim, q.device.index or 0):
        return "fa4"
    match layout.kind:
        case "causal" | "full" | "empty":
            return "sdpa_flash" if mask.window is not None else DENSE_CHOICE
        case "varlen":
            n_docs = layout.cu_seqlens.numel() - 1
            long_docs = q.shape[0] * q.shape[1] / n_docs >= PER_DOC_CUDNN_FROM
            return "sdpa_cudnn" if long_docs and mask.window is None else "sdpa_flash"
        case _:
            return "flex"


def attention_auto(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """Dispatch to `choose_backend(q, k, mask)` (cached per mask and shape)."""
    key = ("auto", q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[-1])
    if key not in mask.cache:
        mask.cache[key] = concrete_backend(choose_backend(q, k, mask))
    return mask.cache[key](q, k, v, mask, scale)


def _auto_workspace(n_heads: int, n_kv_heads: int, head_dim: int, b: int) -> int:
    # For a dense causal sequence auto picks fa4 or cuDNN depending on the installed packages, which a plan made
    # elsewhere cannot see: the larger of the two.
    return max(CONCRETE_BACKENDS[n].workspace(n_heads, n_kv_heads, head_dim, b) for n in ("fa4", "sdpa_cudnn"))


# auto's registry entry (kernels/attention.py adds it to the concrete ones): it keeps what the backend it picks keeps.
AUTO_BACKEND = AttentionBackend(lambda: attention_auto, _auto_workspace,
                                lambda: set().union(*(b.saved_ops() for b in CONCRETE_BACKENDS.values())))

"""flex_attention backend: any AttnMask (documents, anchors, windows, context-parallel blocks with arbitrary
global indices) through a block-sparse mask built from the mask's own index and document tensors.

The BlockMask is built once per (mask, sq, sk) and cached on `mask.cache`, since every layer shares the
mask and building one costs (PITFALLS.md). On CUDA, flex_attention and the block-mask construction are
compiled (flex is only fast compiled: eagerly it materialises the score matrix; Dong et al.,
arXiv:2412.05496). On CPU it runs eagerly, forward only (torch has no flex backward on CPU), which is
what the CPU tests use against the reference.

Compilation: each new (shape, mask variant) compiles once (~10-30 s on an H100). Dynamo allows
`torch._dynamo.config.recompile_limit` (default 8) variants of flex_attention per process; past it,
dynamo runs flex eagerly, which materialises the scores and runs out of memory at long context (seen in
benchmarks/attention.py, which therefore raises the limit). A training run has one or a few variants.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from longtrain.kernels.attention_base import ANCHOR_DOC, AttnMask

try:  # torch >= 2.9: return_lse is deprecated in favour of return_aux
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

BLOCK_SIZE = 128  # flex's tile; blocks wholly outside the mask are skipped


def _mask_mod(mask: AttnMask):
    """The AttnMask rule as a flex mask_mod over (batch, head, query, key) positions in this call."""
    q_index, k_index, q_doc, k_doc, window = mask.q_index, mask.k_index, mask.q_doc, mask.k_doc, mask.window

    def mask_mod(b, h, qi, ki):
        qg, kg = q_index[b, qi], k_index[b, ki]  # global token indices
        allowed = kg <= qg
        if window is not None:
            allowed = allowed & (qg - kg < window)
        if q_doc is not None:
            kd = k_doc[b, ki]
            allowed = allowed & ((q_doc[b, qi] == kd) | (kd == ANCHOR_DOC))
        return allowed

    return mask_mod


def block_mask_for(mask: AttnMask, sq: int, sk: int, device: torch.device) -> BlockMask:
    """The cached BlockMask of `mask` for a (sq, sk) call."""
    key = ("flex_block_mask", sq, sk)
    if key not in mask.cache:
        mask.cache[key] = create_block_mask(_mask_mod(mask), mask.q_index.shape[0], None, sq, sk,
                                            device=device, BLOCK_SIZE=BLOCK_SIZE, _compile=device.type == "cuda")
    return mask.cache[key]


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attention_flex(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """flex_attention with the mask's block mask; compiled on CUDA, eager (forward only) on CPU.

    Layout as the AttentionFn contract: q (bs, sq, h, d), k/v (bs, sk, h_kv, d) -> out, lse (bs, h, sq) fp32.
    """
    bs, sq, h, d = q.shape
    block_mask = block_mask_for(mask, sq, k.shape[1], q.device)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bs, h, s, d)
    gqa = k.shape[2] != h
    if AuxRequest is not None:
        out, aux = fn(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                      return_aux=AuxRequest(lse=True))
        lse = aux.lse
    else:  # pragma: no cover - older torch
        out, lse = fn(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    return out.transpose(1, 2), lse.float()  # (bs, sq, h, d), (bs, h, sq)

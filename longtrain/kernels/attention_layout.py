"""What an AttnMask looks like to a fused kernel: the few layouts the fast paths accept.

Fused SDPA and flash-attn kernels take no arbitrary mask: only "all keys" or "causal" (square,
aligned), plus variable-length packing through `cu_seqlens`. `classify` maps an `AttnMask` onto one of
these layouts from its indices and documents, once per forward pass (the result is cached on
`mask.cache`: every layer shares the mask, so the host-device sync happens once, not per layer).

Layouts:
    causal  q_index == k_index, strictly increasing in every row: key j visible to query i iff j <= i.
            A full sequence and the diagonal block of ring attention (contiguous or zigzag shards).
    full    every key precedes every query (max k_index <= min q_index per row): an off-diagonal
            block of ring attention that is entirely in the past.
    empty   no key precedes any query: the block contributes nothing (out 0, lse -inf).
    varlen  a contiguous (unsharded) sequence of packed documents, each a single run of tokens with
            no ANCHOR_DOC token: causal within each document, described by `cu_seqlens`.
    general anything else (documents inside a CP block, anchor tokens, windows on CP blocks): flex
            and the reference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.kernels.attention_base import ANCHOR_DOC, AttnMask


@dataclass(frozen=True)
class Layout:
    kind: str  # "causal" | "full" | "empty" | "varlen" | "general"
    reason: str = ""  # why a mask is "general" (for error messages)
    cu_seqlens: Tensor | None = None  # (n_segments + 1,) int32 offsets into the flattened (bs * s) tokens
    max_seqlen: int = 0  # longest segment
    segments: tuple[tuple[int, int, int], ...] = ()  # (row, start, end) of each document, for per-doc calls


def _strictly_increasing(index: Tensor) -> bool:
    return bool((index[:, 1:] > index[:, :-1]).all()) if index.shape[1] > 1 else True


def _varlen(mask: AttnMask) -> Layout:
    """Documents of a contiguous sequence as flattened segments; `general` when they are not runs."""
    doc = mask.q_doc
    bs, s = doc.shape
    if bool((doc == ANCHOR_DOC).any()):
        return Layout("general", reason="ANCHOR_DOC tokens are visible across documents")
    # A new segment starts at each row start and wherever the document id changes.
    starts = torch.ones_like(doc, dtype=torch.bool)  # (bs, s)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    n_segments = int(starts.sum())
    n_docs = sum(int(torch.unique(doc[b]).numel()) for b in range(bs))
    if n_segments != n_docs:
        return Layout("general", reason="a document id appears in more than one run of tokens")
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)  # (n_segments,) offsets into bs * s
    cu = torch.cat([flat_starts, flat_starts.new_tensor([bs * s])]).to(torch.int32)
    lens = cu[1:] - cu[:-1]
    starts_host = flat_starts.tolist()
    ends_host = cu[1:].tolist()
    segments = tuple((st // s, st % s, st % s + (en - st)) for st, en in zip(starts_host, ends_host))
    return Layout("varlen", cu_seqlens=cu, max_seqlen=int(lens.max()), segments=segments)


def classify(mask: AttnMask, sq: int, sk: int) -> Layout:
    """The layout of `mask` for a (sq, sk) attention call; cached on `mask.cache["layout"]`."""
    key = ("layout", sq, sk)
    if key in mask.cache:
        return mask.cache[key]
    layout = _classify(mask, sq, sk)
    mask.cache[key] = layout
    return layout


def _classify(mask: AttnMask, sq: int, sk: int) -> Layout:
    if mask.contiguous:
        if mask.has_docs:
            return _varlen(mask)
        return Layout("causal")
    if mask.has_docs:
        return Layout("general", reason="documents inside a context-parallel block")
    if mask.window is not None:
        return Layout("general", reason="a sliding window on a context-parallel block")
    qi, ki = mask.q_index, mask.k_index
    if bool((ki.min(dim=1).values > qi.max(dim=1).values).all()):
        return Layout("empty")
    if bool((ki.max(dim=1).values <= qi.min(dim=1).values).all()):
        return Layout("full")
    if sq == sk and torch.equal(qi, ki) and _strictly_increasing(qi):
        return Layout("causal")
    return Layout("general", reason="query/key indices are neither one causal block nor all-visible")

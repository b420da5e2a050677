"""Attention's interface: the mask, the backend contract and the fp32 reference backend.

Every backend is a function

    attn(q, k, v, mask: AttnMask, scale: float) -> (out, lse)

    q:   (bs, sq, n_heads, head_dim)       any float dtype
    k,v: (bs, sk, n_kv_heads, head_dim)    n_heads % n_kv_heads == 0 (GQA)
    out: (bs, sq, n_heads, head_dim)       q.dtype
    lse: (bs, n_heads, sq)                 float32, natural log; -inf for a query that sees no key

The log-sum-exp is part of the contract so that context parallelism can merge partial results
(ring attention) in fp32. Which keys a query may see is described by `AttnMask`, built once per
forward pass and shared by all layers, so backends can cache derived structures on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from longtrain.types import ANCHOR_DOC


@dataclass
class AttnMask:
    """Which keys each query may see: causal by global token index, same document, optional window.

    A query at global index i in document d sees a key at global index j in document e iff
    j <= i and (e == d or e == ANCHOR_DOC) and (window is None or i - j < window).
    Global indices stay those of the full sequence after context-parallel sharding.
    """

    q_index: Tensor  # (bs, sq) int64 global token index of each query
    k_index: Tensor  # (bs, sk) int64 global token index of each key
    q_doc: Tensor | None = None  # (bs, sq) int64 document id; None: a single document
    k_doc: Tensor | None = None  # (bs, sk)
    window: int | None = None  # sliding window (Mistral), None = unlimited
    # True when q_index == k_index == arange(s) for every row: plain causal, the fast path.
    contiguous: bool = False
    cache: dict = field(default_factory=dict, repr=False)  # per-backend derived structures

    @staticmethod
    def causal(bs: int, seqlen: int, device: torch.device | str, doc_ids: Tensor | None = None,
               window: int | None = None) -> "AttnMask":
        """The mask of a full (unsharded) sequence, optionally with packed documents."""
        index = torch.arange(seqlen, device=device, dtype=torch.int64).expand(bs, seqlen)
        if doc_ids is not None:
            doc_ids = doc_ids.to(torch.int64)
        return AttnMask(index, index, doc_ids, doc_ids, window, contiguous=True)

    @property
    def has_docs(self) -> bool:
        return self.q_doc is not None

    def dense(self) -> Tensor:
        """(bs, sq, sk) bool, True where attention is allowed. Quadratic memory: tests and the reference only."""
        allowed = self.k_index[:, None, :] <= self.q_index[:, :, None]
        if self.window is not None:
            allowed &= (self.q_index[:, :, None] - self.k_index[:, None, :]) < self.window
        if self.q_doc is not None:
            same = self.q_doc[:, :, None] == self.k_doc[:, None, :]
            allowed &= same | (self.k_doc[:, None, :] == ANCHOR_DOC)
        return allowed


AttentionFn = Callable[[Tensor, Tensor, Tensor, AttnMask, float], tuple[Tensor, Tensor]]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float,
                        ) -> tuple[Tensor, Tensor]:
    """Pure-torch attention in fp32: the oracle every other backend and CP mode is tested against.

    Runs on any device; memory is quadratic in the sequence length (a (bs, h, sq, sk) score matrix).
    """
    bs, sq, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    assert n_heads % n_kv_heads == 0, (n_heads, n_kv_heads)
    rep = n_heads // n_kv_heads
    qf = q.float().transpose(1, 2)  # (bs, n_heads, sq, head_dim)
    kf = k.float().transpose(1, 2).repeat_interleave(rep, dim=1)  # (bs, n_heads, sk, head_dim)
    vf = v.float().transpose(1, 2).repeat_interleave(rep, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (bs, n_heads, sq, sk)
    allowed = mask.dense()[:, None]  # (bs, 1, sq, sk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (bs, n_heads, sq)
    # A query that sees no key (possible for one block of ring attention) gets out = 0, lse = -inf.
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None])
    out = probs @ vf  # (bs, n_heads, sq, head_dim)
    return out.transpose(1, 2).to(q.dtype), lse

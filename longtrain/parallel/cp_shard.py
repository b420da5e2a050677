"""Sharding a packed batch over context-parallel ranks (pure functions, no communication).

Layouts:
- zigzag (head-tail): the sequence is cut into 2*cp chunks and rank r keeps chunks r and 2cp-1-r, so
  every rank does the same amount of causal attention work (Striped/zigzag balancing, see
  Brandon et al. 2023 arXiv:2311.09431 and zhuzilin/ring-flash-attention's zigzag ring).
- contiguous: rank r keeps the r-th of cp equal slices (simple; causal work is unbalanced).
- balanced: document-aware (cp_balance.py): long documents zigzag-split over all ranks, the others placed
  whole to even the attention work of packed documents; each row gets its own layout. Lengths need only be
  a multiple of cp.
- auto: zigzag for a row that holds one document, balanced for a packed row (lengths: multiples of 2*cp).

With Ulysses inside cp (cp = ring x ulysses, cp rank = ring_rank * ulysses + ulysses_rank) the zigzag
cut is made for the ring degree and each ring rank's two chunks are split contiguously between its
Ulysses ranks: after Ulysses' all-to-all the ring sees a perfect zigzag layout.

A length that is not a multiple of the layout's chunk count is padded at the end with tokens whose
labels are ignored and that belong to a fresh padding document: no real token attends to them and they
attend to nothing real, so loss and gradients are those of the unpadded batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.kernels.attention import AttnMask
from longtrain.parallel.cp_balance import balanced_shard_indices
from longtrain.parallel.dims import CP_LAYOUTS, padded_seq_len


def _pad_batch(batch: Batch, padded_len: int) -> Batch:
    """Pad every field to `padded_len` along the sequence with an ignored padding document."""
    bs, seqlen = batch.input_ids.shape
    n_pad = padded_len - seqlen
    index = torch.arange(padded_len, device=batch.input_ids.device, dtype=torch.int64).expand(bs, padded_len)
    if n_pad == 0:
        return Batch(batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids, index)

    def pad(x: Tensor, value: int | Tensor) -> Tensor:
        fill = torch.empty(bs, n_pad, dtype=x.dtype, device=x.device)
        fill[:] = value if isinstance(value, int) else value[:, None]
        return torch.cat([x, fill], dim=1)  # (bs, padded_len)

    # A fresh document id per row (larger than any real one, never ANCHOR_DOC = -1).
    pad_doc = batch.doc_ids.max(dim=1).values.clamp(min=0) + 1  # (bs,)
    return Batch(input_ids=pad(batch.input_ids, 0), labels=pad(batch.labels, IGNORE_INDEX),
                 position_ids=pad(batch.position_ids, 0), doc_ids=pad(batch.doc_ids, pad_doc), seq_index=index)


def cp_shard_indices(seqlen: int, cp_rank: int, cp_size: int, mode: str, ulysses: int = 1,
                     device: torch.device | str = "cpu") -> Tensor:
    """Global token indices (int64, sorted by local position) that `cp_rank` holds of a padded sequence.

    Args:
        seqlen: the padded length (a multiple of 2*cp_size for zigzag, of cp_size for contiguous).
        cp_rank: this rank's index in the cp group (ring_rank * ulysses + ulysses_rank).
        cp_size: cp degree (ring x ulysses).
        mode: "zigzag" or "contiguous" (the layouts that do not depend on the documents: `shard_indices`
            takes every layout).
        ulysses: the Ulysses degree inside cp (1: plain ring / all-gather).

    Returns:
        (seqlen // cp_size,) int64 indices.

    Raises:
        ValueError: unknown mode, a rank outside [0, cp_size), cp_size not a multiple of ulysses, or a
            length the layout cannot cut.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")
    if cp_size % ulysses:
        raise ValueError(f"cp_size={cp_size} must be a multiple of ulysses={ulysses}")
    if padded_seq_len(seqlen, cp_size, mode) != seqlen:
        raise ValueError(f"seqlen={seqlen} must be padded to a multiple of {2 * cp_size if mode == 'zigzag' else cp_size}"
                         f" for the {mode} layout with cp={cp_size}")
    local = seqlen // cp_size
    match mode:
        case "contiguous":
            start = cp_rank * local
            return torch.arange(start, start + local, device=device, dtype=torch.int64)
        case "zigzag":
            ring, ring_rank, u_rank = cp_size // ulysses, cp_rank // ulysses, cp_rank % ulysses
            chunk = seqlen // (2 * ring)
            head = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk, device=device, dtype=torch.int64)
            tail_start = (2 * ring - 1 - ring_rank) * chunk
            tail = torch.arange(tail_start, tail_start + chunk, device=device, dtype=torch.int64)
            ring_local = torch.cat([head, tail])  # (2 * chunk,) what the ring rank sees after all-to-all
            return ring_local[u_rank * local:(u_rank + 1) * local]
        case _:
            raise ValueError(f"cp_shard_indices takes the layouts zigzag, contiguous, not {mode!r} (shard_indices "
                             f"takes all: {', '.join(CP_LAYOUTS)})")


def shard_indices(doc_ids: Tensor, cp_rank: int, cp_size: int, mode: str, ulysses: int = 1,
                  window: int | None = None, n_real: int | None = None) -> Tensor:
    """Global token indices (bs, seqlen // cp_size) that `cp_rank` holds, for any layout of CP_LAYOUTS.

    Args:
        doc_ids: (bs, seqlen) document ids of the padded batch.
        cp_rank, cp_size, ulysses: as cp_shard_indices.
        mode: one of CP_LAYOUTS.
        window: sliding window (the balanced layout's cost model), None for full causal.
        n_real: tokens before padding (auto: a row that was one document keeps zigzag); None: seqlen.

    Raises:
        ValueError: unknown mode, or a length the layout cannot cut.
    """
    bs, seqlen = doc_ids.shape
    if padded_seq_len(seqlen, cp_size, mode) != seqlen:
        raise ValueError(f"seqlen={seqlen} must be padded to a multiple of {padded_seq_len(1, cp_size, mode)} for the"
                         f" {mode} layout with cp={cp_size}")
    match mode:
        case "zigzag" | "contiguous":
            return cp_shard_indices(seqlen, cp_rank, cp_size, mode, ulysses, doc_ids.device).expand(bs, -1)
        case "balanced":
            return balanced_shard_indices(doc_ids, cp_rank, cp_size, ulysses, window)
        case "auto":
            real = doc_ids[:, :seqlen if n_real is None else n_real]
            packed = (real != real[:, :1]).any(dim=1)  # (bs,) rows with more than one document
            zig = cp_shard_indices(seqlen, cp_rank, cp_size, "zigzag", ulysses, doc_ids.device).expand(bs, -1)
            if not bool(packed.any()):
                return zig
            bal = balanced_shard_indices(doc_ids[packed], cp_rank, cp_size, ulysses, window)
            out = zig.clone()
            out[packed] = bal
            return out
        case _:
            raise ValueError(f"unknown cp layout {mode!r}; valid: {', '.join(CP_LAYOUTS)}")


def prepare_cp_inputs(batch: Batch, cp_rank: int, cp_size: int, mode: str = "zigzag", ulysses: int = 1,
                      window: int | None = None) -> Batch:
    """Shard a global packed batch for one context-parallel rank.

    input_ids, labels, position_ids and doc_ids are cut together; seq_index receives each kept token's
    index in the (padded) global sequence, and position_ids stay the global rotary positions. Under the
    balanced and auto layouts each row may hold a different set of tokens.

    Args:
        batch: the global batch, (bs, seqlen) tensors, seq_index None.
        cp_rank: this rank's index in the cp group (ring_rank * ulysses + ulysses_rank).
        cp_size: the cp degree.
        mode: one of CP_LAYOUTS: zigzag, contiguous, balanced, auto.
        ulysses: the Ulysses degree inside cp (hybrid and ulysses modes), 1 otherwise.
        window: the model's sliding window: the balanced layout balances windowed work (None: causal).

    Returns:
        The local Batch, (bs, padded_seqlen // cp_size) tensors; padded tokens have label -100.

    Raises:
        ValueError: the batch is already sharded (seq_index set), shapes differ, or a bad layout/rank.
    """
    if batch.seq_index is not None:
        raise ValueError("prepare_cp_inputs expects a global batch (seq_index=None); this one is already sharded")
    shape = batch.input_ids.shape
    for name in ("labels", "position_ids", "doc_ids"):
        if getattr(batch, name).shape != shape:
            raise ValueError(f"batch.{name} has shape {tuple(getattr(batch, name).shape)}, input_ids {tuple(shape)}")
    padded = _pad_batch(batch, padded_seq_len(shape[1], cp_size, mode))
    idx = shard_indices(padded.doc_ids, cp_rank, cp_size, mode, ulysses, window, n_real=shape[1])  # (bs, local)

    def take(x: Tensor) -> Tensor:
        return torch.gather(x, 1, idx)

    return Batch(input_ids=take(padded.input_ids), labels=take(padded.labels),
                 position_ids=take(padded.position_ids), doc_ids=take(padded.doc_ids),
                 seq_index=take(padded.seq_index))


def local_attn_mask(batch: Batch, window: int | None = None) -> AttnMask:
    """The AttnMask of a local (sharded) batch: global indices and document ids on both sides.

    The context-parallel attention functions exchange the key-side metadata across ranks; an
    unsharded batch (seq_index None) gets the plain causal mask.

    Args:
        batch: a batch from prepare_cp_inputs (or a global one).
        window: sliding-window size of the model (ModelArgs.sliding_window), None for full causal.

    Returns:
        The AttnMask to pass to `Transformer.hidden_states(..., mask=...)`.
    """
    if batch.seq_index is None:
        bs, seqlen = batch.input_ids.shape
        return AttnMask.causal(bs, seqlen, batch.input_ids.device, batch.doc_ids, window)
    return AttnMask(q_index=batch.seq_index, k_index=batch.seq_index, q_doc=batch.doc_ids, k_doc=batch.doc_ids,
                    window=window, contiguous=False)


def make_packed_batches(n_batches: int, bs: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[Batch]:
    """Packed multi-document batches that stress CP sharding.

    Each row holds: a few tiny documents (1-3 tokens), one long document (more than half the row,
    so it spans every cp rank), then random-length documents; label positions that cross a document
    boundary are ignored, plus a few random ignored labels. Even batches restart positions per
    document, odd ones run them continuously across documents.

    Returns:
        `n_batches` global Batches of shape (bs, seq_len).
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        ids = torch.randint(0, vocab_size, (bs, seq_len), generator=gen)
        docs = torch.empty(bs, seq_len, dtype=torch.int64)
        for row in range(bs):
            lengths = [int(x) for x in torch.randint(1, 4, (3,), generator=gen)]
            lengths.append(seq_len // 2 + int(torch.randint(1, max(2, seq_len // 4), (1,), generator=gen)))
            while sum(lengths) < seq_len:
                lengths.append(int(torch.randint(1, max(2, seq_len // 6), (1,), generator=gen)))
            pos = 0
            for d, n in enumerate(lengths):
                docs[row, pos:min(pos + n, seq_len)] = d
                pos += n
        labels = torch.full_like(ids, IGNORE_INDEX)
        same_doc = docs[:, 1:] == docs[:, :-1]
        labels[:, :-1] = torch.where(same_doc, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        labels[torch.rand(bs, seq_len, generator=gen) < 0.05] = IGNORE_INDEX
        if b % 2 == 0:  # positions restart at each document
            starts = torch.cat([torch.ones(bs, 1, dtype=torch.bool), ~same_doc], dim=1)
            idx = torch.arange(seq_len).expand(bs, seq_len)
            start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
            positions = idx - start_idx
        else:
            positions = torch.arange(seq_len).expand(bs, seq_len).clone()
        batches.append(Batch(ids, labels, positions, docs))
    return batches

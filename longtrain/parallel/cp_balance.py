"""Document-aware context-parallel sharding: balance the attention work of packed documents (issue 21).

With document masks a rank's attention work is the number of (query, key) pairs it computes: for a
document piece of queries [a, b) whose document starts at s, sum_{i=a}^{b-1} (i - s + 1) pairs (capped at
the window). Zigzag by position balances one causal document, not a packed mix: the rank holding the
tail of a long document does far more work than one holding many short documents (docs/parallelism.md,
"Layout: balanced", has the measured table).

The balanced layout, per row, for `ring` ranks of `local = seqlen / ring` tokens each:
1. The k longest documents are split zigzag over all ranks (2*ring equal chunks, rank r keeps chunks r
   and 2*ring-1-r), the same work and tokens on every rank, at every ring step. The last
   `n % (2 * ring)` tokens of such a document become a piece of step 2.
2. Every other document (and those remainders) is placed whole, largest work first, on the least loaded
   rank that still has room for it (LPT, Graham 1969, under the token capacity every rank must fill
   exactly); a piece no rank has room for is cut into runs that fill the least loaded ranks.
k starts at the number of documents that one rank cannot take whole (longer than `local`, or more work
than a rank's share) and grows while that lowers the largest rank's work, up to a few trials; the first k
within `TOLERANCE` of a perfect split wins. One document alone gives exactly the zigzag layout.
Each rank keeps its tokens in ascending global order (runs of consecutive tokens: varlen-friendly).

This is the idea of WLB-LLM (OSDI'25, per-document sharding) and Megatron's dynamic CP, on the layout
machinery longtrain already has: the AttnMask carries global token indices and document ids, so ring,
all-gather and hybrid attention take any permutation of the tokens over ranks (tests/distributed).
"""

from __future__ import annotations

import torch
from torch import Tensor

TOLERANCE = 0.01  # stop adding zigzag-split documents once the largest rank is within 1% of the mean
MAX_TRIALS = 8  # values of k tried past the first


def doc_runs(doc_row: Tensor | list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal document ids in one row."""
    doc_row = torch.as_tensor(doc_row)
    cuts = ((doc_row[1:] != doc_row[:-1]).nonzero().squeeze(1) + 1).tolist()
    bounds = [0] + cuts + [doc_row.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def _prefix_work(n: int, window: int | None) -> int:
    """Pairs of the first n queries of a document: sum_{j=1}^{n} min(j, window)."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def piece_work(doc_start: int, a: int, b: int, window: int | None = None) -> int:
    """Useful (query, key) pairs of the queries [a, b) of a document that starts at `doc_start`."""
    return _prefix_work(b - doc_start, window) - _prefix_work(a - doc_start, window)


def _assign(runs: list[tuple[int, int]], ring: int, local: int, n_split: int, window: int | None,
            ) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Pieces ([a, b) global ranges) of each ring rank and each rank's work, with the n_split longest runs
    split zigzag over all ranks and the rest placed by LPT under the token capacity `local`."""
    order = sorted(range(len(runs)), key=lambda i: (runs[i][0] - runs[i][1], runs[i][0]))  # longest first
    split = set(order[:n_split])
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(ring)]
    load, room = [0] * ring, [local] * ring
    items = []  # (work, a, b, doc_start) placed whole if they fit
    for i, (s, e) in enumerate(runs):
        if i not in split:
            items.append((piece_work(s, s, e, window), s, e, s))
            continue
        chunk = (e - s) // (2 * ring)
        if chunk:
            for r in range(ring):
                for c in (r, 2 * ring - 1 - r):
                    a = s + c * chunk
                    pieces[r].append((a, a + chunk))
                    load[r] += piece_work(s, a, a + chunk, window)
                room[r] -= 2 * chunk
        tail = s + 2 * ring * chunk
        if tail < e:
            items.append((piece_work(s, tail, e, window), tail, e, s))
    items.sort(key=lambda t: (-t[0], t[1]))
    for _, a, b, s in items:
        fits = [r for r in range(ring) if room[r] >= b - a]
        if fits:
            r = min(fits, key=lambda r: (load[r], r))
            pieces[r].append((a, b))
            load[r] += piece_work(s, a, b, window)
            room[r] -= b - a
            continue
        while a < b:  # no rank has room for the whole piece: fill the least loaded ranks with runs of it
            r = min((r for r in range(ring) if room[r] > 0), key=lambda r: (load[r], r))
            end = min(b, a + room[r])
            pieces[r].append((a, end))
            load[r] += piece_work(s, a, end, window)
            room[r] -= end - a
            a = end
    assert all(x == 0 for x in room), room
    return pieces, load


def balanced_pieces(doc_row: Tensor | list[int], ring: int, window: int | None = None) -> list[list[tuple[int, int]]]:
    """The balanced layout of one row: each ring rank's [a, b) ranges in ascending order.

    Args:
        doc_row: the row's document ids, (S,) (S a multiple of `ring`).
        ring: the number of ranks that shard the sequence (cp / ulysses).
        window: sliding window of the model, None for full causal (only the cost model uses it).

    Returns:
        `ring` lists of ranges covering every token once, each rank `len(doc_row) // ring` tokens.
    """
    seqlen = len(doc_row)
    assert seqlen % ring == 0, (seqlen, ring)
    local = seqlen // ring
    runs = doc_runs(doc_row)
    if ring == 1:
        return [[(0, seqlen)]]
    total = sum(piece_work(s, s, e, window) for s, e in runs)
    share = total / ring
    # Documents no rank can take whole: longer than a rank's tokens, or more work than a rank's share.
    k0 = sum(1 for s, e in runs if e - s > local or piece_work(s, s, e, window) > share)
    best = None
    for k in range(k0, min(len(runs), k0 + MAX_TRIALS) + 1):
        pieces, load = _assign(runs, ring, local, k, window)
        if best is None or max(load) < best[0]:
            best = (max(load), pieces)
        if max(load) <= share * (1 + TOLERANCE):
            break
    return [sorted(p) for p in best[1]]


def balanced_shard_indices(doc_ids: Tensor, cp_rank: int, cp_size: int, ulysses: int = 1,
                           window: int | None = None) -> Tensor:
    """Global token indices (bs, seqlen // cp_size) that `cp_rank` holds under the balanced layout.

    Each row gets its own layout (rows hold different documents). With Ulysses inside cp the layout is
    solved for the ring degree and each ring rank's tokens are split contiguously between its Ulysses
    ranks, as the zigzag layout does: the ring then sees a balanced layout after the all-to-all.
    """
    bs, seqlen = doc_ids.shape
    ring, ring_rank, u_rank = cp_size // ulysses, cp_rank // ulysses, cp_rank % ulysses
    local = seqlen // cp_size
    rows = []
    for row in doc_ids.cpu():
        ranges = balanced_pieces(row, ring, window)[ring_rank]
        idx = torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in ranges])  # (seqlen // ring,)
        rows.append(idx[u_rank * local:(u_rank + 1) * local])
    return torch.stack(rows).to(doc_ids.device)


def pair_counts(doc_row: Tensor, owner: Tensor, world: int, window: int | None = None) -> Tensor:
    """Exact useful (query, key) pairs between ranks for one row: (world, world), [query rank, key rank].

    Args:
        doc_row: (S,) document ids (runs of equal ids are documents; causal inside each).
        owner: (S,) the rank that holds each token.
        world: number of ranks.
        window: sliding window, None for full causal.

    Step s of a ring on rank r computes entry [r, (r - s) % world]; a rank's total is its row sum.
    """
    s = doc_row.numel()
    idx = torch.arange(s)
    new = torch.ones(s, dtype=torch.bool)
    new[1:] = doc_row[1:] != doc_row[:-1]
    doc_start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), 0).values  # (S,)
    lo = doc_start if window is None else torch.maximum(doc_start, idx - window + 1)
    onehot = torch.nn.functional.one_hot(owner, world).to(torch.int64)  # (S, world)
    csum = torch.cat([torch.zeros(1, world, dtype=torch.int64), onehot.cumsum(0)])  # (S + 1, world)
    keys = csum[idx + 1] - csum[lo]  # (S, world): keys of each rank that query i sees
    out = torch.zeros(world, world, dtype=torch.int64)
    out.index_add_(0, owner, keys)
    return out

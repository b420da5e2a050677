"""Context-parallel attention functions (same signature as a local backend) and `apply_cp`.

Modes (`CP_MODES`):
- ring:             K/V ring-passed over the cp group (ring_attention.py), zigzag-balanced.
- allgather:        K/V (and key metadata) all-gathered, one local call; backward reduce-scatters dK/dV
                    (Llama 3 paper, arXiv:2407.21783, section 3.3.2: robust for packed documents).
- ulysses:          all-to-all from sequence to head sharding, one local call on the full sequence, and
                    back (DeepSpeed-Ulysses, arXiv:2309.14509). Needs n_heads % cp == 0.
- hybrid:           Ulysses inside groups of `ulysses` ranks, ring across groups (USP, arXiv:2405.07719).
- hybrid_allgather: Ulysses inside groups, all-gather across groups.

The model hands every layer the local AttnMask (`cp_shard.local_attn_mask`); these functions exchange
the key-side metadata themselves and cache what they derive from it in `mask.cache` (once per
forward pass, shared by all layers).

Natural order. Zigzag sharding makes the gathered sequence (Ulysses) and the gathered keys (all-gather)
a permutation of the natural token order, whose mask a fused kernel cannot take (attention_layout.py:
"general", i.e. flex). When the gathered indices are exactly a permutation of 0..S-1, the same in every
row, both modes reorder tokens once into natural order so the local backend gets a "causal" / "varlen" /
"full" call (flex on "general" scaled worse: docs/benchmarks.md, "Earlier weak scaling").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from longtrain.kernels.attention import AttentionFn, AttnMask
from longtrain.parallel.cp_ops import all_gather_meta, all_gather_seq, head_to_seq, merge_partials, seq_to_head
from longtrain.parallel.dims import ParallelDims, submesh
from longtrain.parallel.ring_attention import ring_attention
from longtrain.types import CP_MODES  # the mode names, defined once at the bottom layer (config reads them too)


@dataclass
class CPGroups:
    """Process groups of context parallelism: the whole cp group and its ring x ulysses factors."""

    cp: ProcessGroup
    ring: ProcessGroup
    ulysses: ProcessGroup

    @staticmethod
    def from_mesh(mesh: DeviceMesh) -> "CPGroups":
        """Groups from a mesh built by ParallelDims.build_mesh (dims `cp`, `ring`, `ulysses`)."""
        return CPGroups(cp=submesh(mesh, "cp").get_group(), ring=submesh(mesh, "ring").get_group(),
                        ulysses=submesh(mesh, "ulysses").get_group())


def _single_doc(q_doc: Tensor | None, k_doc: Tensor | None) -> bool:
    """True when every query and key of a row is in the same document: the document mask is then a no-op."""
    if q_doc is None:
        return True
    first = k_doc[:, :1]  # (bs, 1)
    return bool((k_doc == first).all()) and bool((q_doc == first).all())


def _natural_perm(index: Tensor) -> Tensor | None:
    """The permutation that sorts every row of `index` (bs, S) into 0..S-1, or None if there is none.

    None when rows differ (one permutation must serve the whole batch) or a row is not a permutation of
    0..S-1 (a gap or repeat in the indices). One host sync; callers cache the result per forward pass.
    """
    row = index[0]
    if not bool((index == row).all()):
        return None
    perm = torch.argsort(row)
    if not torch.equal(row[perm], torch.arange(row.numel(), device=row.device, dtype=row.dtype)):
        return None
    return perm


@dataclass
class _GatherPiece:
    """Queries `rows` (a run of consecutive global indices starting at `start`) against natural-order keys:
    the causal diagonal [start, start + len) and, when start > 0, the fully visible past [0, start)."""

    rows: slice
    start: int
    diag: AttnMask
    past: AttnMask | None


@dataclass
class _GatherPlan:
    perm: Tensor  # (world * sk,) gathered key position of natural token j
    pieces: list[_GatherPiece]


def _allgather_plan(mask: AttnMask, k_index: Tensor, k_doc: Tensor | None) -> _GatherPlan | None:
    """The natural-order plan for causal self-attention of sharded queries, or None (use the general mask).

    Only without a window and with at most one document per row (the kernels' "full" layout has no
    documents); the local queries must be the local keys, in runs of consecutive indices (zigzag: two).
    """
    if mask.window is not None or not _single_doc(mask.q_doc, k_doc) or not torch.equal(mask.q_index, mask.k_index):
        return None
    perm = _natural_perm(k_index)  # also: k_index, hence q_index, is the same in every row
    if perm is None:
        return None
    qi = mask.q_index[0]  # (sq,)
    breaks = ((qi[1:] - qi[:-1]) != 1).nonzero().squeeze(1) + 1  # local positions where a new run starts
    bounds = [0] + breaks.tolist() + [qi.numel()]
    starts = qi[bounds[:-1]].tolist()
    bs, device = mask.q_index.shape[0], qi.device
    pieces = []
    for lo, hi, start in zip(bounds[:-1], bounds[1:], starts):
        idx = torch.arange(start, start + hi - lo, device=device).expand(bs, -1)  # (bs, run)
        past = None
        if start > 0:
            past = AttnMask(idx, torch.arange(start, device=device).expand(bs, -1), contiguous=False)
        pieces.append(_GatherPiece(slice(lo, hi), start, AttnMask(idx, idx, contiguous=False), past))
    return _GatherPlan(perm, pieces)


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float, group: ProcessGroup,
                        backend: AttentionFn) -> tuple[Tensor, Tensor]:
    """Local queries against all-gathered keys/values of `group`.

    When the gathered keys are a permutation of the whole sequence (zigzag or contiguous sharding, one
    document, no window), they are put in natural order and each run of consecutive local queries
    [a, a + c) makes two dense calls, the causal diagonal [a, a + c) and the fully visible past [0, a),
    merged by LSE. Otherwise one backend call with the gathered (general) mask.

    Args:
        q: (bs, sq, n_heads, head_dim); k, v: (bs, sk, n_kv_heads, head_dim), same sk on every rank.
        mask: local AttnMask; the gathered key mask (or natural-order plan) is cached in `mask.cache`.
        scale: softmax scale.
        group: the ranks whose keys are gathered.
        backend: local attention function.

    Returns:
        out (bs, sq, n_heads, head_dim), lse (bs, n_heads, sq) fp32.
    """
    if dist.get_world_size(group) == 1:
        return backend(q, k, v, mask, scale)
    key = ("allgather_mask", id(group))
    if key not in mask.cache:
        with torch.no_grad():
            k_index = all_gather_meta(mask.k_index, group)
            k_doc = None if mask.k_doc is None else all_gather_meta(mask.k_doc, group)
            mask.cache[key] = _allgather_plan(mask, k_index, k_doc) or AttnMask(
                q_index=mask.q_index, k_index=k_index, q_doc=mask.q_doc, k_doc=k_doc, window=mask.window,
                contiguous=False)
    k_all, v_all = all_gather_seq(k, group), all_gather_seq(v, group)  # (bs, world * sk, n_kv_heads, head_dim)
    plan = mask.cache[key]
    if isinstance(plan, AttnMask):
        return backend(q, k_all, v_all, plan, scale)
    k_nat, v_nat = k_all.index_select(1, plan.perm), v_all.index_select(1, plan.perm)  # natural token order
    outs, lses = [], []
    for piece in plan.pieces:
        qp, end = q[:, piece.rows], piece.start + piece.rows.stop - piece.rows.start
        out, lse = backend(qp, k_nat[:, piece.start:end], v_nat[:, piece.start:end], piece.diag, scale)
        if piece.past is not None:  # the merge runs in fp32; a chunk with no past needs no round trip
            out_p, lse_p = backend(qp, k_nat[:, :piece.start], v_nat[:, :piece.start], piece.past, scale)
            out, lse = merge_partials(out.float(), lse.float(), out_p, lse_p)
        outs.append(out.to(q.dtype))
        lses.append(lse.float())
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _natural_mask(mask: AttnMask) -> tuple[Tensor | None, Tensor | None, AttnMask] | None:
    """(perm, its inverse, the mask in natural order) for a gathered whole-sequence self-attention mask, or None.

    perm and its inverse are None when the gathered order is already natural: the usual case, as
    prepare_cp_inputs with ulysses = cp cuts the zigzag for a ring of one, i.e. contiguously.
    """
    if not torch.equal(mask.q_index, mask.k_index):
        return None
    if mask.q_doc is not None and mask.k_doc is not mask.q_doc and not torch.equal(mask.q_doc, mask.k_doc):
        return None
    perm = _natural_perm(mask.q_index)
    if perm is None:
        return None
    bs, s = mask.q_index.shape
    # One document per row (no padding): drop it, so the kernels see plain "causal", not one-segment varlen.
    doc = None if _single_doc(mask.q_doc, mask.k_doc) else mask.q_doc.index_select(1, perm)
    natural = AttnMask.causal(bs, s, perm.device, doc, mask.window)
    identity = torch.arange(s, device=perm.device)
    if torch.equal(perm, identity):
        return None, None, natural
    inv = torch.empty_like(perm)
    inv[perm] = identity
    return perm, inv, natural


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float, group: ProcessGroup,
                      inner: AttentionFn, sort_to_natural: bool = False) -> tuple[Tensor, Tensor]:
    """Ulysses: trade sequence sharding for head sharding inside `group`, attend with `inner`, trade back.

    With fewer K/V heads than the group size, K/V heads are replicated (by world / gcd(n_kv_heads, world))
    so every rank holds the K/V heads its query heads use.

    Args:
        q: (bs, s, n_heads, head_dim); k, v: (bs, s, n_kv_heads, head_dim).
        mask: local AttnMask; the gathered (full sequence of the group) mask is cached in `mask.cache`.
        scale: softmax scale.
        group: the Ulysses group.
        inner: the attention on the gathered sequence: a local backend, or ring/allgather across groups.
        sort_to_natural: `inner` is a local backend and the group is the whole cp group, so the gathered
            sequence is the whole sequence: put it in natural order (a "causal"/"varlen" mask) when the
            gathered indices allow. False in hybrid modes, where the gathered sequence is a ring shard.

    Returns:
        out (bs, s, n_heads, head_dim), lse (bs, n_heads, s) fp32.

    Raises:
        ValueError: n_heads is not divisible by the group size.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return inner(q, k, v, mask, scale)
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads % world:
        raise ValueError(f"Ulysses degree {world} must divide the number of attention heads ({n_heads}); "
                         f"valid degrees: {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}")
    if n_kv % world:
        # GQA with fewer K/V heads than ranks: kv head m -> kv heads m*rep .. m*rep+rep-1, which keeps
        # query head i on kv head i // (n_heads / n_kv) and makes n_kv * rep = lcm(n_kv, world).
        rep = world // math.gcd(n_kv, world)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    key = ("ulysses_mask", id(group))
    if key not in mask.cache:
        with torch.no_grad():
            q_index = all_gather_meta(mask.q_index, group)
            k_index = q_index if mask.k_index is mask.q_index else all_gather_meta(mask.k_index, group)
            q_doc = None if mask.q_doc is None else all_gather_meta(mask.q_doc, group)
            k_doc = q_doc if mask.k_doc is mask.q_doc else all_gather_meta(mask.k_doc, group)
            gathered = AttnMask(q_index, k_index, q_doc, k_doc, window=mask.window, contiguous=False)
            mask.cache[key] = gathered
            if sort_to_natural:
                mask.cache[("ulysses_natural", id(group))] = _natural_mask(gathered)
    qh, kh, vh = seq_to_head(q, group), seq_to_head(k, group), seq_to_head(v, group)  # (bs, world*s, h/world, d)
    natural = mask.cache.get(("ulysses_natural", id(group))) if sort_to_natural else None
    if natural is None:
        out, lse = inner(qh, kh, vh, mask.cache[key], scale)
    else:
        perm, inv, nat_mask = natural
        if perm is not None:
            qh, kh, vh = (t.index_select(1, perm) for t in (qh, kh, vh))  # natural token order
        out, lse = inner(qh, kh, vh, nat_mask, scale)
        if perm is not None:
            out, lse = out.index_select(1, inv), lse.index_select(2, inv)  # back to the gathered order
    out = head_to_seq(out, group)  # (bs, s, n_heads, head_dim)
    lse = head_to_seq(lse.transpose(1, 2).unsqueeze(-1), group)  # (bs, s, n_heads, 1)
    return out, lse.squeeze(-1).transpose(1, 2)


def make_cp_attention(mode: str, groups: CPGroups | DeviceMesh, local_backend: AttentionFn) -> AttentionFn:
    """An AttentionFn that runs context-parallel attention, for `Transformer.set_attention`.

    Args:
        mode: one of CP_MODES.
        groups: CPGroups, or a mesh from ParallelDims.build_mesh.
        local_backend: per-rank attention (the reference backend on CPU).

    Returns:
        attn(q, k, v, mask, scale) -> (out, lse) on local (sharded) tensors.

    Raises:
        ValueError: unknown mode.
    """
    if isinstance(groups, DeviceMesh):
        groups = CPGroups.from_mesh(groups)
    match mode:
        case "ring":
            return partial(ring_attention, group=groups.cp, backend=local_backend)
        case "allgather":
            return partial(allgather_attention, group=groups.cp, backend=local_backend)
        case "ulysses":
            # The gathered sequence is the whole sequence: let the local backend see it in natural order.
            return partial(ulysses_attention, group=groups.cp, inner=local_backend, sort_to_natural=True)
        case "hybrid":
            inner = partial(ring_attention, group=groups.ring, backend=local_backend)
            return partial(ulysses_attention, group=groups.ulysses, inner=inner)
        case "hybrid_allgather":
            inner = partial(allgather_attention, group=groups.ring, backend=local_backend)
            return partial(ulysses_attention, group=groups.ulysses, inner=inner)
        case _:
            raise ValueError(f"unknown cp mode {mode!r}; valid: {', '.join(CP_MODES)}")


def cp_ulysses_degree(mode: str, dims: ParallelDims) -> int:
    """The Ulysses degree the sharding must use for `mode` (prepare_cp_inputs' `ulysses`), checked against dims.

    Raises:
        ValueError: unknown mode, or dims.ulysses inconsistent with the mode.
    """
    match mode:
        case "ring" | "allgather":
            if dims.ulysses != 1:
                raise ValueError(f"cp mode {mode!r} uses no Ulysses stage but ulysses={dims.ulysses}; use "
                                 f"cp mode 'hybrid' (or 'hybrid_allgather'), or ulysses=1")
            return 1
        case "ulysses":
            if dims.ulysses not in (1, dims.cp):
                raise ValueError(f"cp mode 'ulysses' runs Ulysses over all cp={dims.cp} ranks but ulysses="
                                 f"{dims.ulysses}; set ulysses={dims.cp} (or 1), or use cp mode 'hybrid'")
            return dims.cp
        case "hybrid" | "hybrid_allgather":
            return dims.ulysses
        case _:
            raise ValueError(f"unknown cp mode {mode!r}; valid: {', '.join(CP_MODES)}")


def apply_cp(model: torch.nn.Module, mode: str, mesh: DeviceMesh, local_backend: AttentionFn) -> None:
    """Install context-parallel attention in every layer of `model` (via `model.set_attention`).

    Args:
        model: a longtrain Transformer.
        mode: one of CP_MODES.
        mesh: a mesh from ParallelDims.build_mesh.
        local_backend: the per-rank attention backend.

    Raises:
        ValueError: unknown mode; n_heads not divisible by the Ulysses degree.
    """
    if mode in ("ulysses", "hybrid", "hybrid_allgather"):
        degree = submesh(mesh, "cp" if mode == "ulysses" else "ulysses").size()
        n_heads = model.args.n_heads
        if n_heads % degree:
            raise ValueError(f"cp mode {mode!r}: Ulysses degree {degree} must divide n_heads={n_heads}; valid "
                             f"degrees: {[d for d in range(1, n_heads + 1) if n_heads % d == 0]}")
    model.set_attention(make_cp_attention(mode, mesh, local_backend))

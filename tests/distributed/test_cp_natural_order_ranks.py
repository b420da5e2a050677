"""Ulysses and all-gather CP attention in natural token order: parity with the reference on the whole
sequence (out, lse, dq/dk/dv), and the layout the local backend sees (causal / varlen / full, not general).

Cases: one document with a length divisible by 2*cp (no padding: the natural-order paths), one document
padded (a padding document: Ulysses varlen, all-gather falls back to the general mask), packed documents,
packed documents with a sliding window (Ulysses only takes windows in natural order).

Tolerance: fp32 throughout; only the summation order differs from the reference (LSE merge, gradient
reductions), a few ulps, hence 1e-5.
"""

import pytest
import torch
import torch.distributed as dist

from spawn_util import run_ranks

from longtrain.data.batch import Batch
from longtrain.kernels.attention import AttnMask, attention_reference
from longtrain.kernels.attention_layout import classify
from longtrain.parallel.context_parallel import CPGroups, make_cp_attention, ulysses_attention
from longtrain.parallel.cp_shard import local_attn_mask, prepare_cp_inputs
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.cp_shard import make_packed_batches

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5  # fp32: only reduction order differs from the reference


class _Recording:
    """The reference backend, recording the layout kind of every call it gets."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def __call__(self, q, k, v, mask, scale):
        self.kinds.add(classify(mask, q.shape[1], k.shape[1]).kind)
        return attention_reference(q, k, v, mask, scale)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _batch(kind: str, bs: int, seqlen: int) -> Batch:
    batch = make_packed_batches(1, bs, seqlen, 100, seed=1)[0]
    if kind == "one_doc":
        batch = Batch(batch.input_ids, batch.labels, batch.position_ids, torch.zeros_like(batch.doc_ids))
    return batch


def _parity(world: int, attn, batch: Batch, layout: str, ulysses: int, window: int | None, what: str,
            n_heads: int = 4, n_kv: int = 2) -> None:
    """`attn` on this rank's shard vs the reference on the whole sequence, forward and backward."""
    bs, seqlen = batch.input_ids.shape
    head_dim, scale = 8, 8 ** -0.5
    gen = torch.Generator().manual_seed(0)  # the same global tensors on every rank
    q = torch.randn(bs, seqlen, n_heads, head_dim, generator=gen)
    k, v = (torch.randn(bs, seqlen, n_kv, head_dim, generator=gen) for _ in range(2))
    w_out = torch.randn(bs, seqlen, n_heads, head_dim, generator=gen)
    w_lse = torch.randn(bs, n_heads, seqlen, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_mask = AttnMask.causal(bs, seqlen, "cpu", batch.doc_ids, window)
    out_ref, lse_ref = attention_reference(*leaves, ref_mask, scale)
    ((out_ref * w_out).sum() + (lse_ref * w_lse).sum()).backward()

    local = prepare_cp_inputs(batch, dist.get_rank(), world, layout, ulysses)
    idx, real = local.seq_index, local.seq_index < seqlen  # (bs, s); padding tokens are not real
    safe = idx.clamp(max=seqlen - 1)

    def take(t: torch.Tensor) -> torch.Tensor:  # (bs, seqlen, ...) -> this rank's tokens
        return torch.stack([t[b, safe[b]] for b in range(bs)])

    ql, kl, vl = (take(t).requires_grad_() for t in (q, k, v))
    out, lse = attn(ql, kl, vl, local_attn_mask(local, window), scale)
    assert _rel(out[real], take(out_ref.detach())[real]) < FP32_TOL, what
    lse_ref_local = take(lse_ref.detach().transpose(1, 2))  # (bs, s, h)
    assert _rel(lse.transpose(1, 2)[real], lse_ref_local[real]) < FP32_TOL, what
    wl_out = take(w_out) * real[..., None, None]
    wl_lse = take(w_lse.transpose(1, 2)).transpose(1, 2) * real[:, None, :]
    ((out * wl_out).sum() + (lse * wl_lse).sum()).backward()
    for name, local_leaf, leaf in zip("qkv", (ql, kl, vl), leaves):
        g = torch.zeros_like(leaf.grad)
        for b in range(bs):
            g[b].index_add_(0, idx[b][real[b]], local_leaf.grad[b][real[b]])
        dist.all_reduce(g)
        assert _rel(g, leaf.grad) < FP32_TOL, f"{what} d{name}"


def _check(world: int) -> None:
    n = 2 * world * 6  # divisible by 2*cp: no padding
    mesh = ParallelDims(cp=world, ulysses=world, world_size=world).build_mesh("cpu")
    # (data, seqlen, window, layout the Ulysses backend must see)
    # (data, seqlen, window, sharding's Ulysses degree, layout the backend must see). Sharded with
    # ulysses=cp (as the trainer does) the gathered order is already natural; sharded as a plain zigzag
    # (ulysses=1) it is a permutation that is sorted and unsorted around the backend call.
    ulysses_cases = [("one_doc", n, None, world, {"causal"}), ("one_doc", n - 3, None, world, {"varlen"}),
                     ("packed", n - 3, None, world, {"varlen"}), ("packed", n, 5, world, {"varlen"}),
                     ("one_doc", n, None, 1, {"causal"}), ("packed", n - 3, None, 1, {"varlen"}),
                     ("packed", n, 5, 1, {"varlen"})]
    for data, seqlen, window, shard_u, expect in ulysses_cases:
        what = f"ulysses cp={world} {data} seqlen={seqlen} window={window} sharded with ulysses={shard_u}"
        rec = _Recording()
        _parity(world, make_cp_attention("ulysses", mesh, rec), _batch(data, 2, seqlen), "zigzag", shard_u,
                window, what)
        assert rec.kinds == expect, (what, rec.kinds)
    # The old path (gathered order, general mask) still works and is what hybrid modes use.
    rec = _Recording()
    old = lambda *a: ulysses_attention(*a, group=CPGroups.from_mesh(mesh).cp, inner=rec)  # noqa: E731
    _parity(world, old, _batch("packed", 2, n - 3), "zigzag", 1, None, f"ulysses cp={world} unsorted")
    assert rec.kinds == {"general"}, rec.kinds

    mesh = ParallelDims(cp=world, world_size=world).build_mesh("cpu")
    # All-gather: one document without padding is split into causal diagonals and fully visible pasts.
    rank = dist.get_rank()
    first_chunk_only = {"causal"}  # rank 0's first run starts at 0: no past
    allgather_cases = [("one_doc", n, "zigzag", {"causal", "full"}),
                       ("one_doc", n, "contiguous", first_chunk_only if rank == 0 else {"causal", "full"}),
                       ("one_doc", n - 3, "zigzag", {"general"}), ("packed", n, "zigzag", {"general"})]
    for data, seqlen, layout, expect in allgather_cases:
        what = f"allgather cp={world} {data} seqlen={seqlen} {layout}"
        rec = _Recording()
        _parity(world, make_cp_attention("allgather", mesh, rec), _batch(data, 2, seqlen), layout, 1, None, what)
        assert rec.kinds == expect, (what, rec.kinds)


def _ranks(rank: int, world: int) -> None:
    _check(world)


def test_natural_order_world2():
    run_ranks(_ranks, 2)


def test_natural_order_world4():
    run_ranks(_ranks, 4)

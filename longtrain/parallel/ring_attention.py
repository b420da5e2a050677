"""Ring attention (Liu et al. 2023, arXiv:2310.01889) over any local attention backend, exact gradients.

Forward: each rank keeps its queries; K/V blocks travel around the ring point to point (batched
isend/irecv), the transfer of the next block overlapping the compute of the current one. Partial
outputs are merged with the log-sum-exp in fp32 (cp_ops.merge_partials).

Backward (a custom autograd.Function) goes around the ring again: K/V travel as in the forward and an
fp32 dK/dV accumulator travels with them, so after a full turn every block's gradient is back with its
owner. Each block's gradient is computed by re-running the local backend under autograd (as flash
attention recomputes its probabilities) with the upstream gradients a merged output induces on a part:
for O = sum_i w_i O_i, w_i = exp(lse_i - L), L = logsumexp_i lse_i,

    dO_i = w_i dO,    dlse_i = w_i * (rowsum(dO * (O_i - O)) + dL).

So a backend must be differentiable in both `out` and `lse` (the reference backend is).

Load balance: a block (query sub-chunk, key sub-chunk) whose smallest key index exceeds the largest
query index (causal) or lies beyond the window is skipped. Each rank's local sequence is viewed as two
halves; with the zigzag layout that skips exactly the fully masked halves, so every step costs every
rank half a block after the first (Brandon et al. 2023, arXiv:2311.09431).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from longtrain.kernels.attention import AttentionFn, AttnMask
from longtrain.parallel.cp_ops import all_gather_meta, merge_partials


@dataclass
class RingBlock:
    rows: slice  # local query positions
    cols: slice  # positions in the source rank's K/V
    mask: AttnMask


@dataclass
class _RingPlan:
    """Which sub-block each ring step computes (None: fully masked, skipped). One per forward pass."""

    blocks: list[RingBlock | None]  # indexed by step; step s holds the K/V of rank (rank - s) % world
    send_to: int  # global rank of the next rank in the ring
    recv_from: int


def _halves(n: int) -> list[slice]:
    return [slice(0, n // 2), slice(n // 2, n)] if n % 2 == 0 and n >= 2 else [slice(0, n)]


def ring_blocks(mask: AttnMask, k_index: Tensor, k_doc: Tensor | None, rank: int, world: int,
                ) -> list[RingBlock | None]:
    """The sub-block each ring step computes on `rank` (None: fully masked, skipped). No communication.

    Args:
        mask: this rank's local AttnMask.
        k_index, k_doc: (bs, world * sk) key metadata of all ranks in rank order.
        rank, world: position in the ring.

    Returns:
        One entry per step; step s holds the K/V of rank (rank - s) % world.
    """
    sq, sk = mask.q_index.shape[1], mask.k_index.shape[1]
    q_parts, k_parts = _halves(sq), _halves(sk)
    # Per sub-chunk bounds over the whole batch, on the host once per forward pass (one sync).
    q_max = torch.stack([mask.q_index[:, p].max() for p in q_parts])
    q_min = torch.stack([mask.q_index[:, p].min() for p in q_parts])
    kk = k_index.view(k_index.shape[0], world, sk)
    k_min = torch.stack([kk[:, :, p].amin(dim=(0, 2)) for p in k_parts], dim=1)  # (world, n_k_parts)
    k_max = torch.stack([kk[:, :, p].amax(dim=(0, 2)) for p in k_parts], dim=1)
    q_max, q_min, k_min, k_max = q_max.tolist(), q_min.tolist(), k_min.tolist(), k_max.tolist()
    blocks: list[RingBlock | None] = []
    for step in range(world):
        src = (rank - step) % world
        need = [[k_min[src][b] <= q_max[a] and (mask.window is None or q_min[a] - k_max[src][b] < mask.window)
                 for b in range(len(k_parts))] for a in range(len(q_parts))]
        rows = [a for a in range(len(q_parts)) if any(need[a])]
        cols = [b for b in range(len(k_parts)) if any(need[a][b] for a in rows)]
        if not rows:
            blocks.append(None)
            continue
        r = slice(q_parts[rows[0]].start, q_parts[rows[-1]].stop)
        c = slice(k_parts[cols[0]].start, k_parts[cols[-1]].stop)
        src_cols = slice(src * sk + c.start, src * sk + c.stop)
        blocks.append(RingBlock(r, c, AttnMask(
            q_index=mask.q_index[:, r], k_index=k_index[:, src_cols],
            q_doc=None if mask.q_doc is None else mask.q_doc[:, r],
            k_doc=None if k_doc is None else k_doc[:, src_cols], window=mask.window, contiguous=False)))
    return blocks


def _build_plan(mask: AttnMask, group: ProcessGroup) -> _RingPlan:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k_index = all_gather_meta(mask.k_index, group)  # (bs, world * sk)
    k_doc = all_gather_meta(mask.k_doc, group) if mask.k_doc is not None else None
    return _RingPlan(ring_blocks(mask, k_index, k_doc, rank, world),
                     send_to=dist.get_global_rank(group, (rank + 1) % world),
                     recv_from=dist.get_global_rank(group, (rank - 1) % world))


def _start_shift(x: Tensor, plan: _RingPlan, group: ProcessGroup) -> tuple[Tensor, list]:
    """Send `x` to the next rank and receive the previous rank's into a new buffer (asynchronous)."""
    buf = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, plan.send_to, group), dist.P2POp(dist.irecv, buf, plan.recv_from, group)]
    return buf, dist.batch_isend_irecv(ops)


def _wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _RingPlan, group: ProcessGroup,
                backend: AttentionFn, scale: float) -> tuple[Tensor, Tensor]:
        bs, sq, h, d = q.shape
        out = torch.zeros(bs, sq, h, d, dtype=torch.float32, device=q.device)
        lse = torch.full((bs, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # (2, bs, sk, n_kv_heads, d): one message per step
        world = len(plan.blocks)
        for step, blk in enumerate(plan.blocks):
            if step + 1 < world:
                nxt, reqs = _start_shift(kv, plan, group)
            if blk is not None:
                o, l = backend(q[:, blk.rows], kv[0][:, blk.cols], kv[1][:, blk.cols], blk.mask, scale)
                out[:, blk.rows], lse[:, :, blk.rows] = merge_partials(out[:, blk.rows], lse[:, :, blk.rows], o, l)
            if step + 1 < world:
                _wait(reqs)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.backend, ctx.scale = plan, group, backend, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, backend, scale = ctx.plan, ctx.group, ctx.backend, ctx.scale
        world = len(plan.blocks)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv_reqs: list = []
        dkv_in = None
        for step, blk in enumerate(plan.blocks):
            if step + 1 < world:
                nxt, reqs = _start_shift(kv, plan, group)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # grads of the block held now
            if blk is not None:
                gq, gk, gv = _block_grads(q, kv, out, lse, dout, dlse, blk, backend, scale)
                dq[:, blk.rows] += gq
                dkv[0][:, blk.cols] += gk
                dkv[1][:, blk.cols] += gv
            if step > 0:
                _wait(dkv_reqs)  # the accumulator of this same block, from the previous rank
                dkv += dkv_in
            dkv_in, dkv_reqs = _start_shift(dkv, plan, group)
            if step + 1 < world:
                _wait(reqs)
                kv = nxt
        _wait(dkv_reqs)  # after a full turn, the accumulator of our own block is back
        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None, None


def _block_grads(q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
                 blk: RingBlock, backend: AttentionFn, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one ring block (see the module docstring), fp32."""
    with torch.enable_grad():
        qb = q[:, blk.rows].detach().requires_grad_()
        kb = kv[0][:, blk.cols].detach().requires_grad_()
        vb = kv[1][:, blk.cols].detach().requires_grad_()
        ob, lb = backend(qb, kb, vb, blk.mask, scale)  # (bs, sqb, h, d), (bs, h, sqb)
    final = lse[:, :, blk.rows]
    seen = torch.isfinite(lb) & torch.isfinite(final)
    w = torch.where(seen, torch.exp(lb.detach().float() - torch.where(seen, final, 0.0)), 0.0)  # (bs, h, sqb)
    do = dout[:, blk.rows].float()  # (bs, sqb, h, d)
    g_out = do * w.transpose(1, 2).unsqueeze(-1)
    g_lse = (do * (ob.detach().float() - out[:, blk.rows].float())).sum(-1).transpose(1, 2)  # (bs, h, sqb)
    if dlse is not None:
        g_lse = g_lse + dlse[:, :, blk.rows].float()
    g_lse = w * g_lse
    gq, gk, gv = torch.autograd.grad((ob, lb), (qb, kb, vb), (g_out.to(ob.dtype), g_lse.to(lb.dtype)),
                                     allow_unused=True)
    zero = torch.zeros_like
    return ((gq if gq is not None else zero(qb)).float(), (gk if gk is not None else zero(kb)).float(),
            (gv if gv is not None else zero(vb)).float())


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float, group: ProcessGroup,
                   backend: AttentionFn) -> tuple[Tensor, Tensor]:
    """Attention of local queries against the keys of every rank in `group`, ring-passed.

    Args:
        q: (bs, sq, n_heads, head_dim) local queries.
        k, v: (bs, sk, n_kv_heads, head_dim) local keys/values (same sk on every rank).
        mask: local AttnMask (global indices and doc ids); key-side metadata is gathered once per
            forward pass and the ring plan cached in `mask.cache`, so all layers share it.
        scale: softmax scale.
        group: the ring's process group.
        backend: local attention function, differentiable in out and lse.

    Returns:
        out (bs, sq, n_heads, head_dim) in q.dtype and lse (bs, n_heads, sq) fp32.
    """
    if dist.get_world_size(group) == 1:
        return backend(q, k, v, mask, scale)
    key = ("ring_plan", id(group))
    if key not in mask.cache:
        with torch.no_grad():
            mask.cache[key] = _build_plan(mask, group)
    return _RingAttention.apply(q, k, v, mask.cache[key], group, backend, scale)

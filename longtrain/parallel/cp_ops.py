"""Building blocks of context-parallel attention: the LSE merge and differentiable sequence collectives.

All collectives take an explicit process group and work with any backend (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single; the old names warn (FutureWarning)
# on every call, once per rank per step (issue 20). Same collectives; older torch has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def merge_partials(out: Tensor, lse: Tensor, out_blk: Tensor, lse_blk: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets, in fp32 (PITFALLS.md: never in bf16).

    With L = logaddexp(lse, lse_blk): out_new = exp(lse - L) * out + exp(lse_blk - L) * out_blk.
    Rows that saw no key in either part keep out = 0, lse = -inf (no NaN).

    Args:
        out: (bs, s, h, d) fp32 accumulated output.
        lse: (bs, h, s) fp32 accumulated log-sum-exp (-inf where nothing was seen yet).
        out_blk: (bs, s, h, d) any float dtype, the new block's output.
        lse_blk: (bs, h, s) the new block's log-sum-exp.

    Returns:
        (out, lse) merged, fp32.
    """
    lse_blk = lse_blk.float()
    new_lse = torch.logaddexp(lse, lse_blk)  # (bs, h, s)
    safe = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
    w_old = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)  # (bs, s, h, 1)
    w_blk = torch.exp(lse_blk - safe).transpose(1, 2).unsqueeze(-1)
    return out * w_old + out_blk.float() * w_blk, new_lse


def all_gather_meta(x: Tensor, group: ProcessGroup) -> Tensor:
    """Concatenate (bs, s) metadata (indices, doc ids) of all ranks along the sequence, in rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x.contiguous(), group=group)
    return out.view(world, *x.shape).transpose(0, 1).reshape(x.shape[0], world * x.shape[1])  # (bs, world * s)


class _AllGatherSeq(torch.autograd.Function):
    """(bs, s, h, d) -> (bs, world * s, h, d) in rank order; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        bs, s = x.shape[:2]
        out = torch.empty((world * bs,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous(), group=group)
        out = out.view(world, bs, *x.shape[1:]).transpose(0, 1)  # (bs, world, s, h, d)
        return out.reshape(bs, world * s, *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        world = dist.get_world_size(ctx.group)
        bs, ws = grad.shape[:2]
        s = ws // world
        parts = grad.reshape(bs, world, s, *grad.shape[2:]).transpose(0, 1).contiguous()  # (world, bs, s, h, d)
        out = torch.empty((bs, s) + tuple(grad.shape[2:]), dtype=grad.dtype, device=grad.device)
        # Every rank's queries used every rank's keys: the key gradient is the sum over ranks.
        _reduce_scatter(out, parts.view(world * bs, s, *grad.shape[2:]), op=dist.ReduceOp.SUM,
                                   group=ctx.group)
        return out, None


def all_gather_seq(x: Tensor, group: ProcessGroup) -> Tensor:
    """Differentiable all-gather along the sequence (dim 1), backward = reduce-scatter (sum)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherSeq.apply(x, group)


def _all_to_all(x: Tensor, group: ProcessGroup) -> Tensor:
    """all_to_all_single on dim 0 (chunk i goes to rank i, chunk j of the result came from rank j)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like keeps strides, and a2a writes flat memory
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: Tensor, group: ProcessGroup) -> Tensor:
    world = dist.get_world_size(group)
    bs, s, h, d = x.shape
    parts = x.reshape(bs, s, world, h // world, d).permute(2, 0, 1, 3, 4)  # (world, bs, s, h / world, d)
    got = _all_to_all(parts, group)  # (world, bs, s, h / world, d): chunk j = rank j's tokens, my heads
    return got.permute(1, 0, 2, 3, 4).reshape(bs, world * s, h // world, d)


def _head_to_seq(x: Tensor, group: ProcessGroup) -> Tensor:
    world = dist.get_world_size(group)
    bs, ws, hl, d = x.shape
    s = ws // world
    parts = x.reshape(bs, world, s, hl, d).transpose(0, 1)  # (world, bs, s, h / world, d): rank j's tokens
    got = _all_to_all(parts, group)  # (world, bs, s, h / world, d): chunk j = my tokens, rank j's heads
    return got.permute(1, 2, 0, 3, 4).reshape(bs, s, world * hl, d)


class _SeqToHead(torch.autograd.Function):
    """Ulysses (Jacobs et al. 2023, arXiv:2309.14509): (bs, s, h, d) sequence-sharded ->
    (bs, world * s, h / world, d) head-sharded; the backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _head_to_seq(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _seq_to_head(grad, ctx.group), None


def seq_to_head(x: Tensor, group: ProcessGroup) -> Tensor:
    """Differentiable all-to-all (bs, s, h, d) -> (bs, world * s, h / world, d). h % world == 0."""
    if dist.get_world_size(group) == 1:
        return x
    return _SeqToHead.apply(x, group)


def head_to_seq(x: Tensor, group: ProcessGroup) -> Tensor:
    """Differentiable all-to-all (bs, world * s, h / world, d) -> (bs, s, h, d), inverse of seq_to_head."""
    if dist.get_world_size(group) == 1:
        return x
    return _HeadToSeq.apply(x, group)

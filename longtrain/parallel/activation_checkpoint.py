"""Activation checkpointing per block (full or selective) and offload of what it saves.

Modes (applied from outside: each block's `forward` is wrapped on the instance; decoder code unchanged):

- "none": autograd saves everything a block needs for backward.
- "full": each block saves only its input and recomputes itself in backward (Chen et al. 2016,
  arXiv:1604.06174). Costs one extra block forward, attention included.
- "selective": each block is checkpointed with a per-op policy (torch selective activation checkpoint)
  that *saves the outputs of the attention kernel* (output and log-sum-exp) and recomputes the rest
  (norms, projections, RoPE, MLP). Attention is the costly op at long context (quadratic), the rest is
  linear and cheap to redo (Korthikanti et al. 2022, arXiv:2205.05198, "selective recomputation";
  PITFALLS.md). The attention ops recognised are the fused aten SDPA kernels (flash, cuDNN, efficient,
  flash-for-CPU), longtrain's flash-attn-4 op and flash-attn's ops when loaded; `save_ops` adds others.
  An attention written as many small ops (the pure-torch reference) has no single op to keep and is
  recomputed like the rest.

`offload=True` moves what the blocks save to host memory (parallel/offload.py): with "full" only the
block inputs (plus RoPE cos/sin once) go to the host, so GPU activation memory no longer grows with the
layer count (ALST, arXiv:2506.13996, "activation checkpoint offload to CPU"); with "none" everything a
block saves goes to the host. The full+offload path uses the re-entrant checkpoint, whose inputs are
saved through autograd (`ctx.save_for_backward`) and therefore through the offload hooks; the
non-re-entrant one keeps its inputs in a closure, out of reach of the hooks. Selective + offload is not
supported (torch keeps the selectively saved outputs in a private cache the hooks do not see).

`seq_tile=N` runs each block as [per-token pre-attention part] -> attention -> [per-token post-attention
part], the per-token parts over sequence tiles of N tokens, each tile checkpointed (ALST, arXiv:2506.13996,
"sequence tiling" of the non-attention compute). Then a block keeps, besides its input, only attention's
inputs and outputs (q, k, v, out, LSE): the fp32 norm/RoPE intermediates and the 4 x intermediate MLP
tensors exist for one tile at a time. With "full" this bounds the working set of the layer being
recomputed in backward, which is what limits the sequence length once block inputs are offloaded.
The tiled block calls the block's own submodules in decoder.py's order (`_tiled_block_forward`); the
parity tests compare it with the block's forward.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longtrain.kernels.attention import selective_save_ops
from longtrain.parallel.offload import GIB, ActivationOffloader

AC_MODES = ("none", "selective", "full")


def attention_ops() -> set:
    """Attention kernel ops whose outputs selective checkpointing keeps: each backend's entry names its own
    (kernels/attention_backends.py `saved_ops`), those present in this torch build."""
    return selective_save_ops()


def _tiled_block_forward(block: nn.Module, tile: int, x: Tensor, cos: Tensor, sin: Tensor, mask) -> Tensor:
    """decoder.Block.forward with its per-token parts run over checkpointed sequence tiles."""
    attn = block.self_attn

    def pre(x_t: Tensor, cos_t: Tensor, sin_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return attn.qkv(block.input_layernorm(x_t), cos_t, sin_t)  # each (bs, tile, heads, head_dim)

    def post(x_t: Tensor, o_t: Tensor) -> Tensor:
        bs, n = o_t.shape[:2]
        y = x_t + attn.o_proj(o_t.reshape(bs, n, -1))  # (bs, tile, dim)
        return y + block.mlp(block.post_attention_layernorm(y))

    grad = torch.is_grad_enabled()

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)

    seqlen = x.shape[1]
    tiles = [(s, min(seqlen, s + tile)) for s in range(0, seqlen, tile)]
    parts = [run(pre, x[:, s:e], cos[:, s:e], sin[:, s:e]) for s, e in tiles]
    q, k, v = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # (bs, seqlen, heads, head_dim)
    del parts
    out, _lse = attn.attn_fn(q, k, v, mask, attn.scale)  # (bs, seqlen, n_heads, head_dim)
    return torch.cat([run(post, x[:, s:e], out[:, s:e]) for s, e in tiles], dim=1)  # (bs, seqlen, dim)


def _tiled_checkpoint_forward(fn, tile: int, x: Tensor) -> Tensor:
    """A per-token module's forward over checkpointed sequence tiles (the final norm's fp32 copy never whole)."""
    if not torch.is_grad_enabled():
        return fn(x)
    seqlen = x.shape[1]
    return torch.cat([checkpoint(fn, x[:, s:s + tile], use_reentrant=False) for s in range(0, seqlen, tile)], dim=1)


def _policy(save_ops: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def _budget_then(offloader: ActivationOffloader, n_stored: int, fn, *args) -> Tensor:
    x, cos = args[-4], args[-3]
    if torch.is_grad_enabled():
        needed = n_stored * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
        offloader.check(needed, f"{n_stored} stored block inputs of shape {tuple(x.shape)} {x.dtype} + RoPE cos/sin")
    return fn(*args)


def _full(orig, x: Tensor, cos: Tensor, sin: Tensor, mask) -> Tensor:
    return checkpoint(orig, x, cos, sin, mask, use_reentrant=False)


def _selective(orig, context_fn, x: Tensor, cos: Tensor, sin: Tensor, mask) -> Tensor:
    return checkpoint(orig, x, cos, sin, mask, use_reentrant=False, context_fn=context_fn)


def _offloaded(orig, offloader: ActivationOffloader, mode: str, n_layers: int, is_first: bool,
               x: Tensor, cos: Tensor, sin: Tensor, mask) -> Tensor:
    if mode == "full" and is_first and torch.is_grad_enabled():
        # Fail early, before layer 0 offloads anything: all layers' inputs plus RoPE cos/sin once.
        needed = n_layers * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
        offloader.check(needed, f"{n_layers} layer inputs of shape {tuple(x.shape)} {x.dtype} + RoPE cos/sin")
    if not torch.is_grad_enabled():
        return orig(x, cos, sin, mask)
    with offloader.hooks():
        if mode == "full":
            # Re-entrant: its inputs go through ctx.save_for_backward, hence through the offload hooks.
            return checkpoint(orig, x, cos, sin, mask, use_reentrant=True)
        return orig(x, cos, sin, mask)


class _Group:
    """Blocks that share one stored checkpoint: the leader's input (checkpoint_stride)."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.leader_input: Tensor | None = None


def _gathered(block: nn.Module):
    """The block's FSDP2 parameters unsharded for a forward outside its own hooks (a no-op when unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(block, FSDPModule):
        block.unshard()
        return block.reshard
    return lambda: None


class _FromLeader(torch.autograd.Function):
    """A block's full checkpoint that keeps its group leader's input instead of its own.

    Forward runs the block without a graph and saves the leader's input (already saved by the leader, so the
    offloader's dedup stores it once). Backward first re-runs the blocks from the leader up to this one,
    without a graph, to get this block's input back, then recomputes the block with a graph and
    back-propagates through it: one extra forward of the blocks before it in the group, for 1/stride of the
    checkpoint memory (host RAM when offloaded).
    """

    @staticmethod
    def forward(ctx, x: Tensor, leader_x: Tensor, cos: Tensor, sin: Tensor, mask, before: list, fn) -> Tensor:
        ctx.save_for_backward(leader_x, cos, sin)
        ctx.mask, ctx.before, ctx.fn = mask, before, fn
        with torch.no_grad():
            return fn(x, cos, sin, mask)

    @staticmethod
    def backward(ctx, dy: Tensor):
        leader_x, cos, sin = ctx.saved_tensors
        x = leader_x
        with torch.no_grad():
            for block, fn in ctx.before:  # the group's earlier blocks, parameters gathered one at a time
                done = _gathered(block)
                x = fn(x, cos, sin, ctx.mask)
                done()
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = ctx.fn(x, cos, sin, ctx.mask)
        torch.autograd.backward(y, dy)
        return x.grad, None, None, None, None, None, None


def _member(orig, group: _Group, index: int, offloader: ActivationOffloader | None, x: Tensor, cos: Tensor,
            sin: Tensor, mask) -> Tensor:
    if index == 0:  # the leader: a normal (offloaded) full checkpoint, whose input the members reuse
        group.leader_input = x
        if offloader is None:
            return _full(orig, x, cos, sin, mask)
        return _offloaded(orig, offloader, "full", 1, False, x, cos, sin, mask)
    if not torch.is_grad_enabled():
        return orig(x, cos, sin, mask)
    before = [(b, b._ac_orig) for b in group.blocks[:index]]
    if offloader is None:
        return _FromLeader.apply(x, group.leader_input, cos, sin, mask, before, orig)
    with offloader.hooks():
        return _FromLeader.apply(x, group.leader_input, cos, sin, mask, before, orig)


def apply_ac(model: nn.Module, mode: str, offload: bool = False, host_budget_bytes: int | None = None,
             save_ops: set | None = None, offload_min_bytes: int = 1 << 20, seq_tile: int | None = None,
             gpu_layers: int = 0, stride: int = 1) -> ActivationOffloader | None:
    """Checkpoint (and optionally offload) the activations of every block of `model`.

    Args:
        model: a longtrain `Transformer` (anything with `.layers` of blocks called as block(x, cos, sin, mask)).
        mode: "none" | "selective" | "full" (see the module docstring).
        offload: move saved activations to host memory (pinned, side stream on CUDA).
        host_budget_bytes: host RAM the offloaded activations may use; None = 90% of what is available.
        save_ops: extra ops whose outputs selective mode keeps (added to `attention_ops()`).
        offload_min_bytes: saved tensors smaller than this stay on the device.
        seq_tile: run each block's per-token parts, and the final norm, over checkpointed sequence tiles of
            this many tokens (None: the modules' own forward).
        gpu_layers: with offload and full checkpointing, the last `gpu_layers` blocks keep their checkpoint on
            the GPU (a budget split: the host holds the rest). The last blocks are the first the backward
            needs, so they are the ones not to fetch back.
        stride: with full checkpointing, one checkpoint per `stride` blocks (of those offloaded, or of all
            without offload): the other blocks of a group re-run the blocks before them from the group's
            stored input in backward (_FromLeader). 1: every block keeps its own. FSDP2 or unsharded only.

    Returns:
        The ActivationOffloader when offload is on (its `peak_bytes` reports host usage), else None.

    Raises:
        ValueError: unknown mode, a model without `.layers`, seq_tile < 1, or a budget larger than the
            available host RAM.
        NotImplementedError: selective + offload.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"apply_ac: {type(model).__name__} has no `.layers` of blocks")
    _check_ac_args(mode, offload, seq_tile, gpu_layers, stride, len(layers))
    offloader = ActivationOffloader(host_budget_bytes, offload_min_bytes) if offload else None
    n_offloaded = len(layers) - gpu_layers if offload else len(layers)
    groups = [_Group(list(layers[g:min(g + stride, n_offloaded)])) for g in range(0, n_offloaded, stride)]
    context_fn = None
    if mode == "selective":
        ops = frozenset(attention_ops() | set(save_ops or ()))
        context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, ops))
    for i, block in enumerate(layers):
        if not hasattr(block, "_unwrapped_forward"):
            block._unwrapped_forward = block.forward
        orig = block._unwrapped_forward
        if seq_tile is not None:
            orig = functools.partial(_tiled_block_forward, block, seq_tile)
        block._ac_orig = orig  # what a group's later blocks re-run of this one (stride > 1)
        if stride > 1 and i < n_offloaded:
            if i == 0 and offloader is not None:  # fail early: every group's stored input + RoPE cos/sin
                fn = functools.partial(_budget_then, offloader, len(groups), _member, orig, groups[0], 0, offloader)
            else:
                fn = functools.partial(_member, orig, groups[i // stride], i % stride, offloader)
        elif offloader is not None and i < n_offloaded:
            fn = functools.partial(_offloaded, orig, offloader, mode, n_offloaded, i == 0)
        elif mode == "full":  # also the last gpu_layers blocks of an offloaded model
            fn = functools.partial(_full, orig)
        elif mode == "selective":
            fn = functools.partial(_selective, orig, context_fn)
        else:
            fn = orig
        block.forward = types.MethodType(lambda self, x, cos, sin, mask, _fn=fn: _fn(x, cos, sin, mask), block)
    norm = getattr(model, "norm", None)
    if seq_tile is not None and norm is not None:
        _tile_final_norm(norm, seq_tile)
    return offloader


def _check_ac_args(mode: str, offload: bool, seq_tile: int | None, gpu_layers: int, stride: int,
                   n_layers: int) -> None:
    """apply_ac's checks on its switches (see its Raises)."""
    match mode:
        case "none" | "full" | "selective":
            pass
        case _:
            raise ValueError(f"apply_ac: mode {mode!r} is not known; valid: {', '.join(AC_MODES)}")
    if offload and mode == "selective":
        raise NotImplementedError("activation offload with selective checkpointing is not supported: use "
                                  "memory.activation_checkpoint=full with offload (ALST layout), or selective "
                                  "without offload")
    if seq_tile is not None and seq_tile < 1:
        raise ValueError(f"apply_ac: seq_tile must be >= 1 or None, got {seq_tile}")
    if gpu_layers and not (offload and mode == "full"):
        raise ValueError(f"apply_ac: gpu_layers={gpu_layers} splits offloaded full checkpoints between GPU and "
                         f"host; it needs mode 'full' with offload")
    if not 0 <= gpu_layers <= n_layers:
        raise ValueError(f"apply_ac: gpu_layers must be in 0..{n_layers} (the model's layers), got {gpu_layers}")
    if stride < 1 or (stride > 1 and mode != "full"):
        raise ValueError(f"apply_ac: stride={stride}: one checkpoint per `stride` blocks needs mode 'full' and "
                         f"stride >= 1")


def _tile_final_norm(norm: nn.Module, seq_tile: int) -> None:
    """The final RMSNorm keeps an fp32 copy of the whole sequence (8 GiB at 1M tokens x 2048): tile it too."""
    if not hasattr(norm, "_unwrapped_forward"):
        norm._unwrapped_forward = norm.forward
    norm.forward = types.MethodType(
        lambda self, x, _t=seq_tile: _tiled_checkpoint_forward(self._unwrapped_forward, _t, x), norm)


__all__ = ["AC_MODES", "GIB", "apply_ac", "attention_ops"]

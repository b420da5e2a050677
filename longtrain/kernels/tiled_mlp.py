"""Tiled MLP: each block's SwiGLU MLP runs over sequence tiles, recomputed in backward.

The MLP is per-token, so splitting the sequence into tiles gives the same result. Without tiling, a
block's MLP keeps gate, up, silu(gate) and their product alive: ~4 x seq x intermediate values, which at
1M tokens and intermediate 8192 is 64 GiB in bf16 for *one* layer's backward. Each tile here runs under a
non-reentrant activation checkpoint that saves only the tile's input, so at most one tile's intermediates
exist at a time, in forward and in backward (ALST, "Arctic Long Sequence Training", arXiv:2506.13996,
TiledMLP; the cost is one extra MLP forward per tile).

FSDP2 / ZeRO-3: the tiles run inside the MLP module's own forward, after the sharding wrapper's
pre-forward hook has gathered its parameters, and every tile reads the parameters from the module at call
time (nothing is cached across calls), so gathered-on-the-fly parameters and DTensors work; the weight
gradients of all tiles accumulate into the module's gradients during the module's single backward.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Auto tile: 8192 tokens keep one tile's intermediates at 3 x 8192 x 8192 x 2 B = 384 MiB for Llama-3.2-1B
# while each GEMM stays large enough (8192 rows) to run near peak.
AUTO_TILE_TOKENS = 8192
# `tiled_mlp: auto` tiles from this many tokens, where the MLP's intermediate activations (seq x
# intermediate_size per layer) start to dominate (Arctic long-sequence training, arXiv:2506.13996).
TILED_MLP_AUTO_FROM = 32768

# The `tiled_mlp` setting as parallel.apply, the planner and check-parallel take it: False / None: no tiling,
# True: AUTO_TILE_TOKENS, an int: tokens per tile ("auto" is the recipe's spelling, resolved by `mlp_tile`).
TiledMlp = bool | int | None


def mlp_tile(setting: TiledMlp | str, tokens: int | None = None) -> int | None:
    """Tokens per MLP tile, or None for no tiling: the one reading of every `tiled_mlp` spelling.

    Args:
        setting: False / None (off), True (AUTO_TILE_TOKENS), an int (tokens per tile) or "auto".
        tokens: what "auto" looks at: tiling from TILED_MLP_AUTO_FROM tokens on.

    Raises:
        ValueError: an unknown setting, or "auto" without `tokens`.
    """
    match setting:
        case None | False:
            return None
        case True:
            return AUTO_TILE_TOKENS
        case "auto" if tokens is not None:
            return AUTO_TILE_TOKENS if tokens >= TILED_MLP_AUTO_FROM else None
        case int():
            return setting
        case _:
            raise ValueError(f"tiled_mlp = {setting!r} is invalid: auto (with a token count), true, false or "
                             f"tokens per tile")


def tiled_mlp_forward(mlp: nn.Module, x: Tensor, tile_tokens: int) -> Tensor:
    """Run `mlp`'s original forward over sequence tiles of `tile_tokens`, checkpointing each tile.

    Args:
        mlp: a module whose per-token forward is `mlp._untiled_forward`.
        x: (bs, seqlen, dim).
        tile_tokens: tokens per tile (>= 1).

    Returns:
        (bs, seqlen, dim), equal to the untiled forward.
    """
    fn = mlp._untiled_forward
    seqlen = x.shape[1]
    if seqlen <= tile_tokens or not torch.is_grad_enabled():
        # One tile (or inference, where nothing is saved): plain forward.
        return fn(x) if seqlen <= tile_tokens else torch.cat(
            [fn(x[:, s:s + tile_tokens]) for s in range(0, seqlen, tile_tokens)], dim=1)
    outs = [checkpoint(fn, x[:, s:s + tile_tokens], use_reentrant=False)  # (bs, tile, dim) each
            for s in range(0, seqlen, tile_tokens)]
    return torch.cat(outs, dim=1)  # (bs, seqlen, dim)


def apply_tiled_mlp(model: nn.Module, tile_tokens: int | None) -> int:
    """Make the MLP of every block run over sequence tiles with recomputation in backward.

    Wraps from outside: each block's `mlp.forward` is replaced on the instance (parameter names,
    state dicts and the decoder code are unchanged). Applying twice re-tiles with the new size.

    Args:
        model: a longtrain `Transformer` (anything with `.layers[i].mlp`).
        tile_tokens: tokens per tile; None = AUTO_TILE_TOKENS.

    Returns:
        The tile size in use.

    Raises:
        ValueError: tile_tokens < 1, or the model has no `layers[i].mlp`.
    """
    tile = AUTO_TILE_TOKENS if tile_tokens is None else tile_tokens
    if tile < 1:
        raise ValueError(f"apply_tiled_mlp: tile_tokens must be >= 1 or None (auto = {AUTO_TILE_TOKENS}), got {tile}")
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"apply_tiled_mlp: {type(model).__name__} has no `layers[i].mlp` to tile")
    for layer in layers:
        mlp = layer.mlp
        if not hasattr(mlp, "_untiled_forward"):
            mlp._untiled_forward = mlp.forward  # the bound original forward
        mlp.tile_tokens = tile
        mlp.forward = types.MethodType(lambda self, x: tiled_mlp_forward(self, x, self.tile_tokens), mlp)
    return tile

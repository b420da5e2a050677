"""FSDP2 with bf16 compute must not cast the rope cos/sin that every block receives (PITFALLS.md: fp32 angles)."""

from __future__ import annotations

import torch

from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.fsdp import apply_fsdp
from spawn_util import run_ranks


def _rope_dtype_in_blocks(rank: int, world: int) -> None:
    dims = ParallelDims(dp_shard=world, world_size=world)
    mesh = dims.build_mesh("cpu")
    model = Transformer(model_flavor("debug"))
    model.init_weights(0)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1].dtype)))
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model(torch.randint(0, 100, (1, 32)))
    hidden, cos = seen[0]
    assert hidden == torch.bfloat16, hidden  # the blocks still compute in bf16
    assert cos == torch.float32, cos  # and the rope angles stay fp32


def test_fsdp2_bf16_keeps_rope_fp32() -> None:
    run_ranks(_rope_dtype_in_blocks, 2)

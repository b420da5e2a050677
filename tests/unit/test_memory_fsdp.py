"""Tiled MLP, sequence-tiled blocks and activation checkpointing on FSDP2-sharded blocks (2 gloo ranks, CPU).

The blocks' parameters are DTensor shards gathered on the fly by FSDP2's hooks; the tiles and the
recomputation must read them at call time. Both ranks run the same batch, so FSDP2's averaged gradients
must equal the single-process gradients.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.kernels.linear_cross_entropy import linear_cross_entropy
from longtrain.kernels.tiled_mlp import apply_tiled_mlp
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel.activation_checkpoint import apply_ac

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6  # fp32; sharding only changes where sums happen


def _grads(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(ids)
    linear_cross_entropy(h, model.output_weight, labels, chunk_tokens=16).backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


SETUPS = ("tiled_mlp+full", "seq_tile+selective", "seq_tile+full+offload")


def _worker(rank: int, init_file: str, result_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    lines = []
    try:
        for setup in SETUPS:
            torch.manual_seed(0)
            ids = torch.randint(0, 512, (1, 40))
            labels = torch.randint(0, 512, (1, 40))
            model = Transformer(model_flavor("debug"))
            model.init_weights(0)
            expected = _grads(model, ids, labels)  # single-process reference, identical on both ranks
            match setup:
                case "tiled_mlp+full":
                    apply_tiled_mlp(model, 8)
                    apply_ac(model, "full")
                case "seq_tile+selective":
                    apply_ac(model, "selective", seq_tile=8)
                case "seq_tile+full+offload":
                    apply_ac(model, "full", offload=True, offload_min_bytes=0, seq_tile=8)
            for block in model.layers:  # shard the blocks; the root (embedding, final norm) stays replicated
                fully_shard(block)
            got = _grads(model, ids, labels)
            ok = all(torch.allclose(got[n], expected[n], rtol=RTOL, atol=ATOL) for n in expected)
            worst = max(((got[n] - expected[n]).abs().max().item(), n) for n in expected)
            lines.append(f"{setup} {ok} {worst[0]:.3e} {worst[1]}")
        if rank == 0:
            with open(result_file, "w") as f:
                f.write("\n".join(lines))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_switches_on_fsdp2_blocks() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(init_file, result_file), nprocs=WORLD, join=True)
        lines = open(result_file).read().splitlines()
    assert [line.split()[0] for line in lines] == list(SETUPS)
    for line in lines:
        setup, ok, worst, name = line.split()
        assert ok == "True", f"{setup}: largest gradient difference {worst} in {name}"

"""DeepSpeed ZeRO-3 with ring context parallelism against cp=1, and its checkpoint helpers (gloo, fp32)."""

import os
import tempfile

import pytest
import torch

from spawn_util import run_ranks

pytest.importorskip("deepspeed", reason="pip install deepspeed (the `deepspeed` extra)")
pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5  # fp32: only reduction order differs from cp=1


def _zero3(rank: int, world: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp

    from longtrain.model.args import model_flavor
    from longtrain.model.decoder import Transformer
    from longtrain.parallel.deepspeed import deepspeed_wrap
    from longtrain.parallel.dims import ParallelDims
    from longtrain.parallel.fsdp import load_model_state_dict, model_state_dict
    from longtrain.trainer.check_parallel import check_parallel

    debug = model_flavor("debug")
    rep = check_parallel(debug, 37, cp=2, mode="ring", sharding="deepspeed", zero_stage=3, bs=2)
    assert rep.ok(FP32_TOL) and rep.grad_norm > 0, rep

    # ZeRO-3 really partitions: each rank holds about half of every parameter.
    mesh = ParallelDims(cp=2, world_size=world).build_mesh("cpu")
    model = Transformer(debug)
    model.init_weights(2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    engine = deepspeed_wrap(model, mesh, zero_stage=3)
    p = engine.module.model.layers[0].mlp.up_proj.weight
    assert p.ds_tensor.numel() == (p.ds_numel + 1) // 2 and p.numel() == 0

    # Checkpoint helpers: full weights out, DCP round trip, back into the partitions.
    state = model_state_dict(engine)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    dcp.save({"model": state}, checkpoint_id=f"{tmp}/ckpt")
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    load_model_state_dict(engine, zeros)
    assert float(model_state_dict(engine)["norm.weight"].abs().sum()) == 0.0
    loaded = {"model": {k: torch.empty_like(v) for k, v in state.items()}}
    dcp.load(loaded, checkpoint_id=f"{tmp}/ckpt")
    load_model_state_dict(engine, loaded["model"])
    after = model_state_dict(engine)
    assert all(torch.equal(after[k], expected[k]) for k in expected)


def test_deepspeed_zero3_cp2():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probe on CPU machines
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_zero3, 2, tmp)


def _zero3_offload(rank: int, world: int) -> None:
    import torch.distributed as dist

    from longtrain.kernels.attention import attention_reference
    from longtrain.model.args import model_flavor
    from longtrain.model.decoder import Transformer
    from longtrain.parallel.context_parallel import apply_cp
    from longtrain.parallel.cp_shard import local_attn_mask, prepare_cp_inputs
    from longtrain.parallel.deepspeed import deepspeed_wrap, ds_backward
    from longtrain.parallel.dims import ParallelDims
    from longtrain.parallel.cp_shard import make_packed_batches
    from longtrain.trainer.engine import TorchEngine

    mesh = ParallelDims(cp=2, world_size=world).build_mesh("cpu")
    model = Transformer(model_flavor("debug"))
    model.init_weights(0)
    batch = make_packed_batches(1, 1, 40, 512, seed=4)[0]
    first_ref = float(TorchEngine(model, None).loss_sum(batch, None, 40)) / batch.num_valid_tokens  # cp=1, before any update
    apply_cp(model, "ring", mesh, attention_reference)
    engine = deepspeed_wrap(model, mesh, zero_stage=3, offload_optimizer=True, offload_params=True)
    local = prepare_cp_inputs(batch, rank, world)
    losses = []
    for _ in range(3):
        loss = engine(local.input_ids, local.position_ids, local.labels, local_attn_mask(local)) / batch.num_valid_tokens
        ds_backward(engine, loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    assert abs(losses[0] - first_ref) / first_ref < FP32_TOL, (losses, first_ref)
    assert losses[2] < losses[0], losses  # the offloaded CPU Adam updates the partitioned weights


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam op on first use
def test_deepspeed_zero3_offload_trains():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_ranks(_zero3_offload, 2)

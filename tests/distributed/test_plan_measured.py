"""The planner's parameter, gradient and optimizer bytes per rank against what FSDP2 really holds on gloo ranks at
cp=2 and cp=4 (it shards over dp_shard x cp), and against DeepSpeed ZeRO-3's partitions at cp=2."""

import json
import os
import sys
from pathlib import Path

import pytest

from spawn_util import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytestmark = pytest.mark.distributed
# FSDP2 pads each parameter's dim 0 to a multiple of the shard count; ZeRO pads its flat partitions: the
# planner's n / shard is exact up to that padding.
PADDING_RTOL = 0.02
SHAPE = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32, "intermediate_size": 256,
         "vocab_size": 1024}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _measure(rank: int, world: int, overrides: list[str], out: str) -> None:
    import torch

    from longtrain.config import build_recipe
    from longtrain.trainer import build
    from longtrain.trainer.distributed import init_distributed
    from longtrain.trainer.train import train_step

    torch.set_num_threads(1)
    raw = {"name": "m", "model": {"flavor": "debug", "overrides": SHAPE},
           "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
           "stages": [{"name": "s", "seq_len": 160, "steps": 1}]}
    recipe = build_recipe(raw, [f"run_dir={out}.run", *overrides])
    info = init_distributed()
    layout = build.build_layout(recipe, info)
    engine = build.build_engine(recipe, info, layout)
    from longtrain.trainer.data import build_batch_source
    from longtrain.data.tokenizer import load_tokenizer

    st = recipe.stages[0]
    source = build_batch_source(st.data, load_tokenizer("builtin"), st.seq_len, 1, layout.dp_rank, layout.dp_size)
    if engine.backend == "deepspeed":
        ds = engine.ds
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in ds.module.parameters())
        measured = {"params": params}
    else:
        params = _local_bytes(engine.model.parameters())
        # gradients exist after the backward; read them before the step frees them (the engine zeroes them)
        engine.step = _keep_grads(engine.step, engine)
        train_step(engine, [source.next_batch()], info, layout, st, inject_nan=False)
        states = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
        measured = {"params": params, "grads": engine.grad_bytes, "optimizer": _local_bytes(states)}
    source.close()
    if rank == 0:
        Path(out).write_text(json.dumps(measured))


def _keep_grads(step, engine):
    def wrapped(*args, **kwargs):
        engine.grad_bytes = _local_bytes(p.grad for p in engine.model.parameters() if p.grad is not None)
        return step(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("world,overrides", [
    (2, ["parallel.cp=2", "parallel.cp_mode=ring"]),
    (4, ["parallel.cp=4", "parallel.cp_mode=ring"]),
    (2, ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.backend=deepspeed"]),
], ids=["fsdp2-cp2", "fsdp2-cp4", "zero3-cp2"])
def test_planned_state_bytes_match_the_shards(world, overrides, tmp_path):
    from longtrain.model.args import model_flavor
    from longtrain.plan import plan_memory

    if "parallel.backend=deepspeed" in overrides:
        pytest.importorskip("deepspeed", reason="pip install deepspeed (the `deepspeed` extra)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path / "measured.json"
    run_ranks(_measure, world, overrides, str(out))
    measured = json.loads(out.read_text())
    args = model_flavor("debug", **SHAPE)
    backend = "deepspeed" if "parallel.backend=deepspeed" in overrides else "fsdp2"
    # CPU: float32 compute. Plan at 4K tokens with full AC so that the peak is layer 0's backward, where the
    # gradients exist (the shard sizes do not depend on the moment).
    plan = plan_memory(args, 4096, cp=world, cp_mode="ring", dtype="float32", backend=backend, zero_stage=3,
                       ac_mode="full", offload=True)
    # `grads` of a plan counts the gradients alive at its peak moment; FSDP2's full set mirrors the sharded
    # parameters (same dtype and sharding), which is what the planner adds at layer 0's backward.
    expected = {"params": plan.params, "grads": plan.params, "optimizer": plan.optimizer}
    for key, value in measured.items():
        assert value == pytest.approx(expected[key], rel=PADDING_RTOL), (key, value, expected[key])
    # The planner before 2026-12-08 divided by dp_shard only: world x too much.
    assert measured["params"] < plan_memory(args, 4096, dtype="float32", backend=backend).params / (world - 0.5)

"""DeepSpeed as a trainer engine (trainer/engine.py): ZeRO-2 and ZeRO-3 training losses equal FSDP2's over 10 steps,
on two gloo ranks at dp=2 and at cp=2 (ring), each DeepSpeed run stopped at step 5 and resumed from its checkpoint."""

import json
import os
import sys
from pathlib import Path

import pytest

from spawn_util import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.golden by name, also in spawned ranks

pytest.importorskip("deepspeed", reason="pip install deepspeed (the `deepspeed` extra)")
pytestmark = pytest.mark.distributed

STEPS = 10
# fp32 on CPU: FSDP2 reduce-scatters, ZeRO all-reduces / reduce-scatters its flat buckets; only the summation
# order differs, which moves the losses ~1e-7 relative over 10 steps.
ENGINE_RTOL = 1e-5


def _train(run_dir: Path, overrides: list[str]) -> dict[int, float]:
    import torch

    from longtrain.config import build_recipe
    from longtrain.trainer.train import train
    from tests.golden.cases import BASE

    torch.set_num_threads(1)
    raw = {**BASE, "stages": [{"name": "s", "seq_len": 160, "steps": STEPS}]}
    return train(build_recipe(raw, [f"run_dir={run_dir}", *overrides])).losses


def _engines(rank: int, world: int, layout: list[str], tmp: str, out: str) -> None:
    tmp = Path(tmp)
    curves = {"fsdp2": _train(tmp / "fsdp2", layout)}
    for stage in (2, 3):
        ds = [*layout, "parallel.backend=deepspeed", f"parallel.zero_stage={stage}"]
        first = _train(tmp / f"zero{stage}", [*ds, "train.stop_after_steps=5"])
        second = _train(tmp / f"zero{stage}", ds)  # resumes from step-5 (train.resume: auto)
        assert sorted(first) == [1, 2, 3, 4, 5] and sorted(second) == list(range(6, STEPS + 1))
        # DeepSpeed really ran: its optimizer partitions sit beside the DCP weights in the checkpoint.
        assert list((tmp / f"zero{stage}" / "checkpoints" / "step-5" / "deepspeed" / "state").glob("*optim_states.pt"))
        curves[f"zero{stage}"] = {**first, **second}
    if rank == 0:
        Path(out).write_text(json.dumps({k: [v[s] for s in sorted(v)] for k, v in curves.items()}))


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.cp=2", "parallel.cp_mode=ring"]],
                         ids=["dp2", "cp2_ring"])
def test_zero2_zero3_match_fsdp2_with_resume(layout, tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probe on CPU machines
    out = tmp_path / "curves.json"
    run_ranks(_engines, 2, layout, str(tmp_path), str(out))
    curves = json.loads(out.read_text())
    for name in ("zero2", "zero3"):
        assert curves[name] == pytest.approx(curves["fsdp2"], rel=ENGINE_RTOL), name
    assert curves["fsdp2"][-1] < curves["fsdp2"][0] - 0.5  # it trained

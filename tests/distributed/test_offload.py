"""Parameter / optimizer offload from the recipe (memory.offload_params, memory.offload_optimizer) does not change
the loss: FSDP2 CPUOffloadPolicy in one process (launched as a user would, no torchrun) and on two gloo ranks,
and DeepSpeed ZeRO-3 with ZeRO-Offload of parameters and optimizer states, against the same run without."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spawn_util import run_ranks

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.golden by name, also in spawned ranks

from tests.golden.cases import BASE  # noqa: E402

pytestmark = pytest.mark.distributed
OFFLOAD_RTOL = 1e-6  # fp32: offload moves where tensors live, not the arithmetic


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fsdp2_offload_in_one_process_matches_no_offload(tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name, extra in (("plain", []), ("offload", ["memory.offload_params=true", "memory.master_dtype=float32"])):
        proc = subprocess.run([sys.executable, "-m", "longtrain", "train", str(recipe), f"run_dir={tmp_path / name}",
                               *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    plain, offload = _losses(tmp_path / "plain"), _losses(tmp_path / "offload")
    assert len(plain) == BASE["stages"][0]["steps"] and offload == pytest.approx(plain, rel=OFFLOAD_RTOL)


def _two_ranks(rank: int, world: int, tmp: str, out: str) -> None:
    import torch

    from longtrain.config import build_recipe
    from longtrain.trainer.train import train

    torch.set_num_threads(1)
    runs = {"fsdp2": ["parallel.dp_shard=2"],
            "fsdp2_offload": ["parallel.dp_shard=2", "memory.offload_params=true"],
            # everything on the host that can be: states, and one checkpoint per 2 layers (the debug model has 2)
            "fsdp2_offload_all": ["parallel.dp_shard=2", "memory.offload_params=true", "memory.activation_checkpoint=full",
                                  "memory.offload_activations=true", "memory.checkpoint_stride=2"],
            "zero3": ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.backend=deepspeed"],
            "zero3_offload": ["parallel.cp=2", "parallel.cp_mode=ring", "parallel.backend=deepspeed",
                              "memory.offload_params=true", "memory.offload_optimizer=true"]}
    curves = {}
    for name, over in runs.items():
        res = train(build_recipe(BASE, [f"run_dir={tmp}/{name}", *over]))
        curves[name] = [res.losses[s] for s in sorted(res.losses)]
    if rank == 0:
        Path(out).write_text(json.dumps(curves))


def test_offload_on_two_ranks_matches_no_offload(tmp_path):
    pytest.importorskip("deepspeed", reason="pip install deepspeed (the `deepspeed` extra)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path / "curves.json"
    run_ranks(_two_ranks, 2, str(tmp_path), str(out))
    c = json.loads(out.read_text())
    assert c["fsdp2_offload"] == pytest.approx(c["fsdp2"], rel=OFFLOAD_RTOL)
    assert c["fsdp2_offload_all"] == pytest.approx(c["fsdp2"], rel=OFFLOAD_RTOL)
    assert c["zero3_offload"] == pytest.approx(c["zero3"], rel=OFFLOAD_RTOL)

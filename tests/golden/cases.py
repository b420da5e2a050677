"""Golden loss curves (torchtitan keeps them as tests/assets/losses): a few fixed CPU recipes whose per-step fp32
losses are stored as data and compared exactly, so that any change to the model, kernels, loss, data path,
optimizer or parallel code that moves a number is seen at once (and its commit says why).

Record (after a change that is meant to move the numbers):  python -m tests.golden.cases --record
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parents[1] / "assets" / "golden_losses.json"
STEPS = 6

BASE = {
    "name": "golden",
    "model": {"flavor": "debug", "overrides": {"n_layers": 2}, "init_seed": 0},
    "data": {"sources": [{"path": "synthetic:passkey", "weight": 0.5, "options": {"digits": 3}},
                         {"path": "synthetic:passkey", "weight": 0.5,
                          "options": {"digits": 2, "filler": "echo", "loss_on": "answer"}}], "seed": 7},
    "train": {"micro_batch": 2, "optimizer": {"lr": 3.0e-3}, "schedule": {"warmup_steps": 2}, "grad_clip": 1.0},
    "checkpoint": {"every_steps": 0},
    "logging": {"progress_bar": False, "plot": False, "every_steps": 1},
    "stages": [{"name": "s", "seq_len": 160, "steps": STEPS}],
}

# case -> (world size, recipe overrides). cp=2 ring runs on two gloo ranks (FSDP2 over the cp mesh).
CASES: dict[str, tuple[int, list[str]]] = {
    "cp1": (1, []),
    "cp2_ring": (2, ["parallel.cp=2", "parallel.cp_mode=ring"]),
    "lora": (1, ["model.lora={rank: 4, alpha: 8.0}"]),
    "chunkwise": (1, ["memory.chunkwise={chunk: 32, mode: exact}"]),
}


def fingerprint() -> dict:
    """What exact float equality depends on: the torch build, the CPU kernels it picks, the thread count."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "threads": 1}


def run_case(name: str, run_dir: Path) -> list[float]:
    """This process's part of case `name` (rank 0 returns the losses; one thread for a fixed summation order)."""
    from longtrain.config import build_recipe
    from longtrain.trainer.train import train

    torch.set_num_threads(1)
    _, overrides = CASES[name]
    result = train(build_recipe(BASE, [f"run_dir={run_dir}", *overrides]))
    return [result.losses[s] for s in range(1, STEPS + 1)]


def _rank_entry(rank: int, world: int, name: str, run_dir: str, out: str) -> None:
    losses = run_case(name, Path(run_dir))
    if rank == 0:
        Path(out).write_text(json.dumps(losses))


def run_case_anywhere(name: str, run_dir: Path) -> list[float]:
    """Run case `name` in this process (world 1) or on fresh gloo ranks (world > 1)."""
    world, _ = CASES[name]
    if world == 1:
        return run_case(name, run_dir)
    from tests.distributed.spawn_util import run_ranks

    out = run_dir.parent / f"{run_dir.name}-losses.json"
    run_ranks(_rank_entry, world, name, str(run_dir), str(out))
    return json.loads(out.read_text())


def load_golden() -> dict:
    return json.loads(ASSET.read_text())


def record(names: list[str]) -> None:
    import tempfile

    data = load_golden() if ASSET.exists() else {"fingerprint": fingerprint(), "losses": {}}
    if data["fingerprint"] != fingerprint():
        print(f"note: recorded on {data['fingerprint']}, now {fingerprint()}: re-recording every case")
        data = {"fingerprint": fingerprint(), "losses": {}}
        names = list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            data["losses"][name] = run_case_anywhere(name, Path(tmp) / name)
            print(name, data["losses"][name])
    ASSET.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python -m tests.golden.cases --record [case ...]")
    record(sys.argv[2:] or list(CASES))

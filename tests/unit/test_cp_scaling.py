"""benchmarks/cp_scaling.py: the weak-scaling and best-mode arithmetic, and its CPU smoke run under torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_cp_scaling", ROOT / "benchmarks" / "cp_scaling.py")
cps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cps)


def rec(mode: str, cp: int, tpg: int, mfu: float | None, tps: float = 1.0, status: str = "ok") -> dict:
    return {"status": status, "mode": mode, "cp": cp, "tokens_per_gpu": tpg, "mfu": mfu, "tokens_per_s_per_gpu": tps}


def test_weak_scaling_divides_by_cp1_at_the_same_tokens_per_gpu():
    results = [rec("-", 1, 64, 0.40), rec("-", 1, 128, 0.30), rec("allgather", 2, 64, 0.30),
               rec("ulysses", 2, 128, 0.27), rec("ring", 2, 256, 0.2), {"status": "OOM", "mode": "ring", "cp": 2,
                                                                        "tokens_per_gpu": 64}]
    eff = cps.weak_scaling(results)
    assert eff == {("allgather", 2, 64): pytest.approx(0.75), ("ulysses", 2, 128): pytest.approx(0.9)}


def test_best_mode_takes_the_highest_mfu_at_cp_above_1():
    results = [rec("-", 1, 64, 0.9), rec("allgather", 2, 64, 0.3), rec("ulysses", 2, 64, 0.35),
               rec("ring", 2, 64, None, status="OOM")]
    assert cps.best_mode(results) == "ulysses"
    # No known peak (CPU): tokens/s ranks instead.
    assert cps.best_mode([rec("ring", 2, 64, None, 5.0), rec("allgather", 2, 64, None, 7.0)]) == "allgather"
    with pytest.raises(ValueError, match="no successful cp > 1"):
        cps.best_mode([rec("-", 1, 64, 0.4), rec("ring", 2, 64, None, status="OOM")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_smoke_under_torchrun(tmp_path):
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()),
           str(ROOT / "benchmarks" / "cp_scaling.py"), "--smoke", "--modes", "allgather,ulysses",
           "--master-dtype", "bf16", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    # cp=1 once, then each mode at cp=2, at both smoke lengths; every one ran.
    assert [(r["mode"], r["cp"]) for r in results] == [("-", 1)] * 2 + [("allgather", 2)] * 2 + [("ulysses", 2)] * 2
    assert all(r["status"] == "ok" for r in results)
    assert "weak eff" in proc.stdout

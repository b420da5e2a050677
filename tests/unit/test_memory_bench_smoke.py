"""benchmarks/max_context.py: the search logic, and one real end-to-end smoke run on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from max_context import Trial, find_max_context  # noqa: E402


def _search(limit: int | None, start: int = 1024, max_seq: int = 1 << 22) -> tuple[int | None, list[int]]:
    def trial(seq: int) -> Trial:
        ok = limit is None or seq <= limit
        return Trial("x", "f", seq, ok=ok, error=None if ok else "OOM: test limit")

    best, tried = find_max_context(trial, start, max_seq, align=1024)
    return (best.seq if best else None), [t.seq for t in tried]


@pytest.mark.parametrize("limit,expected_best,expected_tried", [
    (5000, 4096, [1024, 2048, 4096, 8192, 6144]),  # doubling to the first failure, then 1.5x of the last success
    (7000, 6144, [1024, 2048, 4096, 8192, 6144]),
    (4096, 4096, [1024, 2048, 4096, 8192, 6144]),
    (1000, None, [1024]),  # even the first length fails
    (None, 1 << 22, [1024 << i for i in range(13)]),  # never fails: stops at max_seq
])
def test_search(limit, expected_best, expected_tried) -> None:
    assert _search(limit) == (expected_best, expected_tried)


def test_smoke_run_prints_the_table() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "max_context.py"), "--smoke", "--sides", "longtrain,longtrain_plain",
           "--max-seq", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("debug ")]
    assert any(line.split()[1] == "longtrain" and line.split()[2] == "32" for line in rows), out
    assert any(line.split()[1] == "longtrain_plain" and line.split()[2] == "32" for line in rows), out
    assert "full AC + offload + sequence-tiled blocks" in out  # the smoke run uses every switch
    assert "(plain maximum)" in out  # the step-time ratio at the plain path's maximum

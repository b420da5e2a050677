"""benchmarks/cp_balance.py on CPU with tiny rows: the work table and the per-rank timing path both run."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_cp_balance", ROOT / "benchmarks" / "cp_balance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mixtures_fill_the_row():
    bench = _load()
    for mixture in bench.MIXTURES:
        row = bench.draw_row(mixture, 65536, random.Random(0))
        assert len(row) == 65536
        assert (len(set(row)) == 1) == (mixture == "single")


def test_table_and_timing_smoke(capsys):
    bench = _load()
    assert bench.main(["--tokens", "8192", "--cp", "2", "4", "--seeds", "0"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(table) == 3 * 2
    single = [line for line in table if line.startswith("| single")]
    assert all("| 0.0% | 0.0% | 0.0% | 0.0% |" in line for line in single)  # one document: both are zigzag
    assert bench.main(["--time", "--mixture", "web", "--tokens", "1024", "--cp", "2", "--backend", "reference",
                       "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--dtype", "fp32", "--warmup", "0",
                       "--iters", "1"]) == 0
    assert "critical path" in capsys.readouterr().out

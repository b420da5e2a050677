"""The CPU demo recipe end to end in a reduced form (fewer steps, one sample per cell): train 1x, extend 4x,
evaluate passkey at 1x / 2x / 4x before and after, print and write the table, export a loadable HF directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REDUCED = ["stages.0.steps=3", "stages.1.steps=2", "train.micro_batch=2", "stages.1.train.micro_batch=1",
           "model.overrides.n_layers=2", "eval.samples=1", "eval.depths=[0.5]", "checkpoint.every_steps=0",
           "logging.progress_bar=false"]


def test_demo_recipe_reduced_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "longtrain", "train", "recipes/tiny-demo.yaml", f"run_dir={run_dir}", *REDUCED]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    table_head = "| passkey accuracy | 128 | 256 | 512 |"
    assert table_head in out
    summary = (run_dir / "eval" / "summary.md").read_text()
    assert table_head in summary
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["short-128", "short-128 + long-512 rope, untrained", "long-512"]
    for f in ("loss.png", "metrics.jsonl", "recipe.yaml", "eval/report.md"):
        assert (run_dir / f).is_file(), f
    assert (run_dir / "checkpoints" / "latest" / "COMPLETE").is_file()

    transformers = pytest.importorskip("transformers")
    export = subprocess.run([sys.executable, "-m", "longtrain", "export", str(run_dir / "checkpoints" / "latest"),
                             str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4.0

"""Checkpoints under real process kills: SIGKILL mid-save keeps the last good one; SIGTERM saves and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from longtrain.config import build_recipe
from longtrain.checkpoint.store import COMPLETE, complete_checkpoints, resolve_checkpoint
from longtrain.trainer.train import train

REPO = Path(__file__).resolve().parents[2]
SEQ = 144


def write_recipe(tmp_path: Path, steps: int) -> Path:
    raw = {
        "name": "ckpt",
        "run_dir": str(tmp_path / "run"),
        "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
        "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
        "train": {"optimizer": {"lr": 3.0e-3}},
        "logging": {"progress_bar": False, "plot": False},
        "stages": [{"name": "s", "seq_len": SEQ, "steps": steps}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(recipe: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "longtrain", "train", str(recipe), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run re-logs the steps after its checkpoint: keep the last
    return out


def test_sigkill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    recipe = write_recipe(tmp_path, steps=4)
    root = tmp_path / "run" / "checkpoints"
    # Reference: 4 uninterrupted steps, in process.
    ref = train(build_recipe(yaml.safe_load(recipe.read_text()), [f"run_dir={tmp_path / 'ref'}"]))
    # Run 1 saves step-2 and, at step 4, pauses between writing the files and marking them complete: kill it there.
    proc = launch(recipe, "checkpoint.every_steps=2", "checkpoint.debug_pause_s=60")
    partial = root / ".tmp-step-4"
    wait_for(lambda: (partial / "dcp" / ".metadata").is_file() and (partial / "meta.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (partial / COMPLETE).exists() and not (root / "step-4").exists()
    assert [p.name for p in complete_checkpoints(root)] == ["step-2"]
    assert resolve_checkpoint(root / "latest").name == "step-2"
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        resolve_checkpoint(partial)
    # Resume (in process) picks step-2 and reproduces the uninterrupted losses bitwise (CPU fp32).
    res = train(build_recipe(yaml.safe_load(recipe.read_text()), ["checkpoint.every_steps=2"]))
    assert sorted(res.losses) == [3, 4]
    assert res.losses == {s: ref.losses[s] for s in (3, 4)}
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-4"]
    assert losses(tmp_path / "run")[4] == ref.losses[4]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = write_recipe(tmp_path, steps=100000)
    proc = launch(recipe)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted at step" in out
    ckpt = resolve_checkpoint(tmp_path / "run" / "checkpoints" / "latest")
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert ckpt.name == f"step-{step}" and step >= 1
    assert max(losses(tmp_path / "run")) == step  # the checkpoint holds the last logged step

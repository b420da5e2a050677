"""What a user sees under torchrun (issue 20): one paragraph for a user error, no deprecation warnings per step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longtrain.config import build_recipe
from longtrain.trainer.train import train

REPO = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, steps: int) -> Path:
    raw = {
        "name": "clean",
        "run_dir": str(tmp_path / "run"),
        "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
        "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
        "logging": {"progress_bar": False, "plot": False},
        "stages": [{"name": "s", "seq_len": 144, "steps": steps}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    from tests.distributed.test_train_torchrun import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "longtrain", "train", str(recipe), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_a_refused_resume_is_one_paragraph_on_rank_0(tmp_path):
    recipe = write_recipe(tmp_path, steps=2)
    train(build_recipe(yaml.safe_load(recipe.read_text()), ["stages.0.steps=1"]))
    # global_batch_tokens=0 (one micro-batch per dp rank): on 2 ranks a step would hold twice the sequences.
    proc = torchrun(recipe)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    sentence = "held 1 sequence(s) on the checkpoint's layout and would hold 2 on this one"
    assert out.count(sentence) == 1, out
    assert "error: the recipe no longer matches the checkpoint it resumes, " + str(tmp_path / "run") in out
    # No traceback from a worker (torchrun's own ChildFailedError summary is the launcher's), no gloo noise.
    assert "longtrain/" not in out and "Gloo" not in out and "Connection" not in out, out


@pytest.mark.distributed
def test_context_parallel_steps_print_no_deprecation_warning(tmp_path):
    proc = torchrun(write_recipe(tmp_path, steps=2), "parallel.cp=2", "parallel.cp_mode=allgather")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]

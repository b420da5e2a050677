"""`longtrain train` with parallel.backend deepspeed in one process, as a user launches it (no torchrun): it runs
DeepSpeed (not a silent fallback), its stage eval runs on the gathered weights, and `longtrain export` of its
checkpoint gives a directory transformers loads with the trained weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.golden.cases import BASE  # noqa: E402


def test_deepspeed_in_one_process_trains_evaluates_and_exports(tmp_path):
    pytest.importorskip("deepspeed", reason="pip install deepspeed (the `deepspeed` extra)")
    transformers = pytest.importorskip("transformers")
    raw = {**BASE, "eval": {"lengths": [160], "tasks": ["passkey"], "depths": [0.5], "samples": 2,
                            "task_options": {"passkey": {"digits": 3}}}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "longtrain", "train", str(recipe), f"run_dir={run_dir}",
                           "parallel.backend=deepspeed", "parallel.zero_stage=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "latest"
    assert list((ckpt / "deepspeed" / "state").glob("*optim_states.pt")), "DeepSpeed did not run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    golden = json.loads((REPO / "tests" / "assets" / "golden_losses.json").read_text())["losses"]["cp1"]
    # ZeRO-3 in fp32 on one rank: the same math as the unwrapped run, in DeepSpeed's flat buffers.
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(golden, rel=1e-5)
    assert (run_dir / "eval" / "summary.md").is_file()  # the stage eval ran on the gathered weights

    out = tmp_path / "hf"
    exp = subprocess.run([sys.executable, "-m", "longtrain", "export", str(ckpt), str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stderr[-3000:]
    from longtrain.checkpoint.model import load_checkpoint_model

    ours = load_checkpoint_model(ckpt)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    w_hf = hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert w_hf.shape == ours.layers[0].mlp.up_proj.weight.shape
    assert (w_hf.float() - ours.layers[0].mlp.up_proj.weight.float()).abs().max() == 0

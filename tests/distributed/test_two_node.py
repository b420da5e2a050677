"""Two "nodes" on localhost: two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1), one
process each, train a debug model for a few steps with ring context parallelism across the nodes. The
losses must match a single-process run (cp=1) of the same recipe on the same data.

Tolerance: fp32; the runs differ only by reduction order (~1e-7 relative per step), and two AdamW updates
can amplify that, so 1e-4 relative: far above that noise, far below what a wrong gradient does to the
loss after an update.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
LOSS_TOL = 1e-4  # relative, fp32 after two optimizer steps

RECIPE = """\
name: two-node
run_dir: {run_dir}
model: {{flavor: debug, tokenizer: builtin, dtype: float32, attention: reference}}
data:
  sources:
    - {{path: "synthetic:passkey", options: {{digits: 3, filler: repeat}}}}
parallel: {{cp: {cp}, cp_mode: ring}}
train:
  micro_batch: 2
  optimizer: {{name: adamw, lr: 1.0e-3}}
  resume: never
stages:
  - {{name: s1, seq_len: 152, steps: 3}}
logging: {{every_steps: 1}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_node_localhost(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    two = tmp_path / "two.yaml"
    two.write_text(RECIPE.format(run_dir=tmp_path / "run2", cp=2))
    one = tmp_path / "one.yaml"
    one.write_text(RECIPE.format(run_dir=tmp_path / "run1", cp=1))

    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-node-test", "-m", "longtrain", "train", str(two)]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    single = subprocess.run([sys.executable, "-m", "longtrain", "train", str(one)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for node_rank, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {node_rank} failed:\n{out[-4000:]}"
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]

    got, ref = _losses(tmp_path / "run2"), _losses(tmp_path / "run1")
    assert len(got) == len(ref) == 3 and all(math.isfinite(x) for x in got)
    assert got[-1] < got[0], got  # it trains
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) / abs(b) < LOSS_TOL, f"step {step}: 2 nodes x cp=2 loss {a} vs single process {b}"

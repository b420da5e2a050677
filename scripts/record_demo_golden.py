"""Record the CPU demo's early loss trajectory as golden values for tests/integration/test_demo_golden.py.

    PYTHONPATH=. python scripts/record_demo_golden.py                 # writes tests/assets/demo_golden.json
    PYTHONPATH=. python scripts/record_demo_golden.py --threads 1 --out /tmp/t1.json   # a thread-count check

The run is recipes/tiny-demo.yaml itself (model, data, lr schedule of the full demo), stopped after `--steps`
global steps with `train.stop_after_steps`, so the losses are exactly the first steps of `longtrain train
recipes/tiny-demo.yaml`. Re-record (and re-measure the README table) in the commit that changes the demo's
trajectory on purpose: the recipe, the data path, the loss or a kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny-demo.yaml"
STEPS = 150


def demo_overrides(run_dir: str | Path, steps: int) -> list[str]:
    """The demo recipe, stopped after `steps` steps, without periodic checkpoints or the plot."""
    return [f"run_dir={run_dir}", "train.resume=never", f"train.stop_after_steps={steps}",
            "checkpoint.every_steps=0", "logging.progress_bar=false", "logging.plot=false"]


def demo_losses(steps: int, threads: int) -> list[float]:
    """The loss of each of the demo's first `steps` global steps, with torch using `threads` threads."""
    from longtrain.config import load_recipe
    from longtrain.trainer.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = train(load_recipe(REPO / RECIPE, demo_overrides(Path(tmp) / "run", steps)))
    finally:
        torch.set_num_threads(before)
    return [res.losses[s] for s in range(1, steps + 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the golden values use 2, as CI)")
    p.add_argument("--out", default=str(REPO / "tests" / "assets" / "demo_golden.json"))
    args = p.parse_args()
    losses = demo_losses(args.steps, args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    out = {"recipe": RECIPE, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
           "machine": platform.machine(), "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "losses": losses}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {args.steps} losses, first {losses[0]:.6f}, last {losses[-1]:.6f}")


if __name__ == "__main__":
    main()

"""Run logging on rank 0: a tqdm bar, metrics.jsonl (one object per logged step), optional wandb, loss.png."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from longtrain.config import LoggingConfig


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _of_ceiling(record: dict[str, Any]) -> str:
    """' (88% of ceiling)' when the stage's MFU ceiling was measured, else ''."""
    ceiling = record.get("mfu_ceiling")
    return f" ({100 * record['mfu'] / ceiling:.0f}% of ceiling)" if ceiling else ""


class MetricsLogger:
    """Writes what `log` receives; every method is a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_name: str, recipe: dict, total_steps: int,
                 initial_step: int, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.wandb_run = None
        if not is_main:
            return
        _truncate_after(self.path, initial_step)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        if cfg.wandb is not None and cfg.wandb.mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise ImportError("the recipe's logging.wandb block needs the wandb package: "
                                  "pip install 'longtrain[wandb]' (or remove logging.wandb)") from None
            # offline mode writes under run_dir/wandb and needs no network; `wandb sync` uploads it later.
            self.wandb_run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name,
                                        mode=cfg.wandb.mode, dir=str(run_dir), config=recipe, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.n = record["step"]
            post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                    "mem": f"{record['memory_gib']:.1f}G"}
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%" + _of_ceiling(record)
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
        else:  # no bar (batch jobs, logs without a terminal): one line per logged step
            mfu = f" mfu {100 * record['mfu']:.1f}%{_of_ceiling(record)}" if record.get("mfu") is not None else ""
            print(f"step {record['step']} [{record['stage_name']}] loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"grad_norm {record['grad_norm']:.3f} tok/s {record['tokens_per_s']:.0f}{mfu} "
                  f"mem {record['memory_gib']:.1f} GiB", flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.cfg.plot and self.path.is_file():
            plot_loss(self.path, self.path.parent / "loss.png")


def _truncate_after(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (the checkpoint this run resumes from): a run that died after its
    last checkpoint logged steps that the resumed run logs again (issue 20: duplicate steps in metrics.jsonl)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            keep = json.loads(line).get("step", 0) <= step
        except (json.JSONDecodeError, AttributeError):  # a line cut by a kill mid-write
            keep = False
        if keep:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> None:
    """Loss against step, one colour per stage, from a metrics.jsonl (the whole run, resumed parts included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, dict] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec  # a resumed run re-logs steps after its checkpoint: keep the latest
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = sorted({r["stage_name"] for r in by_step.values()}, key=lambda s: min(
        r["step"] for r in by_step.values() if r["stage_name"] == s))
    for name in stages:
        pts = sorted((r["step"], r["loss"]) for r in by_step.values() if r["stage_name"] == name and r["loss"] == r["loss"])
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

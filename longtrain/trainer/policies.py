"""The loop's small policies, each one object: when to checkpoint (and what a checkpoint holds), how many bad steps
a run survives, and SIGTERM preemption agreed by every rank."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.config import Recipe, StageConfig
from longtrain.trainer import build
from longtrain.checkpoint.store import CheckpointMeta, save_checkpoint
from longtrain.trainer.distributed import DistInfo, all_reduce


class TrainingError(RuntimeError):
    """The run cannot go on (too many NaN/inf steps)."""


class Preemption:
    """SIGTERM (a scheduler preempting the job) sets a flag; the loop checkpoints at the end of the step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.requested = False
        self.previous = None

    def install(self) -> None:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
            self.previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def agreed(self) -> bool:
        # Every rank must take the same branch (the save is collective): any rank's signal stops all.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        return bool(all_reduce(flag, dist.ReduceOp.MAX).item() > 0)


class BadSteps:
    """Counts steps whose update was skipped (NaN/inf loss or gradient norm, or no valid token) and stops the run
    past train.max_bad_steps."""

    def __init__(self, count: int, ckpt_root: Path, logger):
        self.count, self.ckpt_root, self.logger = count, ckpt_root, logger

    def record(self, step: int, stage: StageConfig, loss: float, grad_norm: float) -> None:
        """Log a skipped step; raise TrainingError when the budget is spent."""
        self.count += 1
        budget = stage.train.max_bad_steps
        self.logger.write(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite (or no valid token): "
                          f"update skipped ({self.count} of at most {budget} allowed)")
        if self.count > budget:
            raise TrainingError(
                f"stopping at step {step} (stage {stage.name!r}): {self.count} steps had a NaN/inf loss or gradient "
                f"norm, more than train.max_bad_steps={budget}. Lower the learning rate, check the data, or resume "
                f"from the last checkpoint in {self.ckpt_root}.")


class Checkpoints:
    """When to save (every N steps, at the end of the run, on stop_after_steps or preemption) and what: the
    engine's state through DCP, and per rank the loader position, schedule, bad-step count and RNGs."""

    def __init__(self, recipe: Recipe, info: DistInfo, ckpt_root: Path, recipe_yaml: str, data_dp: int):
        self.recipe, self.info, self.root, self.recipe_yaml = recipe, info, ckpt_root, recipe_yaml
        self.data_dp = data_dp  # the run's data layout (data_layout.py): kept on another layout

    def due(self, step: int, last_of_run: bool, stop: bool) -> bool:
        cfg = self.recipe.checkpoint
        periodic = cfg.every_steps and step % cfg.every_steps == 0
        return bool(periodic or (last_of_run and cfg.at_end) or stop)

    def save(self, engine, source, scheduler, step: int, next_stage: int, next_step: int, bad_steps: int) -> None:
        # After the last step of a stage the checkpoint points at the next stage, step 0: its loader and
        # scheduler are built fresh on resume, so the saved ones are only used mid-stage.
        recipe, lora = self.recipe, self.recipe.model.lora
        meta = CheckpointMeta(step=step, stage=next_stage, stage_step=next_step,
                              model_args=build.args_dict(engine.model.args),
                              lora=dataclasses.asdict(lora) if lora is not None else None,
                              tokenizer=recipe.model.tokenizer, world_size=self.info.world_size)
        done_stage = next_step == 0
        rank_state = {"data": None if done_stage else source.state_dict(),
                      "scheduler": None if done_stage else scheduler.state_dict(), "bad_steps": bad_steps,
                      # the finished stage's loader position: more steps for it (a raised stages.N.steps) go on there
                      "stage_end": {"data": source.state_dict()} if done_stage else None,
                      "data_dp_size": self.data_dp}
        save_checkpoint(self.root, meta, engine, rank_state, self.info.rank, self.recipe_yaml,
                        recipe.checkpoint.keep_last, recipe.checkpoint.debug_pause_s)

"""Everything a run needs before its first step, in order: the resume decision (before anything is built), the
tokenizer and its vocabulary check, seeds, the parallel layout, the step engine, the restored checkpoint, the
logger. `start_run` returns it as one `RunContext`; the loop in train.py only reads it and advances `step`."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from longtrain.config import Recipe
from longtrain.trainer import build
from longtrain.checkpoint.store import CheckpointDamaged, load_checkpoint, newest_intact, read_meta
from longtrain.checkpoint.store import verified_checkpoint
from longtrain.trainer.data_layout import remap_rank_state
from longtrain.trainer.distributed import DistInfo, broadcast_object
from longtrain.trainer.metrics import MetricsLogger
from longtrain.trainer.resume import ResumePlan, plan_resume, read_saved_recipe


@dataclass
class RunContext:
    recipe: Recipe
    info: DistInfo
    layout: build.Layout
    engine: object  # trainer/engine.py StepEngine
    tokenizer: object
    logger: MetricsLogger
    ckpt_root: Path
    recipe_yaml: str  # the resolved recipe, written into every checkpoint
    base_rope: dict  # the model's own rope and max positions: each stage's rope is derived from them
    base_max_pos: int
    data_dp: int  # the run's data layout, kept for good (data_layout.py)
    step: int = 0  # global steps done
    start_stage: int = 0
    start_stage_step: int = 0
    rank_state: dict | None = None  # this rank's saved state when resuming
    bad_steps: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(recipe: Recipe, info: DistInfo) -> RunContext:
    """Build the run of `recipe` on this rank and restore its checkpoint when `train.resume` says so (collective).

    Raises:
        ImportError: logging.wandb without the wandb package (before anything is built).
        ResumeError, CheckpointDamaged, ValueError: the checkpoint cannot be resumed with this recipe.
    """
    wb = recipe.logging.wandb
    if wb is not None and wb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        # Before anything is built: a missing logger should not cost a model load.
        raise ImportError("the recipe's logging.wandb block needs the wandb package: "
                          "pip install 'longtrain[wandb]' (or remove logging.wandb)")
    run_dir = Path(recipe.run_dir)
    ckpt_root = run_dir / "checkpoints"
    # Before anything is built: which checkpoint (the newest intact one), and whether this recipe may resume it.
    resume_from, plan, notes = _resume_plan(recipe, ckpt_root, info)
    from longtrain.data.tokenizer import load_tokenizer
    from longtrain.trainer.checks import check_vocab, cpu_thread_warning

    tokenizer = load_tokenizer(recipe.model.tokenizer)
    check_vocab(tokenizer, recipe.model.model_args(), recipe.source)  # before any text is tokenized
    if info.device.type == "cpu" and (note := cpu_thread_warning()) is not None:
        notes.append(note)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(recipe.train.seed + info.rank)
    if info.device.type == "cpu":
        # Subnormal floats (tiny gradients and Adam moments of a converging small model) take a slow path in
        # x86 arithmetic; flushing them to zero changes no result that matters and removes that risk.
        torch.set_flush_denormal(True)
    layout = build.build_layout(recipe, info)
    engine = build.build_engine(recipe, info, layout)
    model = engine.model
    run = RunContext(recipe, info, layout, engine, tokenizer, None, ckpt_root,
                     yaml.safe_dump(recipe.to_dict(), sort_keys=False), dict(model.args.rope),
                     model.args.max_position_embeddings, plan.data_dp if plan is not None else layout.dp_size)
    if resume_from is not None:
        # Restore the rope of the stage in progress first: the rotary buffers are not part of the state dict.
        set_stage_rope(run, min(plan.stage, len(recipe.stages) - 1))
        run.step, run.rank_state = _restore(resume_from, plan, engine, layout, info)
        run.start_stage, run.start_stage_step = plan.stage, plan.stage_step
        run.bad_steps = run.rank_state["bad_steps"]
    if info.is_main:  # only a run that starts records its recipe (a refused resume leaves the old one)
        recipe.save(run_dir / "recipe.yaml")
    total_steps = sum(s.steps for s in recipe.stages)
    run.logger = MetricsLogger(run_dir, recipe.logging, recipe.name, recipe.to_dict(), total_steps, run.step,
                               info.is_main)
    _log_start(run.logger, recipe, notes, resume_from, plan, run.step)
    return run


def set_stage_rope(run: RunContext, si: int) -> None:
    """The rope (and config max positions) in force during stage `si`, set on the model when it differs."""
    model, recipe = run.engine.model, run.recipe
    rope = build.stage_rope(recipe, si, run.base_rope)
    max_pos = run.base_max_pos
    for st in recipe.stages[: si + 1]:
        max_pos = build.stage_max_positions(st, max_pos, run.base_max_pos)
    if rope != model.args.rope or max_pos != model.args.max_position_embeddings:
        model.set_rope(rope, max_pos)


def _restore(ckpt: Path, plan: ResumePlan, engine, layout, info: DistInfo) -> tuple[int, dict]:
    """Load the checkpoint (collective); returns the global step and this rank's state, loader states remapped
    when the layout changed (data_layout.py)."""
    meta, rank_state = load_checkpoint(ckpt, engine, info.rank, any_rank=plan.relayout)
    if plan.relayout:
        remap_rank_state(rank_state, ckpt, meta.world_size, layout.dp_rank, layout.dp_size)
    return meta.step, rank_state


def _log_start(logger, recipe: Recipe, notes: list[str], ckpt: Path | None, plan: ResumePlan | None,
               step: int) -> None:
    for text in notes:
        logger.write(text)
    if ckpt is None:
        return
    where = f"stage {recipe.stages[plan.stage].name!r}" if plan.stage < len(recipe.stages) else "every stage is done"
    logger.write(f"resumed from {ckpt} at step {step} ({where})")
    for line in plan.changes:
        logger.write(f"recipe changed since the checkpoint, applied from step {step + 1}: {line}")


def _resume_plan(recipe: Recipe, ckpt_root: Path, info: DistInfo) -> tuple[Path | None, ResumePlan | None, list[str]]:
    """The checkpoint to resume (train.resume), where to continue, and warnings about damaged checkpoints passed over.

    Rank 0 decides and tells the others (one file-system view, one decision); every rank raises the same
    ResumeError / CheckpointDamaged, so the user sees one message and no collective is left waiting.
    """
    def decide():
        try:
            return _decide_resume(recipe, ckpt_root, info.world_size)
        except Exception as e:  # user errors (ResumeError, CheckpointDamaged, a bad path) and bugs alike
            if info.world_size == 1:
                raise
            return e

    decided = broadcast_object(decide() if info.is_main else None)
    if isinstance(decided, Exception):
        raise decided
    return decided


def _decide_resume(recipe: Recipe, ckpt_root: Path, world_size: int):
    notes: list[str] = []
    match recipe.train.resume:
        case "never":
            return None, None, notes
        case "auto":
            ckpt, damaged = newest_intact(ckpt_root)
            if ckpt is None and damaged:  # starting over would overwrite them: the user decides
                raise CheckpointDamaged(
                    f"every checkpoint in {ckpt_root} is damaged: " + "; ".join(p for _, p in damaged) + ". To "
                    "start over from step 0, set train.resume=never (new checkpoints will replace these) or use "
                    "another run_dir.")
            for bad, problem in damaged:
                notes.append(f"warning: checkpoint {bad} is damaged and is skipped: {problem}")
            if damaged:
                notes.append(f"warning: resuming from {ckpt}, the newest intact checkpoint")
            if ckpt is None:
                return None, None, notes
        case path:
            ckpt = verified_checkpoint(path)
    meta = read_meta(ckpt)
    saved_data_dp = torch.load(ckpt / "rank-00000.pt", weights_only=False).get("data_dp_size")
    return ckpt, plan_resume(read_saved_recipe(ckpt), recipe, meta, ckpt, world_size, saved_data_dp), notes

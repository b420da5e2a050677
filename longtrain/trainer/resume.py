"""A resumed run compares the recipe it is given with the one its checkpoint was saved with, and is never silent.

PITFALLS.md: "A recipe edited between runs must never be applied silently or ignored silently: say what changed."
Three kinds of change (issue 20):
    - optimizer / schedule / memory / eval / logging values: applied from the resume step, one line each
      (old -> new); the learning rate follows the new schedule at the step the stage is at;
    - structural ones (model, tokenizer, seq_len, data, rope or micro-batch of a stage that already ran, a global
      batch that the new layout would change, fewer stages): one paragraph that says what differs and how to go
      on (ResumeError);
    - another layout (world size, dp, cp): one line; DCP reshards, data_layout.py keeps the data's layout;
    - more steps on the stage that just finished: the stage is reopened and the extra steps are trained.
Stages that have not started yet may change freely (each change is still named).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtrain.config import Recipe
from longtrain.checkpoint.store import CheckpointMeta

# Keys that differ from one invocation to the next by design (a time slot, test hooks): never reported.
RUN_CONTROL = ("run_dir", "train.resume", "train.stop_after_steps", "train.debug_nan_steps",
               "checkpoint.debug_pause_s")
# Top-level sections that are only templates: each stage holds its resolved copy, which is what is compared.
STAGE_TEMPLATES = ("data", "memory", "eval")
TRAIN_RUN_WIDE = ("train.seed",)
# Inside a stage that already ran, these define what it trained on: changing them rewrites history.
STAGE_STRUCTURAL = ("seq_len", "data", "rope", "max_position_embeddings", "train.micro_batch")
MODEL_STRUCTURAL = ("model.path", "model.flavor", "model.overrides", "model.tokenizer", "model.lora")
# The layout may change (data_layout.py keeps the data's): reported in one line of its own.
LAYOUT_KEYS = ("parallel.cp", "parallel.dp_shard", "parallel.dp_replicate")


class ResumeError(ValueError):
    """The recipe cannot resume this checkpoint as it stands (a user error: the message says what to do)."""


@dataclass
class ResumePlan:
    stage: int  # stage to continue
    stage_step: int  # steps already done in it
    changes: list[str] = field(default_factory=list)  # one line per applied change, old -> new
    reopened: bool = False  # a finished stage got more steps: continue it from its end
    data_dp: int = 1  # data-parallel loaders of the run's data layout (data_layout.py)
    relayout: bool = False  # world size, dp or cp differ from the checkpoint's: per-rank state is remapped


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested dicts (and lists of dicts, by index); other lists stay whole values."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {f"{prefix}.length": len(value)}
        for i, v in enumerate(value):
            out |= flatten(v, f"{prefix}.{i}")
        return out
    return {prefix: value}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _stage_key(key: str) -> tuple[int, str] | None:
    parts = key.split(".", 2)
    if parts[0] != "stages" or len(parts) < 3 or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2]


def _diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(old), flatten(new)
    missing = "<unset>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in list(a) + [k for k in b if k not in a]
            if a.get(k, missing) != b.get(k, missing)}


def read_saved_recipe(ckpt: Path) -> dict | None:
    path = Path(ckpt) / "recipe.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def plan_resume(old: dict | None, recipe: Recipe, meta: CheckpointMeta, ckpt: Path, world_size: int,
                saved_data_dp: int | None = None) -> ResumePlan:
    """Compare the checkpoint's recipe with `recipe`; decide where to continue and how the layout maps.

    Args:
        saved_data_dp: the data layout the checkpoint's rank files record (None: older checkpoints, derived
            from the saved recipe's layout).
    Raises:
        ResumeError: a structural change, with what differs and how to start fresh or keep the old value.
    """
    where = f"{ckpt} (step {meta.step})"
    plan = ResumePlan(meta.stage, meta.stage_step)
    old_cp = (old or {}).get("parallel", {}).get("cp", recipe.parallel.cp)
    plan.data_dp = saved_data_dp or max(1, meta.world_size // old_cp)
    old_layout = (meta.world_size, meta.world_size // old_cp, old_cp)
    new_layout = (world_size, world_size // recipe.parallel.cp, recipe.parallel.cp)
    plan.relayout = old_layout != new_layout
    if old is None:  # a checkpoint written before recipes were saved with it: nothing to compare
        if plan.relayout:
            raise ResumeError(f"{where} holds no recipe.yaml, so its layout is unknown; resume it with "
                              f"{meta.world_size} process(es) and the same parallel section")
        return plan
    new = recipe.to_dict()
    diff = _diff(old, new)
    structural, lines = [], []
    old_stages = old.get("stages", [])
    started = meta.stage + (1 if meta.stage_step > 0 else 0)  # stages that trained at least one step
    if len(recipe.stages) < started or (meta.stage_step == 0 and len(recipe.stages) < meta.stage):
        structural.append(f"the checkpoint has run {min(started, len(old_stages))} stage(s) "
                          f"({', '.join(s['name'] for s in old_stages[:started])}); the recipe now has "
                          f"{len(recipe.stages)}")
    by_change: dict[tuple[str, str, str], list[str]] = {}
    for key, (a, b) in diff.items():
        if _under(key, RUN_CONTROL) or (_under(key, ("train",)) and not _under(key, TRAIN_RUN_WIDE)) \
                or _under(key, STAGE_TEMPLATES):
            continue
        if _under(key, MODEL_STRUCTURAL):
            structural.append(f"`{key}` was {a!r}, is now {b!r}")
            continue
        if _under(key, LAYOUT_KEYS):
            continue
        sk = _stage_key(key)
        if sk is None:
            lines.append(f"{key}: {a!r} -> {b!r}")
            continue
        si, sub = sk
        if _under(sub, RUN_CONTROL + TRAIN_RUN_WIDE):  # stage copies of run-wide keys (reported at the top)
            continue
        if sub == "train.global_batch_tokens" and si < started:  # what counts is the global batch: below
            continue
        if si < started and _under(sub, STAGE_STRUCTURAL):
            structural.append(f"`stages.{si}.{sub}` (stage {old_stages[si]['name']!r}, already trained) was "
                              f"{a!r}, is now {b!r}")
        elif sub == "steps" and si < started:
            _steps_change(plan, si, a, b, meta, old_stages, structural, lines)
        else:
            name = recipe.stages[si].name if si < len(recipe.stages) else old_stages[si]["name"]
            by_change.setdefault((sub, repr(a), repr(b)), []).append(name)
    for (sub, a, b), names in by_change.items():
        lines.append(f"{sub}: {a} -> {b} (stage{'s' if len(names) > 1 else ''} {', '.join(names)})")
    if plan.relayout:
        _layout_change(plan, old_stages, recipe, old_layout, new_layout, structural, lines)
    if structural:
        raise ResumeError(
            f"the recipe no longer matches the checkpoint it resumes, {where}: " + "; ".join(structural) + ". "
            f"These define the model or what the finished steps trained on, so they cannot change mid-run. "
            f"To keep going, set the old value again (the checkpoint's recipe is {ckpt / 'recipe.yaml'}); to train "
            f"with the new value from scratch, use another run_dir or train.resume=never; to start from these "
            f"weights with a new recipe, export the checkpoint (longtrain export {ckpt} DIR) and set model.path=DIR.")
    plan.changes = lines
    return plan


def _layout_change(plan: ResumePlan, old_stages: list[dict], recipe: Recipe, old_layout: tuple, new_layout: tuple,
                   structural: list[str], lines: list[str]) -> None:
    """World size / dp / cp changed: DCP reshards model and optimizer, data_layout.py keeps the data's layout.
    The step in progress must keep its global batch (else the run would not continue the same way)."""
    (ow, odp, ocp), (nw, ndp, ncp) = old_layout, new_layout
    si = plan.stage
    if si < min(len(old_stages), len(recipe.stages)):
        st_old, st_new = old_stages[si], recipe.stages[si]
        gbt_old = st_old["train"]["global_batch_tokens"]
        seqs_old = gbt_old // st_old["seq_len"] if gbt_old else odp * st_old["train"]["micro_batch"]
        gbt_new = st_new.train.global_batch_tokens
        seqs_new = gbt_new // st_new.seq_len if gbt_new else ndp * st_new.train.micro_batch
        if seqs_old != seqs_new:
            structural.append(
                f"a step of stage {st_new.name!r} held {seqs_old} sequence(s) on the checkpoint's layout and would "
                f"hold {seqs_new} on this one (train.global_batch_tokens={gbt_new}"
                f"{': one micro-batch per data-parallel rank' if not gbt_new else ''}); set "
                f"train.global_batch_tokens={seqs_old * st_old['seq_len']} to keep the global batch")
    lines.append(f"parallel layout: world {ow} (dp {odp}, cp {ocp}) -> world {nw} (dp {ndp}, cp {ncp}): model and "
                 f"optimizer are resharded; the data is read through the run's original layout of {plan.data_dp} "
                 f"loader(s) and split over {ndp} data-parallel rank(s), so no sequence is skipped or repeated")


def _steps_change(plan: ResumePlan, si: int, a: Any, b: Any, meta: CheckpointMeta, old_stages: list[dict],
                  structural: list[str], lines: list[str]) -> None:
    name = old_stages[si]["name"]
    just_finished = meta.stage_step == 0 and si == meta.stage - 1
    if si == meta.stage:  # the stage in progress: its schedule now spans b steps
        if b < meta.stage_step:
            structural.append(f"`stages.{si}.steps` (stage {name!r}) is now {b}, but {meta.stage_step} steps of it "
                              f"are done")
        else:
            lines.append(f"stages.{si}.steps: {a} -> {b} (stage {name!r}: its schedule now spans {b} steps; "
                         f"{meta.stage_step} done)")
    elif just_finished and b > a:
        plan.stage, plan.stage_step, plan.reopened = si, a, True
        lines.append(f"stages.{si}.steps: {a} -> {b} (stage {name!r} had finished: training its {b - a} extra "
                     f"step(s) now, on the schedule over {b} steps)")
    else:
        later = "the run finished it" if just_finished else "a later stage has begun"
        structural.append(f"`stages.{si}.steps` (stage {name!r}) was {a}, is now {b}, but {later}"
                          + ("; only more steps can be added to a finished stage" if just_finished else ""))


def restore_schedule(scheduler, optimizer, last_epoch: int) -> None:
    """Put a freshly built LambdaLR at `last_epoch`: the lr is the *new* recipe's peak x its factor there.

    Loading the saved scheduler state would bring back the old peak lr (LambdaLR saves `base_lrs`): the silent
    resume of issue 20. Same expression as LambdaLR.get_lr, so an unchanged recipe resumes bitwise.
    """
    scheduler.last_epoch = last_epoch
    lrs = [base * fn(last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def continue_stage(source, scheduler, optimizer, rank_state: dict, stage_step: int, n_micro: int, logger) -> int:
    """Put a stage's loader and schedule where the checkpoint left them. Returns the steps done in the stage."""
    if rank_state["data"] is not None:  # saved mid-stage
        source.load_state_dict(rank_state["data"])
        last_epoch = rank_state["scheduler"]["last_epoch"]
    else:  # a finished stage, reopened for more steps
        end = rank_state.get("stage_end")
        if end is not None:
            source.load_state_dict(end["data"])
        else:  # saved before stage-end loader positions were kept: the loader is deterministic, replay it
            logger.write(f"the checkpoint holds no loader position at the stage's end: replaying "
                         f"{stage_step * n_micro} micro-batches to reach it")
            for _ in range(stage_step * n_micro):
                source.next_batch()
        last_epoch = stage_step
    restore_schedule(scheduler, optimizer, last_epoch)
    return stage_step

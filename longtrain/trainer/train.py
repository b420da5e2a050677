"""The training loop: stages in order, gradient accumulation, a globally normalised loss, checkpoints, logging.

One step (torchtitan `train.py` forward_backward_step, PITFALLS.md "Loss and gradients"):
    1. take this rank's micro-batches for the step; count valid labels; all-reduce the count over every rank
       (dp and cp ranks hold disjoint tokens of the global batch, so the sum is the global count);
    2. per micro-batch: hidden states -> linear_cross_entropy (a token sum, never full logits)
       -> backward of sum / global_count (a rank with no valid token contributes exactly 0);
    3. gradients summed over ranks (never averaged: the division already happened once, in step 2);
    4. clip; a NaN/inf loss or gradient norm skips the update (counted; the run stops after max_bad_steps).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from longtrain.config import Recipe, StageConfig
from longtrain.data.batch import Batch
from longtrain.trainer import build
from longtrain.trainer.checkpoint import CheckpointMeta, load_checkpoint, newest_intact, read_meta, save_checkpoint
from longtrain.trainer.checkpoint import CheckpointDamaged, verified_checkpoint
from longtrain.trainer.data import BatchSource
from longtrain.trainer.data_layout import build_stage_source, remap_rank_state
from longtrain.trainer.distributed import DistInfo, all_reduce, broadcast_object, init_distributed
from longtrain.trainer.metrics import MetricsLogger, memory_gib
from longtrain.trainer.optim import build_scheduler
from longtrain.trainer.resume import ResumePlan, continue_stage, plan_resume, read_saved_recipe


class TrainingError(RuntimeError):
    """The run cannot go on (too many NaN/inf steps)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # global steps done
    losses: dict[int, float] = field(default_factory=dict)  # global step -> loss, steps of this run only
    bad_steps: int = 0
    status: str = "done"  # done | preempted | stopped (train.stop_after_steps)
    evals: list[dict] = field(default_factory=list)  # rows of the stage evaluations


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    valid_tokens: int
    skipped: bool


class _Preemption:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batches_per_step(stage: StageConfig, dp_size: int) -> int:
    """Micro-batches each rank accumulates so that one step covers train.global_batch_tokens.

    Raises:
        ValueError: global_batch_tokens is not a multiple of seq_len * micro_batch * dp.
    """
    per_micro = stage.seq_len * stage.train.micro_batch * dp_size
    gbt = stage.train.global_batch_tokens
    if gbt == 0:
        return 1
    if gbt % per_micro:
        raise ValueError(f"stage {stage.name!r}: train.global_batch_tokens={gbt} is not a multiple of seq_len x "
                         f"micro_batch x data-parallel ranks = {stage.seq_len} x {stage.train.micro_batch} x "
                         f"{dp_size} = {per_micro}; pick a multiple (e.g. {max(1, gbt // per_micro) * per_micro})")
    return gbt // per_micro


def train_step(engine, batches: list[Batch], info: DistInfo, layout: build.Layout, stage: StageConfig,
               inject_nan: bool, generator: torch.Generator | None = None) -> StepStats:
    """Forward, backward and (unless the loss or gradients are not finite) one optimizer update.

    `engine` is the trainer/engine.py StepEngine of the recipe's sharding backend.
    """
    local_valid = sum(b.num_valid_tokens for b in batches)
    # Length-dependent ropes (dynamic, longrope) pick frequencies from the longest position: take it from the
    # global batch, so every cp shard uses the same frequencies as one process would.
    rope_lens = [int(b.position_ids.max()) + 1 for b in batches]
    if layout.cp_size > 1:  # cp ranks see the same global batch; each counts only the tokens it will hold
        from longtrain.parallel.cp_shard import local_attn_mask, prepare_cp_inputs

        batches = [prepare_cp_inputs(b, layout.cp_rank, layout.cp_size, layout.cp_layout, layout.ulysses)
                   for b in batches]
        local_valid = sum(b.num_valid_tokens for b in batches)
    # On the device: NCCL reduces GPU tensors only.
    global_valid = int(all_reduce(torch.tensor([local_valid], dtype=torch.int64, device=info.device)).item())
    denom = max(global_valid, 1)  # no valid token anywhere: every sum is 0, so is the loss (skipped below)
    loss_sum = torch.zeros((), dtype=torch.float32, device=info.device)
    model = engine.model
    window = model.args.sliding_window
    chunkwise = stage.memory.chunkwise
    engine.begin_step(len(batches))
    for i, (b, rope_len) in enumerate(zip(batches, rope_lens)):
        b = b.to(info.device)
        if chunkwise is not None:  # the one branch: chunk-by-chunk forward/backward (SeCO / SpaCO)
            from longtrain.trainer.chunkwise import chunkwise_forward_backward

            s = chunkwise_forward_backward(model, b, chunkwise.chunk, chunkwise.mode, chunkwise.keep,
                                           loss_normalizer=float(denom), generator=generator)
        else:
            mask = local_attn_mask(b, window) if layout.cp_size > 1 else None
            s = engine.loss_sum(b, mask, rope_len)
            if inject_nan:  # test hook (train.debug_nan_steps): a real NaN through the real backward
                s = s * float("nan")
            engine.backward(s / denom, i)
        loss_sum += s.detach().float()
    if inject_nan and chunkwise is not None:
        loss_sum = loss_sum * float("nan")
    # Gradients: FSDP2 sums them over dp_shard x cp in its reduce-scatter (divide factor 1), DeepSpeed in
    # ZeRO's reduction (parallel/deepspeed.py ds_backward): nothing to do here.
    loss = (all_reduce(loss_sum) / denom).item()
    max_norm = stage.train.grad_clip if stage.train.grad_clip > 0 else float("inf")
    result = engine.step(max_norm, loss_finite=math.isfinite(loss) and global_valid > 0)
    return StepStats(loss, result.grad_norm, global_valid, not result.stepped)


def train(recipe: Recipe, info: DistInfo | None = None) -> TrainResult:
    """Run every stage of `recipe` (resuming from a checkpoint when `train.resume` says so).

    Args:
        recipe: a validated recipe (config.load_recipe).
        info: process placement; default: read from the launcher's environment (init_distributed).
    Returns:
        What happened: steps done, per-step losses of this run, bad steps, status, stage evaluations.
    Raises:
        TrainingError: more than train.max_bad_steps NaN/inf steps.
        ValueError: a bad resume path or a batch size that does not divide.
    """
    wb = recipe.logging.wandb
    if wb is not None and wb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        # Before anything is built: a missing logger should not cost a model load.
        raise ImportError("the recipe's logging.wandb block needs the wandb package: "
                          "pip install 'longtrain[wandb]' (or remove logging.wandb)")
    info = info or init_distributed()
    run_dir = Path(recipe.run_dir)
    ckpt_root = run_dir / "checkpoints"
    # Before anything is built: which checkpoint (the newest intact one), and whether this recipe may resume it.
    resume_from, plan, warnings_text = _resume_plan(recipe, ckpt_root, info)
    from longtrain.data.tokenizer import load_tokenizer
    from longtrain.trainer.checks import check_vocab, cpu_thread_warning

    tokenizer = load_tokenizer(recipe.model.tokenizer)
    check_vocab(tokenizer, recipe.model.model_args(), recipe.source)  # before any text is tokenized
    if info.device.type == "cpu" and (note := cpu_thread_warning()) is not None:
        warnings_text.append(note)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    seed_everything(recipe.train.seed + info.rank)
    if info.device.type == "cpu":
        # Subnormal floats (tiny gradients and Adam moments of a converging small model) take a slow path in
        # x86 arithmetic; flushing them to zero changes no result that matters and removes that risk.
        torch.set_flush_denormal(True)
    layout = build.build_layout(recipe, info)
    engine = build.build_engine(recipe, info, layout)
    model, optimizer = engine.model, engine.optimizer
    base_rope, base_max_pos = dict(model.args.rope), model.args.max_position_embeddings
    step, start_stage, start_stage_step, rank_state, bad_steps = 0, 0, 0, None, 0
    data_dp = plan.data_dp if plan is not None else layout.dp_size  # the run's data layout, kept for good
    if resume_from is not None:
        # Restore the rope of the stage in progress first: the rotary buffers are not part of the state dict.
        _set_stage_rope(model, recipe, min(plan.stage, len(recipe.stages) - 1), base_rope, base_max_pos)
        step, rank_state = _restore(resume_from, plan, engine, layout, info)
        start_stage, start_stage_step, bad_steps = plan.stage, plan.stage_step, rank_state["bad_steps"]
    if info.is_main:  # only a run that starts records its recipe (a refused resume leaves the old one)
        recipe.save(run_dir / "recipe.yaml")
    total_steps = sum(s.steps for s in recipe.stages)
    logger = MetricsLogger(run_dir, recipe.logging, recipe.name, recipe.to_dict(), total_steps, step, info.is_main)
    _log_start(logger, recipe, warnings_text, resume_from, plan, step)
    result = TrainResult(run_dir, step, bad_steps=bad_steps)
    preempt = _Preemption(info.device)
    preempt.install()
    source: BatchSource | None = None
    try:
        for si in range(start_stage, len(recipe.stages)):
            stage = recipe.stages[si]
            _set_stage_rope(model, recipe, si, base_rope, base_max_pos)
            if stage.memory != recipe.stages[0].memory:
                # parallel.apply wraps the model once (AC, tiled MLP, offload); re-wrapping mid-run is not supported.
                raise NotImplementedError(f"stage {stage.name!r} changes the `memory` section; set it at the top "
                                          f"level (it applies to every stage)")
            source = build_stage_source(stage, tokenizer, layout.dp_rank, layout.dp_size, data_dp)
            scheduler = build_scheduler(optimizer, stage.train.optimizer, stage.steps, stage.train.schedule)
            n_micro = micro_batches_per_step(stage, layout.dp_size)
            stage_step = 0
            if rank_state is not None and si == start_stage and start_stage_step > 0:
                stage_step = continue_stage(source, scheduler, optimizer, rank_state, start_stage_step, n_micro,
                                            logger)
            fpt, peak = _throughput_model(model.args, stage.seq_len, info.device)
            ceiling = _stage_ceiling(recipe, model, stage, layout, info, logger)
            while stage_step < stage.steps:
                t0 = time.perf_counter()
                batches = [source.next_batch() for _ in range(n_micro)]
                # Chunk selection of sparse chunkwise training: seeded by the step, so a resumed run draws the same.
                gen = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + step)
                stats = train_step(engine, batches, info, layout, stage,
                                   inject_nan=step + 1 in stage.train.debug_nan_steps, generator=gen)
                lr = scheduler.get_last_lr()[0]
                with warnings.catch_warnings():  # after a skipped update torch warns that step() came first
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    scheduler.step()  # the schedule follows the step count, skipped steps included
                step, stage_step = step + 1, stage_step + 1
                dt = time.perf_counter() - t0
                if stats.skipped:
                    bad_steps += 1
                    result.bad_steps = bad_steps
                    logger.write(f"step {step}: loss {stats.loss} / grad norm {stats.grad_norm} is not finite "
                                 f"(or no valid token): update skipped ({bad_steps} of at most "
                                 f"{stage.train.max_bad_steps} allowed)")
                    if bad_steps > stage.train.max_bad_steps:
                        raise TrainingError(
                            f"stopping at step {step} (stage {stage.name!r}): {bad_steps} steps had a NaN/inf loss "
                            f"or gradient norm, more than train.max_bad_steps={stage.train.max_bad_steps}. Lower the "
                            f"learning rate, check the data, or resume from the last checkpoint in {ckpt_root}.")
                result.losses[step] = stats.loss
                if step % recipe.logging.every_steps == 0 or stage_step == stage.steps:
                    tokens = stage.seq_len * stage.train.micro_batch * n_micro * layout.dp_size
                    tps = tokens / dt
                    mfu = None
                    if fpt is not None and peak is not None:
                        from longtrain.trainer.flops import mfu as mfu_fn

                        mfu = mfu_fn(tps / info.world_size, fpt, peak)
                    logger.log({"step": step, "stage": si, "stage_name": stage.name, "loss": stats.loss,
                                "lr": lr, "grad_norm": stats.grad_norm, "valid_tokens": stats.valid_tokens,
                                "tokens_per_s": tps, "mfu": mfu, "mfu_ceiling": ceiling,
                                "memory_gib": memory_gib(info.device),
                                "skipped": stats.skipped, "bad_steps": bad_steps})
                done_stage = stage_step == stage.steps
                next_stage, next_step = (si + 1, 0) if done_stage else (si, stage_step)
                stop_now = recipe.train.stop_after_steps is not None and step >= recipe.train.stop_after_steps
                preempted = preempt.agreed()
                periodic = recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0
                last = done_stage and si == len(recipe.stages) - 1 and recipe.checkpoint.at_end
                if periodic or last or stop_now or preempted:
                    _save(recipe, engine, source, scheduler, info, ckpt_root, recipe_yaml,
                          step, next_stage, next_step, bad_steps, data_dp)
                if preempted or stop_now:
                    result.status = "preempted" if preempted else "stopped"
                    logger.write(f"{result.status} at step {step}: checkpoint in {ckpt_root / ('step-%d' % step)}")
                    break
            source.close()
            # A stage that ended is evaluated, also when a stop_after_steps slot ends with it (a resumed run starts
            # at the next stage). Preemption leaves at once: the grace period is for the checkpoint.
            if stage.eval is not None and stage_step == stage.steps and result.status != "preempted":
                from longtrain.trainer.stage_eval import evaluate_stage

                result.evals += evaluate_stage(model, recipe, si, tokenizer, info, logger, layout.sharded,
                                               engine.full_state_dict)
            if result.status != "done":
                result.step = step
                return result
        result.step = step
        return result
    finally:
        if source is not None:
            source.close()  # stop the prefetch thread (also when a TrainingError ends the run)
        preempt.uninstall()
        logger.close()


def _stage_ceiling(recipe: Recipe, model, stage: StageConfig, layout, info: DistInfo, logger) -> float | None:
    """The MFU ceiling this GPU allows for the stage's shape (measured matmul and attention rates), logged once.

    None when switched off (logging.mfu_ceiling), on CPU, or with context parallelism (the per-GPU ceiling
    would have to model the K/V exchange too).
    """
    if not recipe.logging.mfu_ceiling or info.device.type != "cuda" or layout.cp_size > 1:
        return None
    from longtrain.trainer import flops

    attn_fn = model.layers[0].self_attn.attn_fn
    dtype = build.resolve_dtype(recipe.model.dtype, info.device)
    measured = flops.measure_ceiling(model.args, stage.seq_len, attn_fn, info.device, dtype)
    if measured is None:
        return None
    ceiling, mm, attn = measured
    logger.write(f"stage {stage.name}: MFU ceiling on this GPU {100 * ceiling:.1f}% at {stage.seq_len:,} tokens "
                 f"(measured: projection matmuls {mm / 1e12:.0f} TFLOP/s, attention fwd+bwd {attn / 1e12:.0f} "
                 f"TFLOP/s; norms, loss and optimizer counted as free)")
    return ceiling


def _throughput_model(args, seq_len: int, device: torch.device) -> tuple[float | None, float | None]:
    try:
        from longtrain.trainer import flops
    except ImportError:  # the throughput helper's module: MFU is reported as null without it
        return None, None
    return flops.flops_per_token(args, seq_len), flops.device_peak_flops(device)


def _set_stage_rope(model, recipe: Recipe, si: int, base_rope: dict, base_max_pos: int) -> None:
    rope = build.stage_rope(recipe, si, base_rope)
    max_pos = base_max_pos
    for st in recipe.stages[: si + 1]:
        max_pos = build.stage_max_positions(st, max_pos, base_max_pos)
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
                    f"start over from step 0, set train.resume=never (new checkpoints will replace these) or use "
                    f"another run_dir.")
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


def _save(recipe: Recipe, engine, source: BatchSource, scheduler, info: DistInfo, ckpt_root: Path,
          recipe_yaml: str, step: int, next_stage: int, next_step: int, bad_steps: int, data_dp: int) -> None:
    # After the last step of a stage the checkpoint points at the next stage, step 0: its loader and
    # scheduler are built fresh on resume, so the saved ones are only used mid-stage.
    lora = recipe.model.lora
    meta = CheckpointMeta(step=step, stage=next_stage, stage_step=next_step,
                          model_args=build.args_dict(engine.model.args),
                          lora=dataclasses.asdict(lora) if lora is not None else None,
                          tokenizer=recipe.model.tokenizer, world_size=info.world_size)
    done_stage = next_step == 0
    rank_state = {"data": None if done_stage else source.state_dict(),
                  "scheduler": None if done_stage else scheduler.state_dict(), "bad_steps": bad_steps,
                  # the finished stage's loader position: more steps for it (a raised stages.N.steps) continue there
                  "stage_end": {"data": source.state_dict()} if done_stage else None,
                  "data_dp_size": data_dp}  # the run's data layout (data_layout.py): kept on another layout
    save_checkpoint(ckpt_root, meta, engine, rank_state, info.rank, recipe_yaml,
                    recipe.checkpoint.keep_last, recipe.checkpoint.debug_pause_s)

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

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longtrain.config import Recipe, StageConfig
from longtrain.data.batch import Batch
from longtrain.parallel.cp_shard import prepare_cp_inputs
from longtrain.trainer import build
from longtrain.trainer.data_layout import build_stage_source
from longtrain.trainer.distributed import DistInfo, all_reduce, init_distributed
from longtrain.trainer.engine import forward_backward
from longtrain.trainer.metrics import memory_gib
from longtrain.trainer.optim import build_scheduler
from longtrain.trainer.policies import BadSteps, Checkpoints, Preemption, TrainingError
from longtrain.trainer.resume import continue_stage
from longtrain.trainer.run_setup import RunContext, seed_everything, set_stage_rope, start_run

__all__ = ["TrainResult", "TrainingError", "StepStats", "micro_batches_per_step", "seed_everything", "train",
           "train_step"]


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
        batches = [prepare_cp_inputs(b, layout.cp_rank, layout.cp_size, layout.cp_layout, layout.ulysses)
                   for b in batches]
        local_valid = sum(b.num_valid_tokens for b in batches)
    # On the device: NCCL reduces GPU tensors only.
    global_valid = int(all_reduce(torch.tensor([local_valid], dtype=torch.int64, device=info.device)).item())
    denom = max(global_valid, 1)  # no valid token anywhere: every sum is 0, so is the loss (skipped below)
    batches = [b.to(info.device) for b in batches]
    chunkwise = stage.memory.chunkwise
    if chunkwise is None:
        loss_sum = forward_backward(engine, batches, rope_lens, denom, layout.cp_size > 1, inject_nan)
    else:  # the one branch: chunk-by-chunk forward/backward (SeCO / SpaCO), one process, no CP
        from longtrain.trainer.chunkwise import chunkwise_forward_backward

        loss_sum = torch.zeros((), dtype=torch.float32, device=info.device)
        for b in batches:
            s = chunkwise_forward_backward(engine.model, b, chunkwise.chunk, chunkwise.mode, chunkwise.keep,
                                           loss_normalizer=float(denom), generator=generator)
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
    run = start_run(recipe, info or init_distributed())
    result = TrainResult(Path(recipe.run_dir), run.step, bad_steps=run.bad_steps)
    preempt = Preemption(run.info.device)
    preempt.install()
    try:
        for si in range(run.start_stage, len(recipe.stages)):
            _train_stage(run, si, result, preempt)
            if result.status != "done":
                break
        result.step = run.step
        return result
    finally:
        preempt.uninstall()
        run.logger.close()


def _train_stage(run: RunContext, si: int, result: TrainResult, preempt: Preemption) -> None:
    """The steps of stage `si` (from where a resumed run left it), its checkpoints, then its evaluation."""
    recipe, info, layout, engine = run.recipe, run.info, run.layout, run.engine
    stage = recipe.stages[si]
    set_stage_rope(run, si)
    source = build_stage_source(stage, run.tokenizer, layout.dp_rank, layout.dp_size, run.data_dp)
    try:
        scheduler = build_scheduler(engine.optimizer, stage.train.optimizer, stage.steps, stage.train.schedule)
        n_micro = micro_batches_per_step(stage, layout.dp_size)
        stage_step = 0
        if run.rank_state is not None and si == run.start_stage and run.start_stage_step > 0:
            stage_step = continue_stage(source, scheduler, engine.optimizer, run.rank_state, run.start_stage_step,
                                        n_micro, run.logger)
        throughput = (*_throughput_model(engine.model.args, stage.seq_len, info.device),
                      _stage_ceiling(recipe, engine.model, stage, layout, info, run.logger))
        bad = BadSteps(run.bad_steps, run.ckpt_root, run.logger)
        checkpoints = Checkpoints(recipe, info, run.ckpt_root, run.recipe_yaml, run.data_dp)
        while stage_step < stage.steps:
            t0 = time.perf_counter()
            batches = [source.next_batch() for _ in range(n_micro)]
            # Chunk selection of sparse chunkwise training: seeded by the step, so a resumed run draws the same.
            gen = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + run.step)
            stats = train_step(engine, batches, info, layout, stage,
                               inject_nan=run.step + 1 in stage.train.debug_nan_steps, generator=gen)
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # after a skipped update torch warns that step() came first
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()  # the schedule follows the step count, skipped steps included
            run.step, stage_step = run.step + 1, stage_step + 1
            dt = time.perf_counter() - t0
            if stats.skipped:
                bad.record(run.step, stage, stats.loss, stats.grad_norm)
                run.bad_steps = result.bad_steps = bad.count
            result.losses[run.step] = stats.loss
            if run.step % recipe.logging.every_steps == 0 or stage_step == stage.steps:
                _log_step(run, si, stats, lr, dt, n_micro, throughput)
            done_stage = stage_step == stage.steps
            stop_now = recipe.train.stop_after_steps is not None and run.step >= recipe.train.stop_after_steps
            preempted = preempt.agreed()
            if checkpoints.due(run.step, done_stage and si == len(recipe.stages) - 1, stop_now or preempted):
                next_stage, next_step = (si + 1, 0) if done_stage else (si, stage_step)
                checkpoints.save(engine, source, scheduler, run.step, next_stage, next_step, run.bad_steps)
            if preempted or stop_now:
                result.status = "preempted" if preempted else "stopped"
                run.logger.write(f"{result.status} at step {run.step}: checkpoint in "
                                 f"{run.ckpt_root / ('step-%d' % run.step)}")
                break
    finally:
        source.close()  # stop the prefetch thread (also when a TrainingError ends the run)
    # A stage that ended is evaluated, also when a stop_after_steps slot ends with it (a resumed run starts at the
    # next stage). Preemption leaves at once: the grace period is for the checkpoint.
    if stage.eval is not None and stage_step == stage.steps and result.status != "preempted":
        from longtrain.trainer.stage_eval import evaluate_stage

        result.evals += evaluate_stage(engine.model, recipe, si, run.tokenizer, info, run.logger, layout.sharded,
                                       engine.full_state_dict)


def _log_step(run: RunContext, si: int, stats: StepStats, lr: float, dt: float, n_micro: int,
              throughput: tuple[float | None, float | None, float | None]) -> None:
    """One metrics row: loss, lr, gradient norm, tokens/s, MFU (of the peak and of the measured ceiling), memory."""
    stage, layout, info = run.recipe.stages[si], run.layout, run.info
    fpt, peak, ceiling = throughput
    tps = stage.seq_len * stage.train.micro_batch * n_micro * layout.dp_size / dt
    mfu = None
    if fpt is not None and peak is not None:
        from longtrain.trainer.flops import mfu as mfu_fn

        mfu = mfu_fn(tps / info.world_size, fpt, peak)
    run.logger.log({"step": run.step, "stage": si, "stage_name": stage.name, "loss": stats.loss, "lr": lr,
                    "grad_norm": stats.grad_norm, "valid_tokens": stats.valid_tokens, "tokens_per_s": tps,
                    "mfu": mfu, "mfu_ceiling": ceiling, "memory_gib": memory_gib(info.device),
                    "skipped": stats.skipped, "bad_steps": run.bad_steps})


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

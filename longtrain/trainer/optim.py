"""AdamW and the per-stage learning-rate schedule: linear warmup, then cosine / linear decay to lr * min_lr_ratio."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from longtrain.config import OptimizerConfig, ScheduleConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig,
                    device: torch.device, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; fused kernels on CUDA, foreach (multi-tensor) elsewhere.

    Weight decay applies to matrices only (not norms, biases): the usual GPT-3 / Llama practice.
    cpu_adam: DeepSpeed's CPU Adam (AdamW mode) instead of torch's, for ZeRO-Offload's host partitions.

    Raises:
        NotImplementedError: an optimizer other than adamw.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    match cfg.name:
        case "adamw" if cpu_adam:
            # DeepSpeed ZeRO-Offload steps the host partitions with its vectorised C++ Adam (compiled on first use).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                                    eps=cfg.eps, adamw_mode=True)
        case "adamw":
            fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                                     eps=cfg.eps, **fast)
        case other:
            raise NotImplementedError(f"optimizer {other!r}; valid: adamw")


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the stage's peak lr at `step` (0-based) of `total` steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    match cfg.decay:
        case "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        case "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        case "constant":
            return 1.0
        case other:
            raise ValueError(f"schedule decay {other!r}; valid: cosine, linear, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int,
                    schedule: ScheduleConfig) -> LambdaLR:
    """A stage's schedule: sets the stage's optimizer settings (peak lr, betas, eps, weight decay) on every
    group, then scales the lr by `lr_factor` each step. Optimizer state (moments) carries over between stages."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] = cfg.lr
        g["betas"], g["eps"] = tuple(cfg.betas), cfg.eps
        g["weight_decay"] = cfg.weight_decay if g.get("decay", True) else 0.0
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule))

"""The sharding engine behind the training step: the trainer branches on the backend here, once.

`forward_backward` is the part of the step that `longtrain train` (trainer/train.py train_step) and
`longtrain check-parallel` (trainer/check_parallel.py, for the layout and for its cp=1 reference) share.

A `StepEngine` runs the parts of a step that differ between engines (torchtitan `train.py` keeps them in one
forward_backward_step; STYLE.md "the trainer branches on backend once"):
    loss_sum   forward of one micro-batch to the fp32 token-sum loss (never full logits);
    backward   backward of that sum divided by the global valid-token count;
    step       clip, then one optimizer update unless the step is bad (non-finite loss or gradient norm).

- `TorchEngine`: one process unwrapped, or FSDP2 (which sums gradients over dp_shard x cp in its
  reduce-scatter, divide factor 1). Also FSDP2 with CPUOffloadPolicy in one process (memory.offload_params).
- `DeepSpeedEngine`: ZeRO 1-3 with optional ZeRO-Offload; parallel/deepspeed.py owns the wrapping and the
  gradient scaling. Micro-batches accumulate inside ZeRO's buffers with the accumulation boundary set by hand,
  so that a bad step can be dropped before DeepSpeed applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.data.batch import Batch
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy
from longtrain.parallel.cp_shard import local_attn_mask


def forward_backward(engine, batches: list[Batch], rope_lens: list[int], denom: int, cp_sharded: bool,
                     inject_nan: bool = False) -> Tensor:
    """Forward and backward of one step's micro-batches on this rank; returns their fp32 token-sum loss.

    Args:
        engine: a TorchEngine or DeepSpeedEngine.
        batches: this rank's micro-batches, already cut for its cp rank (prepare_cp_inputs) and on its device.
        rope_lens: per micro-batch, the longest position + 1 of the global (uncut) batch: length-dependent ropes
            (dynamic, longrope) pick their frequencies from it, so every cp shard uses what one process would.
        denom: the global valid-token count (>= 1): each micro-batch's backward is of sum / denom, so
            gradients are summed over ranks, never averaged.
        cp_sharded: the batches are cp shards (the attention mask is built from their global positions).
        inject_nan: a test hook (train.debug_nan_steps): a real NaN through the real backward.
    """
    window = engine.model.args.sliding_window
    loss_sum = torch.zeros((), dtype=torch.float32, device=batches[0].input_ids.device if batches else None)
    for i, (b, rope_len) in enumerate(zip(batches, rope_lens)):
        mask = local_attn_mask(b, window) if cp_sharded else None
        s = engine.loss_sum(b, mask, rope_len)
        if inject_nan:
            s = s * float("nan")
        engine.backward(s / denom, last=i == len(batches) - 1)
        loss_sum += s.detach().float()
    return loss_sum


@dataclass
class StepResult:
    grad_norm: float
    stepped: bool


class TorchEngine:
    """A plain or FSDP2-sharded Transformer and its torch optimizer."""

    backend = "fsdp2"

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.model = model  # the Transformer (an FSDPModule when sharded)
        self.optimizer = optimizer  # what the schedule drives and the checkpoint saves

    def loss_sum(self, b: Batch, mask, rope_len: int) -> Tensor:
        hidden = self.model.hidden_states(b.input_ids, b.position_ids, b.doc_ids, mask, rope_seq_len=rope_len)
        return linear_cross_entropy(hidden, self.model.output_weight, b.labels)

    def backward(self, loss: Tensor, last: bool) -> None:
        loss.backward()

    def full_grads(self) -> dict[str, Tensor]:
        """Unsharded fp32 gradients by parameter name, zeros where none (collective under FSDP2)."""
        out = {}
        for name, p in self.model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).float()
        return out

    def step(self, max_norm: float, loss_finite: bool) -> StepResult:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        stepped = loss_finite and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, stepped)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded weights on CPU, on rank 0 (collective under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def checkpoint_state(self) -> dict:
        """What DCP saves: model and optimizer state dicts (sharded ones stay sharded)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, state: dict, folder) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save_extra(self, folder) -> None:
        """Nothing beside DCP (the optimizer state is in it)."""


class DeepSpeedEngine:
    """A DeepSpeed engine around `TokenSumLoss(model)`; the base torch optimizer stays reachable for the schedule.

    Gradient norm and clipping happen inside DeepSpeed's step (its `clip_grad`), so a non-finite gradient norm
    with a finite loss is seen only after the update: the loss is checked before (a NaN/inf loss never reaches
    the optimizer), the norm after; both count as bad steps (docs/parallelism.md says so).
    """

    backend = "deepspeed"

    def __init__(self, engine, model):
        self.ds = engine
        self.model = model  # the inner Transformer: rope, args, evaluation
        base = engine.optimizer
        while hasattr(base, "optimizer"):  # ZeRO optimizer -> the torch (or CPU Adam) optimizer it steps
            base = base.optimizer
        self.optimizer = base

    def loss_sum(self, b: Batch, mask, rope_len: int) -> Tensor:
        return self.ds(b.input_ids, b.position_ids, b.labels, mask, doc_ids=b.doc_ids, rope_seq_len=rope_len)

    def backward(self, loss: Tensor, last: bool) -> None:
        from longtrain.parallel.deepspeed import ds_backward

        # ZeRO reduces gradients into its partitions at the boundary only: the last micro-batch of the step.
        self.ds.set_gradient_accumulation_boundary(last)
        ds_backward(self.ds, loss)

    def full_grads(self) -> dict[str, Tensor]:
        """Full fp32 gradients by parameter name, gathered across ZeRO partitions (collective)."""
        from longtrain.parallel.deepspeed import ds_full_grads

        return ds_full_grads(self.ds)

    def step(self, max_norm: float, loss_finite: bool) -> StepResult:
        if not loss_finite:  # drop the accumulated gradients: DeepSpeed never sees this step
            self.ds.zero_grad()
            return StepResult(float("nan"), False)
        self.ds.optimizer.clip_grad = max_norm if math.isfinite(max_norm) else 0.0
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepResult(grad_norm, math.isfinite(grad_norm))

    def full_state_dict(self) -> dict[str, Tensor]:
        from longtrain.parallel.deepspeed import ds_model_state_dict

        return {k: v.cpu() for k, v in ds_model_state_dict(self.ds).items()}

    # Checkpoints: the full weights go through DCP under "model" (the layout export and eval read, whatever the
    # engine); DeepSpeed's own files hold its partitioned fp32 master weights and optimizer states, written into
    # the same temporary folder, so the checkpoint is published atomically with everything else.
    def checkpoint_state(self) -> dict:
        from longtrain.parallel.deepspeed import ds_model_state_dict

        return {"model": ds_model_state_dict(self.ds)}

    def save_extra(self, folder) -> None:
        self.ds.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_checkpoint_state(self, state: dict, folder) -> None:
        path, _ = self.ds.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"{folder}: no DeepSpeed optimizer state in {folder / 'deepspeed'}: was this checkpoint "
                             f"saved with parallel.backend deepspeed? Resume it with the backend that wrote it")

"""Parallelism applied to a plain model from outside: `apply` lists, in order, everything done to it.

Pieces: dims.py (ParallelDims, DeviceMesh), cp_shard.py (prepare_cp_inputs), cp_balance.py (the
document-aware balanced layout), context_parallel.py (CP attention: ring, allgather, ulysses, hybrid),
fsdp.py (FSDP2, state dicts), deepspeed.py (ZeRO).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from longtrain.kernels.attention import get_attention_backend
from longtrain.kernels.tiled_mlp import TiledMlp, apply_tiled_mlp, mlp_tile
from longtrain.parallel.activation_checkpoint import apply_ac
from longtrain.parallel.context_parallel import apply_cp, cp_ulysses_degree
from longtrain.parallel.deepspeed import deepspeed_wrap
from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.fsdp import apply_fsdp
from longtrain.parallel.fused_kernels import apply_fused_kernels

SHARDING_BACKENDS = ("fsdp2", "deepspeed", "none")


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (per-block compilation as torchtitan: names stay unchanged)."""
    for block in model.layers:
        block.compile()


def apply(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, *, cp_mode: str = "allgather",
          attention_backend: str = "reference", param_dtype: torch.dtype = torch.float32,
          reduce_dtype: torch.dtype = torch.float32, ac_mode: str = "none", offload_activations: bool = False,
          tiled_mlp: TiledMlp = False, fused_kernels: bool = False, compile: bool = False,
          backend: str = "fsdp2",
          zero_stage: int = 3, offload_params: bool = False, offload_optimizer: bool = False,
          grad_clip: float = 0.0, sharded_one_process: bool = False, gpu_checkpoint_layers: int = 0,
          checkpoint_stride: int = 1,
          optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None):
    """Apply context parallelism, memory tricks, compilation and sharding to `model`, in that order.

    Args:
        model: a longtrain Transformer (weights initialised, on its device).
        dims: the validated degrees.
        mesh: `dims.build_mesh(device_type)`; None only when the world size is 1.
        cp_mode: ring | allgather | ulysses | hybrid | hybrid_allgather (used when dims.cp > 1).
        attention_backend: per-rank attention backend name (kernels.attention.get_attention_backend).
        param_dtype, reduce_dtype: FSDP2 compute and gradient-reduction dtypes (DeepSpeed: param_dtype).
        ac_mode: activation checkpointing: none | selective | full; offload_activations: offload them;
            gpu_checkpoint_layers: the last this-many offloaded checkpoints stay on the GPU; checkpoint_stride:
            one stored checkpoint per this many layers (apply_ac stride).
        tiled_mlp: tokens per MLP tile, True for the default tile, False/None for no tiling (kernels.tiled_mlp
            `mlp_tile` reads it).
        fused_kernels: route RMSNorm / RoPE / SwiGLU through the Triton kernels (fused_kernels.py; CUDA, or CPU
            under TRITON_INTERPRET=1).
        compile: torch.compile each block.
        backend, zero_stage, offload_params, offload_optimizer, grad_clip, sharded_one_process,
            optimizer_factory: the sharding engine and its options (`apply_sharding`).

    Returns:
        The model (FSDP2 or none), or the DeepSpeed engine wrapping it (backend deepspeed).

    Raises:
        ValueError: unknown backend or cp mode, a mesh missing for world > 1, backend none with
            several processes.
    """
    local = get_attention_backend(attention_backend)
    if dims.world_size > 1 and mesh is None:
        raise ValueError(f"world size {dims.world_size} needs a mesh: pass dims.build_mesh(device_type)")

    # 1. Attention: context-parallel (exchanges K/V across cp ranks) or the plain local backend.
    #    First, so that activation checkpointing and compile wrap the final attention.
    if dims.cp > 1:
        cp_ulysses_degree(cp_mode, dims)  # validates mode vs ulysses degree
        apply_cp(model, cp_mode, mesh, local)
    else:
        model.set_attention(local)

    # 2. Fused RMSNorm / RoPE / SwiGLU, then the tiled MLP (it tiles whatever MLP forward is then in place);
    #    both before AC so checkpointing wraps the final block.
    if fused_kernels:
        apply_fused_kernels(model)

    tile = mlp_tile(tiled_mlp)
    if tile is not None:
        apply_tiled_mlp(model, tile)

    # 3. Activation checkpointing (and offload): wraps the block forward, after it is final.
    if ac_mode != "none" or offload_activations:
        apply_ac(model, ac_mode, offload=offload_activations, gpu_layers=gpu_checkpoint_layers,
                 stride=checkpoint_stride)

    # 4. Compile per block: after AC (compile traces through the checkpoint), before sharding
    #    (FSDP2's hooks stay outside the compiled region, as in torchtitan).
    if compile:
        apply_compile(model)

    # 5. Sharding last: it needs the final module structure.
    return apply_sharding(model, dims, mesh, backend, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                          zero_stage=zero_stage, offload_params=offload_params, offload_optimizer=offload_optimizer,
                          grad_clip=grad_clip, sharded_one_process=sharded_one_process,
                          optimizer_factory=optimizer_factory)


def apply_sharding(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, backend: str, *,
                   param_dtype: torch.dtype, reduce_dtype: torch.dtype, zero_stage: int, offload_params: bool,
                   offload_optimizer: bool, grad_clip: float, sharded_one_process: bool,
                   optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None):
    """Shard `model` with FSDP2 or DeepSpeed, or leave it whole (backend none, or FSDP2 in one process).

    Args:
        backend: fsdp2 | deepspeed | none (none: no sharding, only for a single process).
        param_dtype, reduce_dtype: FSDP2 compute and gradient-reduction dtypes (DeepSpeed: param_dtype).
        zero_stage: DeepSpeed ZeRO stage (0-3).
        offload_params: parameters, gradients and optimizer states on the host (FSDP2 CPUOffloadPolicy;
            DeepSpeed ZeRO-3 offload_param). offload_optimizer: DeepSpeed ZeRO-Offload of the optimizer states
            (FSDP2 offloads them with the parameters only).
        grad_clip: DeepSpeed only: the clipping norm its step applies.
        sharded_one_process: shard (wrap) even when the world size is 1: FSDP2 offload or DeepSpeed in one
            process (the caller started a one-rank process group).
        optimizer_factory: DeepSpeed only: builds the optimizer from the parameters (the engine owns it).

    Returns:
        The model (FSDP2 or none), or the DeepSpeed engine wrapping it (backend deepspeed).

    Raises:
        ValueError: unknown backend, optimizer-only offload with FSDP2, backend none with several processes.
    """
    match backend:
        case "fsdp2":
            if offload_optimizer and not offload_params:
                raise ValueError("FSDP2 offloads optimizer states only together with the parameters "
                                 "(offload_params=True); for optimizer-only offload use backend deepspeed")
            if dims.world_size == 1 and not sharded_one_process:
                return model
            return apply_fsdp(model, mesh, param_dtype, reduce_dtype, cpu_offload=offload_params)
        case "deepspeed":
            return deepspeed_wrap(model, mesh, zero_stage=zero_stage, dtype=param_dtype,
                                  optimizer_factory=optimizer_factory, offload_optimizer=offload_optimizer,
                                  offload_params=offload_params, grad_clip=grad_clip)
        case "none":
            if dims.world_size > 1:
                raise ValueError(f"backend 'none' cannot sum gradients over {dims.world_size} processes; "
                                 f"use fsdp2 or deepspeed")
            return model
        case _:
            raise ValueError(f"unknown sharding backend {backend!r}; valid: {', '.join(SHARDING_BACKENDS)}")


__all__ = ["ParallelDims", "apply", "apply_compile", "apply_sharding", "SHARDING_BACKENDS"]

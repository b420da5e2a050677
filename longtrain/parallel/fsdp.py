"""FSDP2 sharding (`fully_shard` per block, then the root) and state-dict helpers for checkpoints.

Gradient scaling: the loss is a token sum divided by the GLOBAL valid-token count (all dp and cp ranks,
all micro-batches: torchtitan `train.py`), so the gradient reduction must sum, not average. FSDP's
default divides by the shard group size; `set_gradient_divide_factor(1.0)` turns that off. FSDP shards
over the flattened dp_shard x cp mesh dim: cp ranks hold different tokens of the same sequences, and
their gradients of the (replicated) parameters are summed by the same reduce-scatter (PITFALLS.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)

from longtrain.parallel.dims import submesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel sub-mesh FSDP uses: dp_shard x cp, with dp_replicate outside for HSDP.

    Args:
        mesh: a mesh from ParallelDims.build_mesh, or an already 1-D / 2-D data-parallel mesh.

    Returns:
        The mesh to pass to `fully_shard`.
    """
    names = mesh.mesh_dim_names or ()
    if "dp_replicate" not in names:
        return mesh
    if mesh["dp_replicate"].size() > 1:
        # HSDP: replicate outer, shard inner (a 2-D slice naming a flattened dim; torch has no other
        # way to build it from the root mesh yet).
        return mesh["dp_replicate", "dp_shard_cp"]
    return submesh(mesh, "dp_shard_cp")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
               reduce_dtype: torch.dtype = torch.float32, *, reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> nn.Module:
    """Shard a longtrain Transformer with FSDP2, one unit per block plus the root, summing gradients.

    `hidden_states` is registered as an FSDP forward method, so the trainer's usual call
    (`model.hidden_states(...)`, then the loss on `model.output_weight`) gathers the parameters.
    The root's parameters (embedding, final norm, output projection) stay unsharded between
    hidden_states and the backward (FSDP never reshards the root after forward).

    Args:
        model: the model (already on its device, weights initialised or to be initialised after).
        mesh: a ParallelDims mesh (FSDP uses `fsdp_mesh(mesh)`) or a data-parallel mesh.
        param_dtype: dtype of the gathered parameters for compute (bf16 on GPU, fp32 on CPU).
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 recommended).
        reshard_after_forward: free gathered block parameters after forward (ZeRO-3 like) or keep
            them until backward (ZeRO-2 like, more memory, fewer all-gathers).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.

    Returns:
        The same model, now an FSDPModule.
    """
    dp_mesh = fsdp_mesh(mesh)
    # cast_forward_inputs=False: FSDP2 would otherwise cast every floating input of a block to param_dtype,
    # the rope cos/sin included, which must stay fp32 (PITFALLS.md: bf16 angles err by whole radians at long
    # positions). The hidden states need no cast: they come out of bf16 weights already in bf16.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # Pinned host memory makes the copies to the GPU asynchronous; without a GPU there is nothing to pin for.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # the loss is already divided by the global token count
            # Plain SUM collectives: gloo has no PREMUL_SUM, and NCCL's zero-copy paths need SUM.
            module.set_force_sum_reduction_for_comms(True)
    return model


def model_state_dict(model_or_engine: object) -> dict[str, torch.Tensor]:
    """The model's state dict for torch.distributed.checkpoint (DCP), for FSDP2 or DeepSpeed.

    FSDP2: sharded DTensors (each rank writes its shard). DeepSpeed: see deepspeed.ds_model_state_dict.
    Keys are the model's parameter names (Hugging Face names without `model.`).

    Args:
        model_or_engine: an (FSDP-sharded or plain) Transformer, or a DeepSpeed engine.

    Returns:
        name -> tensor, to pass to `torch.distributed.checkpoint.save` (inside a dict).
    """
    if _is_deepspeed_engine(model_or_engine):
        from longtrain.parallel.deepspeed import ds_model_state_dict
        return ds_model_state_dict(model_or_engine)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model_or_engine)


def load_model_state_dict(model_or_engine: object, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict obtained from `model_state_dict` (then filled by `torch.distributed.checkpoint.load`).

    Args:
        model_or_engine: the same kind of object `model_state_dict` was called on.
        state_dict: name -> tensor.

    Raises:
        ValueError: missing or unexpected keys.
    """
    if _is_deepspeed_engine(model_or_engine):
        from longtrain.parallel.deepspeed import ds_load_model_state_dict
        ds_load_model_state_dict(model_or_engine, state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    result = set_model_state_dict(model_or_engine, state_dict)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"state dict does not match the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")


def _is_deepspeed_engine(obj: object) -> bool:
    return type(obj).__name__ == "DeepSpeedEngine" or any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)

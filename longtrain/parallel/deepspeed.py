"""DeepSpeed ZeRO (stages 1-3, optional CPU offload) behind the same boundary as FSDP2.

DeepSpeed only gathers ZeRO-3 parameters inside module forwards, and the loss uses the output
projection's weight outside any (longtrain never materialises full logits), so the engine wraps
`TokenSumLoss`: a module whose forward runs `hidden_states` and the chunked loss and that registers
the output weight as an external parameter (DeepSpeed's mechanism for weights used outside their
module).

Gradient scaling: DeepSpeed averages gradients over its data-parallel group (here every rank: dp x cp)
and `engine.backward` divides by the gradient-accumulation steps. The loss is already a token sum over
the global valid-token count, so `ds_backward` multiplies by the dp group size and skips the GAS
scaling: gradients come out summed, as with FSDP's divide factor 1.

Install: `pip install deepspeed` (tested with 0.19.8, torch 2.13). On a CPU-only machine DeepSpeed
picks its CPU accelerator by itself (set DS_ACCELERATOR=cpu to skip the probe), uses gloo when oneCCL
is not installed, and JIT-compiles a shared-memory comm op (and CPU Adam for optimizer offload) into
~/.cache/torch_extensions on first use: a C++ compiler must be present (ninja comes with deepspeed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from longtrain.kernels.attention import AttnMask
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:  # a clear message instead of a bare ImportError deep in a run
        raise ImportError("the recipe asks for DeepSpeed (parallel.backend: deepspeed) but `deepspeed` is not "
                          "installed: `pip install 'longtrain[deepspeed]'` (or `pip install deepspeed`); on a CPU-only "
                          "machine also set DS_ACCELERATOR=cpu") from e
    return deepspeed


class TokenSumLoss(nn.Module):
    """model + chunked loss as one forward: returns the fp32 sum of cross-entropy over valid labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, labels: Tensor, mask: AttnMask | None,
                doc_ids: Tensor | None = None, rope_seq_len: int | None = None) -> Tensor:
        h = self.model.hidden_states(input_ids, position_ids, doc_ids, mask, rope_seq_len=rope_seq_len)  # (bs, s, dim)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.model.output_weight, labels.reshape(-1))


def deepspeed_config(zero_stage: int, dtype: torch.dtype, *, offload_optimizer: bool = False,
                     offload_params: bool = False, micro_batch_size: int = 1, grad_clip: float = 0.0) -> dict:
    """A DeepSpeed config dict for ZeRO `zero_stage`.

    Raises:
        ValueError: zero_stage not in 1, 2, 3; parameter offload without stage 3; unsupported dtype.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}; valid: 0 (no ZeRO, data parallel), 1, 2, 3")
    if offload_params and zero_stage != 3:
        raise ValueError(f"parameter offload needs ZeRO stage 3, got zero_stage={zero_stage}")
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
              "zero_optimization": zero, "gradient_clipping": grad_clip, "steps_per_print": 2**31 - 1,
              "wall_clock_breakdown": False}
    match dtype:
        case torch.float32:
            pass
        case torch.bfloat16:
            config["bf16"] = {"enabled": True}
        case torch.float16:
            config["fp16"] = {"enabled": True, "initial_scale_power": 16}
        case _:
            raise ValueError(f"DeepSpeed dtype {dtype}; valid: float32, bfloat16, float16")
    return config


def deepspeed_wrap(model: nn.Module, mesh: DeviceMesh | None, *, zero_stage: int = 3,
                   dtype: torch.dtype = torch.float32,
                   optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                   offload_optimizer: bool = False, offload_params: bool = False, grad_clip: float = 0.0):
    """Wrap a longtrain Transformer (CP attention already installed) in a DeepSpeed engine.

    Args:
        model: the model.
        mesh: the ParallelDims mesh (None in one process); DeepSpeed's data-parallel group is every
            rank, so only dp_replicate == 1 is supported (ZeRO shards over dp_shard x cp like FSDP).
        zero_stage: 0 (plain data parallel), 1, 2 or 3.
        dtype: compute dtype (fp32, bf16, fp16).
        optimizer_factory: builds the torch optimizer from the parameters (DeepSpeed must own it
            from the start); default AdamW(lr=1e-4), DeepSpeedCPUAdam with offload_optimizer.
        offload_optimizer, offload_params: ZeRO-Offload of optimizer state / parameters to the CPU.
        grad_clip: gradient-norm clipping DeepSpeed applies in its step (0: none).

    Returns:
        The engine; call `engine(input_ids, position_ids, labels, mask)` for the token-sum loss and
        `ds_backward(engine, loss)`.

    Raises:
        ImportError: deepspeed is not installed.
        NotImplementedError: dp_replicate > 1 (hybrid ZeRO is not wired up).
    """
    deepspeed = _import_deepspeed()
    if mesh is not None and "dp_replicate" in (mesh.mesh_dim_names or ()) and mesh["dp_replicate"].size() > 1:
        raise NotImplementedError("DeepSpeed with dp_replicate > 1 is not supported; use dp_replicate=1 "
                                  "(ZeRO over all ranks) or the FSDP2 backend for HSDP")
    wrapper = TokenSumLoss(model)
    if zero_stage == 3:
        # The output weight is used outside lm_head's forward: let ZeRO-3 gather it for this forward.
        deepspeed.zero.register_external_parameter(wrapper, model.output_weight)
    config = deepspeed_config(zero_stage, dtype, offload_optimizer=offload_optimizer, offload_params=offload_params,
                              grad_clip=grad_clip)
    if optimizer_factory is not None:
        optimizer = optimizer_factory(wrapper.parameters())
        # The caller chose the optimizer: let DeepSpeed run it on offloaded states too.
        config["zero_force_ds_cpu_optimizer"] = False
    elif offload_optimizer:
        # Offloaded optimizer states are stepped on the CPU: DeepSpeed's vectorised CPU Adam (a C++ op
        # that DeepSpeed compiles on first use).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(wrapper.parameters(), lr=1e-4, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-4)
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def ds_backward(engine, loss: Tensor) -> None:
    """Backward of a globally normalised loss so that DeepSpeed's reduction sums gradients (see module doc)."""
    engine.backward(loss * engine.dp_world_size, scale_wrt_gas=False)


def _strip(name: str) -> str:
    return name.removeprefix("model.")


def ds_full_grads(engine) -> dict[str, Tensor]:
    """Full fp32 gradients by parameter name (no `model.` prefix), gathered across ZeRO partitions.

    Call after `ds_backward` and before `engine.step()`. Collective: all ranks must call it.
    """
    from deepspeed.utils import safe_get_full_grad
    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        out[_strip(name)] = (torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None
                             else g.detach().float().clone())
    return out


def ds_model_state_dict(engine) -> dict[str, Tensor]:
    """Full (unsharded) parameters by name, on every rank, for torch.distributed.checkpoint.

    ZeRO-3 parameters are gathered (memory: the whole model on each rank, once, at save time);
    DCP writes replicated tensors once.
    """
    deepspeed = _import_deepspeed()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {_strip(n): p.detach().clone() for n, p in params.items()}


def ds_load_model_state_dict(engine, state_dict: dict[str, Tensor]) -> None:
    """Copy full parameters (from ds_model_state_dict + DCP load) into the engine's (partitioned) ones.

    Raises:
        ValueError: missing or unexpected keys.
    """
    deepspeed = _import_deepspeed()
    params = {_strip(n): p for n, p in engine.module.named_parameters()}
    if params.keys() != state_dict.keys():
        raise ValueError(f"state dict does not match the model: missing {sorted(params.keys() - state_dict.keys())}, "
                         f"unexpected {sorted(state_dict.keys() - params.keys())}")
    # modifier_rank=0: on exit rank 0's values are broadcast and re-partitioned (None would discard
    # the writes). Every rank loaded the same full tensors, so rank 0's are everyone's.
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state_dict[n].to(p.dtype))
    # ZeRO 1/2 keep fp32 master copies in the optimizer: refresh them from the loaded weights.
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()

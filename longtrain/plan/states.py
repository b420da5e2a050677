"""Parameters, gradients and optimizer states per GPU, what is gathered around them, and what lives on the host."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.model.args import ModelArgs
from longtrain.plan.switches import DTYPE_BYTES, MemorySwitches, StepLayout


@dataclass
class States:
    """Bytes per GPU of the training state; `host` is host RAM per GPU."""

    params: int
    grads: int  # every gradient (alive from the backward of layer 0)
    grad_out: int  # the output projection's gradient: the first one the backward makes
    opt: int  # optimizer states (and DeepSpeed's fp32 master weights)
    gather: int  # gathered (unsharded) parameters: the current and prefetched layer, the root module
    host: int = 0  # offloaded parameters, gradients and optimizer states


def _n_states(optimizer: str) -> int:
    match optimizer:
        case "adamw":
            return 2
        case "sgd":
            return 0
        case _:
            raise ValueError(f"plan_memory: optimizer {optimizer!r} is not known; valid: adamw, sgd")


def state_bytes(a: ModelArgs, lay: StepLayout, sw: MemorySwitches) -> States:
    """The training state of `lay.backend` (fsdp2 | deepspeed) under the offload switches.

    Raises:
        ValueError: an unknown optimizer or backend, or an offload combination the backend does not run.
    """
    states = _n_states(lay.optimizer)
    # FSDP2 shards over the flattened dp_shard x cp mesh, and ZeRO partitions over its data-parallel group,
    # which is every rank of a replica (dp_shard x cp): cp ranks hold different tokens of the same sequences
    # but share the parameters (PITFALLS.md "Planning memory at scale").
    shard = lay.dp_shard * lay.cp
    match lay.backend:
        case "fsdp2":
            return _fsdp2(a, lay, sw, states, shard)
        case "deepspeed":
            return _deepspeed(a, lay, sw, states, shard)
        case _:
            raise ValueError(f"plan_memory: backend {lay.backend!r} is not known; valid: fsdp2, deepspeed")


def _sizes(a: ModelArgs) -> tuple[int, int, int, int]:
    """(all parameters, one layer's, the output projection's, the root module's)."""
    n_params = a.num_params(include_embedding=True)
    layer_params = n_params // max(1, a.n_layers)
    out_params = a.vocab_size * a.dim  # output projection (the embedding when tied): its gradient comes first
    root_params = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim  # embedding, output, final norm
    return n_params, layer_params, out_params, root_params


def _fsdp2(a: ModelArgs, lay: StepLayout, sw: MemorySwitches, states: int, shard: int) -> States:
    if sw.offload_optimizer and not sw.offload_params:
        raise ValueError("plan_memory: FSDP2 offloads optimizer states only together with the parameters "
                         "(CPUOffloadPolicy): set offload_params too, or use backend deepspeed")
    n_params, layer_params, out_params, root_params = _sizes(a)
    b = lay.bytes
    sharded = shard > 1 or sw.offload_params  # one process without offload runs unwrapped
    store = DTYPE_BYTES[sw.master_dtype or ("float32" if sharded else lay.dtype)]
    # torch AdamW keeps its states in the parameter (storage) dtype, created at the first opt.step();
    # FSDP2 shards params, grads and states. Gathered: the current and the prefetched block in the
    # compute dtype, and the root module's parameters (unsharded from its forward to its backward).
    s = States(params=n_params * store // shard, grads=n_params * store // shard,
               grad_out=out_params * store // shard,
               opt=states * n_params * store // shard if lay.steady_state else 0,
               gather=2 * layer_params * b + root_params * b if sharded else 0)
    if sw.offload_params:  # everything sharded lives on the host; the GPU keeps only what is gathered
        s.host = s.params + s.grads + states * n_params * store // shard
        s.params = s.grads = s.grad_out = s.opt = 0
    return s


def _deepspeed(a: ModelArgs, lay: StepLayout, sw: MemorySwitches, states: int, shard: int) -> States:
    stage = lay.zero_stage
    if sw.offload_params and (stage != 3 or not sw.offload_optimizer):
        raise ValueError("plan_memory: DeepSpeed offloads parameters at zero_stage 3 only, with "
                         "offload_optimizer")
    n_params, layer_params, out_params, root_params = _sizes(a)
    b = lay.bytes
    # Compute-dtype params (partitioned at stage 3) and grads (partitioned from stage 2); with a 16-bit
    # dtype, fp32 master weights + fp32 states partitioned from stage 1, built at initialisation.
    master = 4 if b < 4 else 0
    s = States(params=n_params * b // (shard if stage >= 3 else 1),
               grads=n_params * b // (shard if stage >= 2 else 1),
               grad_out=out_params * b // (shard if stage >= 2 else 1),
               opt=(master + 4 * states) * n_params // (shard if stage >= 1 else 1),
               gather=2 * layer_params * b if stage >= 3 and shard > 1 else 0)
    if sw.offload_optimizer:
        # ZeRO-Offload: master + states on the host, and an fp32 copy of the gradient partition
        # there for the CPU Adam step.
        s.host = s.opt + 4 * n_params // (shard if stage >= 1 else 1)
        s.opt = 0
    if sw.offload_params:
        s.host += s.params
        s.params, s.gather = 0, 2 * layer_params * b + root_params * b
    return s

"""Build what a run needs, in order: parallel layout, then the model (meta -> init or load -> parallel.apply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from longtrain.config import Recipe, StageConfig
from longtrain.config_yaml import RecipeError
from longtrain.model.args import ModelArgs
from longtrain.model.decoder import Transformer
from longtrain.model.lora import apply_lora
from longtrain.model.rope import hf_max_position_embeddings
from longtrain.trainer.distributed import DistInfo


@dataclass
class Layout:
    """Where this rank sits: which data it reads (dp) and which slice of each sequence it holds (cp)."""

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    cp_layout: str  # zigzag | balanced | auto (parallel.cp_layout) | contiguous (tests)
    ulysses: int
    mesh: object | None  # torch DeviceMesh, None in one process
    sharded: bool  # True when parameters are sharded (FSDP2): gradients are reduced by the wrapper
    dims: object  # longtrain.parallel.ParallelDims


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bfloat16 parameters on GPU, float32 on CPU (bf16 matmuls on CPU are slow and the tests need fp32)."""
    match name:
        case "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        case "float32":
            return torch.float32
        case "bfloat16":
            return torch.bfloat16
        case other:
            raise ValueError(f"model.dtype {other!r}; valid: auto, float32, bfloat16")


def build_layout(recipe: Recipe, info: DistInfo) -> Layout:
    """Validate the parallel degrees against the world size and place this rank.

    Raises:
        ValueError: the degrees do not multiply to the world size.
    """
    from longtrain.parallel.dims import ParallelDims, submesh

    par = recipe.parallel
    ulysses = par.cp if par.cp_mode == "ulysses" else par.ulysses
    # FSDP2 offload and DeepSpeed wrap the model in one process too: they need a (one-rank) process group.
    one_process_wrap = info.world_size == 1 and needs_wrapper(recipe)
    if one_process_wrap:
        start_one_rank_group(info.device)
    try:
        dims = ParallelDims(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, cp=par.cp, ulysses=ulysses,
                            world_size=info.world_size)
    except ValueError as e:
        raise ValueError(f"{recipe.source}: the `parallel` section does not fit {info.world_size} process(es): {e}")
    mesh = dims.build_mesh(info.device.type) if info.world_size > 1 or one_process_wrap else None
    # submesh, not mesh["cp"]: slicing a flattened dim from the root mesh warns (deprecated) on every rank.
    cp_rank = submesh(mesh, "cp").get_local_rank() if dims.cp > 1 else 0
    dp_rank = submesh(mesh, "dp").get_local_rank() if dims.dp > 1 else 0
    # parallel.cp_layout: zigzag balances one causal document, balanced the documents of a packed row (issue 21);
    # the mask carries global token indices and document ids, so every cp mode takes either layout.
    return Layout(dp_rank, dims.dp, cp_rank, dims.cp, par.cp_layout, ulysses, mesh,
                  info.world_size > 1 or one_process_wrap, dims)


def needs_wrapper(recipe: Recipe) -> bool:
    """The recipe needs the sharding engine even in one process: DeepSpeed, or FSDP2's parameter offload."""
    memory = recipe.stages[0].memory
    return recipe.parallel.backend == "deepspeed" or memory.offload_params


def start_one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store: no port, no launcher needed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)


def model_args(recipe: Recipe) -> ModelArgs:
    """The model shape of the recipe (flavor + overrides, or the HF directory's config.json)."""
    return recipe.model.model_args()


def fused_kernels_setting(recipe: Recipe, device: torch.device) -> bool:
    """model.fused_kernels resolved: auto = on where the Triton kernels run natively (a CUDA GPU, triton)."""
    from longtrain.kernels.rmsnorm import triton_usable

    setting, usable = recipe.model.fused_kernels, triton_usable(torch.empty(0, device=device))
    if setting is True and not usable:
        raise RecipeError(f"{recipe.source}: model.fused_kernels = true, but the Triton kernels cannot run on "
                          f"{device} here (they need triton and a CUDA GPU, or TRITON_INTERPRET=1 on CPU); "
                          f"use model.fused_kernels=auto (on where they run) or false")
    if isinstance(setting, bool):
        return setting
    return device.type == "cuda" and usable  # auto: not in the CPU interpreter, which is for tests


def build_model(recipe: Recipe, info: DistInfo, layout: Layout) -> Transformer:
    """The model of the recipe on `info.device`, built and with LoRA added, before parallel.apply.

    A flavor is built on the meta device and initialised from `model.init_seed` (the same on every rank);
    an HF directory is loaded by `longtrain.load_hf` (fp32, cast by build_engine).
    """
    mcfg = recipe.model
    if mcfg.path is not None:
        from longtrain.model.hf import load_hf

        model = load_hf(mcfg.path, dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = Transformer(model_args(recipe))
        model.to_empty(device="cpu")
        model.init_weights(seed=mcfg.init_seed)
    if mcfg.lora is not None:
        apply_lora(model, **dataclasses.asdict(mcfg.lora), seed=mcfg.init_seed)
    return model


def master_dtype(recipe: Recipe, layout: Layout, compute: torch.dtype) -> torch.dtype:
    """Storage dtype of the parameters (and so of gradients and AdamW states): memory.master_dtype, where auto
    is float32 whenever FSDP2 shards or offloads (bf16 compute through its MixedPrecisionPolicy) and the compute
    dtype in one unwrapped process."""
    match recipe.stages[0].memory.master_dtype:
        case "auto":
            return torch.float32 if layout.sharded else compute
        case "float32":
            return torch.float32
        case "bfloat16":
            return torch.bfloat16
        case other:
            raise ValueError(f"memory.master_dtype {other!r}; valid: auto, float32, bfloat16")


def build_engine(recipe: Recipe, info: DistInfo, layout: Layout):
    """The model through `longtrain.parallel.apply` (attention or CP attention, tiled MLP, activation
    checkpointing, sharding) with its optimizer, as the step engine the trainer drives (trainer/engine.py)."""
    import longtrain.parallel as parallel
    from longtrain.trainer.engine import DeepSpeedEngine, TorchEngine
    from longtrain.trainer.optim import build_optimizer

    model, memory, train0 = build_model(recipe, info, layout), recipe.stages[0].memory, recipe.stages[0].train
    dtype = resolve_dtype(recipe.model.dtype, info.device)
    backend = recipe.parallel.backend if layout.sharded else "none"
    if backend == "deepspeed" and memory.chunkwise is not None:
        raise NotImplementedError(f"{recipe.source}: memory.chunkwise runs its own chunk-by-chunk backward, which "
                                  f"the DeepSpeed engine does not drive; use parallel.backend fsdp2 for it")
    # DeepSpeed keeps the model in the compute dtype and its own fp32 master copy; FSDP2 stores master_dtype.
    model.to(device=info.device, dtype=dtype if backend == "deepspeed" else master_dtype(recipe, layout, dtype))
    # Offloaded parameters are stepped where they live: on the host (no fused CUDA AdamW there).
    opt_device = torch.device("cpu") if memory.offload_params else info.device
    cpu_adam = backend == "deepspeed" and memory.offload_optimizer and _cpu_adam_builds()
    make_optimizer = lambda params: build_optimizer(params, train0.optimizer, opt_device, cpu_adam)  # noqa: E731
    out = parallel.apply(model, layout.dims, layout.mesh, cp_mode=recipe.parallel.cp_mode,
                         attention_backend=recipe.model.attention, param_dtype=dtype, reduce_dtype=torch.float32,
                         ac_mode=memory.activation_checkpoint, offload_activations=memory.offload_activations,
                         tiled_mlp=recipe.mlp_tile(),
                         fused_kernels=fused_kernels_setting(recipe, info.device), backend=backend,
                         zero_stage=recipe.parallel.zero_stage, offload_params=memory.offload_params,
                         offload_optimizer=memory.offload_optimizer, grad_clip=train0.grad_clip,
                         sharded_one_process=layout.sharded and info.world_size == 1,
                         gpu_checkpoint_layers=memory.gpu_checkpoint_layers,
                         checkpoint_stride=memory.checkpoint_stride,
                         optimizer_factory=make_optimizer if backend == "deepspeed" else None)
    if backend == "deepspeed":
        return DeepSpeedEngine(out, model)
    return TorchEngine(out, make_optimizer(out.parameters()))


def _cpu_adam_builds() -> bool:
    """DeepSpeed's CPU Adam compiles on first use (a C++ compiler is needed); without it ZeRO-Offload runs the
    recipe's torch AdamW on the host partitions, and says so."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
        return True
    except Exception as e:  # noqa: BLE001 - any build failure means: use torch's AdamW
        print(f"warning: DeepSpeed's CPU Adam did not build here ({type(e).__name__}: {str(e)[:200]}); the "
              f"offloaded optimizer states are stepped by torch AdamW on the CPU (slower)")
        return False


def stage_rope(recipe: Recipe, stage_index: int, base: dict) -> dict:
    """The rope in force during stage `stage_index`: the last stage block at or before it, else the model's."""
    for st in reversed(recipe.stages[: stage_index + 1]):
        if st.rope is not None:
            return dict(st.rope)
    return dict(base)


def stage_max_positions(stage: StageConfig, current: int, base: int) -> int:
    """config.json's `max_position_embeddings` while `stage` runs: its rope type's length rule
    (model/rope_methods.py `LengthRule`) for the trained length: linear / dynamic keep the base model's
    pretraining length (vLLM multiplies it by the factor; dynamic starts scaling there), yarn is original x factor,
    the others the trained length.

    Args:
        stage: the stage; its explicit `max_position_embeddings` wins.
        current: the value before this stage.
        base: the value of the model the run started from (its pretraining length).
    """
    if stage.max_position_embeddings:
        return stage.max_position_embeddings
    if stage.rope is None:  # the rope is kept: the trained length, as for the default type
        return max(current, stage.seq_len)
    return hf_max_position_embeddings(stage.rope, max(current, stage.seq_len), pretraining=base)


def args_dict(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

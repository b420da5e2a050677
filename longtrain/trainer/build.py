"""Build what a run needs, in order: parallel layout, model (meta -> parallel -> init or load), memory switches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config import MemoryConfig, Recipe, StageConfig
from longtrain.model.args import ModelArgs
from longtrain.model.decoder import Transformer
from longtrain.trainer.distributed import DistInfo
from longtrain.trainer.lora import apply_lora


@dataclass
class Layout:
    """Where this rank sits: which data it reads (dp) and which slice of each sequence it holds (cp)."""

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    cp_layout: str  # zigzag | contiguous
    ulysses: int
    mesh: object | None  # torch DeviceMesh, None in one process
    sharded: bool  # True when parameters are sharded (FSDP2): gradients are reduced by the wrapper


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
        NotImplementedError: a layout the trainer cannot run yet.
    """
    par = recipe.parallel
    if info.world_size == 1:
        if par.cp > 1 or par.dp_shard > 1 or par.dp_replicate > 1:
            raise ValueError(f"{recipe.source}: parallel.cp={par.cp}, dp_shard={par.dp_shard}, dp_replicate="
                             f"{par.dp_replicate} need {par.cp * max(par.dp_shard, 1) * par.dp_replicate} "
                             f"processes; launch with torchrun --nproc-per-node N or set them to 1")
        return Layout(0, 1, 0, 1, "zigzag", 1, None, False)
    from longtrain.parallel.dims import ParallelDims

    ulysses = par.cp if par.cp_mode == "ulysses" else par.ulysses
    dims = ParallelDims(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, cp=par.cp, ulysses=ulysses,
                        world_size=info.world_size)
    mesh = dims.build_mesh(info.device.type)
    cp_rank = mesh["cp"].get_local_rank() if dims.cp > 1 else 0
    dp_rank = mesh["dp"].get_local_rank() if dims.dp > 1 else 0
    # Ring attention balances causal work with zigzag (head-tail) chunks; all-gather and Ulysses keep order.
    layout = "zigzag" if par.cp_mode in ("ring", "hybrid") else "contiguous"
    return Layout(dp_rank, dims.dp, cp_rank, dims.cp, layout, ulysses, mesh, False)


def model_args(recipe: Recipe) -> ModelArgs:
    """The model shape of the recipe (flavor + overrides, or the HF directory's config.json)."""
    if recipe.model.flavor is not None:
        return recipe.model.model_args()
    from longtrain.model.hf import args_from_hf_config
    import json
    from pathlib import Path

    path = Path(recipe.model.path) / "config.json"
    return args_from_hf_config(json.loads(path.read_text()), str(path))


def build_model(recipe: Recipe, info: DistInfo, layout: Layout) -> Transformer:
    """The model of the recipe on `info.device`, LoRA and parallelism applied, weights initialised or loaded.

    A flavor is built on the meta device and materialised after wrapping (no full copy per rank); an HF
    directory is loaded by `longtrain.load_hf`.

    Raises:
        NotImplementedError: a parallel layout beyond data parallelism before longtrain.parallel.apply exists.
    """
    mcfg = recipe.model
    dtype = resolve_dtype(mcfg.dtype, info.device)
    if mcfg.path is not None:
        from longtrain.model.hf import load_hf

        model = load_hf(mcfg.path, dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = Transformer(model_args(recipe))
        model.to_empty(device="cpu")
        model.init_weights(seed=mcfg.init_seed)
    if mcfg.lora is not None:
        apply_lora(model, mcfg.lora, seed=mcfg.init_seed)
    model.to(device=info.device, dtype=dtype)
    if info.world_size > 1:
        apply_parallel(model, recipe, layout)
    return model


def apply_parallel(model: Transformer, recipe: Recipe, layout: Layout) -> None:
    """Install context-parallel attention and sharding through longtrain.parallel, or plain data parallelism.

    Raises:
        NotImplementedError: context parallelism or sharding requested but longtrain.parallel has no `apply`.
    """
    import longtrain.parallel as parallel

    apply = getattr(parallel, "apply", None)
    if apply is None:
        if layout.cp_size > 1:
            raise NotImplementedError("context parallelism needs longtrain.parallel.apply, not available yet")
        # Replicated data parallelism: every rank starts from rank 0's weights; gradients are summed in the loop.
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
        return
    apply(model, layout.mesh, recipe.parallel)
    layout.sharded = recipe.parallel.backend == "fsdp2"


def apply_memory(model: Transformer, memory: MemoryConfig) -> None:
    """Activation checkpointing and tiled MLP from the recipe's memory section (chunkwise is a loop branch).

    Raises:
        NotImplementedError: offload_activations without the memory helper's support.
    """
    if memory.activation_checkpoint != "none":
        from longtrain.parallel.activation_checkpoint import apply_ac

        apply_ac(model, memory.activation_checkpoint)
    if memory.tiled_mlp is True:
        from longtrain.kernels.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model)
    if memory.offload_activations:
        raise NotImplementedError("memory.offload_activations is not wired into the trainer yet")


def stage_rope(recipe: Recipe, stage_index: int, base: dict) -> dict:
    """The rope in force during stage `stage_index`: the last stage block at or before it, else the model's."""
    for st in reversed(recipe.stages[: stage_index + 1]):
        if st.rope is not None:
            return dict(st.rope)
    return dict(base)


def stage_max_positions(stage: StageConfig, current: int) -> int:
    return stage.max_position_embeddings or max(current, stage.seq_len)


def args_dict(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

"""Recipe checks that look across sections (config.py validates each section's own values).

Each raises one RecipeError paragraph that names the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from longtrain.config_yaml import RecipeError

if TYPE_CHECKING:  # the type only: config.py imports this module to run the checks
    from longtrain.config import Recipe


def check_sections(recipe: Recipe, file: str) -> None:
    """Combinations only visible across sections: sequence length vs context parallelism, Ulysses vs heads,
    memory switches vs the sharding engine, and memory that a stage may not change."""
    par, margs = recipe.parallel, recipe.model.model_args() if recipe.model.flavor else None
    for i, st in enumerate(recipe.stages):
        # Zigzag (and auto, which uses it for single documents) cuts 2*cp equal chunks (PITFALLS.md); balanced
        # needs cp equal shares. prepare_cp_inputs could pad a ragged length, but a recipe's fixed seq_len
        # should not waste compute.
        balanced = par.cp_layout == "balanced"
        div = 1 if par.cp == 1 else par.cp if balanced else 2 * par.cp
        if st.seq_len % div:
            cut = f"into cp = {div} equal shares" if balanced else f"zigzag into 2*cp = {div} equal chunks"
            raise RecipeError(f"{file}: `stages[{i}].seq_len` = {st.seq_len} is invalid: with parallel.cp="
                              f"{par.cp} and cp_layout {par.cp_layout} each sequence is cut {cut}, so seq_len "
                              f"must be a multiple of {div} (e.g. {(st.seq_len // div + 1) * div}).")
        per_step = st.seq_len * st.train.micro_batch
        if st.train.global_batch_tokens % per_step:
            raise RecipeError(f"{file}: `stages[{i}].train.global_batch_tokens` = {st.train.global_batch_tokens} "
                              f"is invalid: it must be a multiple of seq_len * micro_batch = {per_step} "
                              f"(or 0 for one micro-batch per data-parallel rank).")
    _check_memory_run_wide(recipe, file)
    _check_offload(recipe, file)
    heads_deg = par.cp if par.cp_mode == "ulysses" else par.ulysses if par.cp_mode.startswith("hybrid") else 1
    if heads_deg > 1 and margs is None and recipe.model.path and (Path(recipe.model.path) / "config.json").exists():
        margs = recipe.model.model_args()
    if heads_deg > 1 and margs is not None and margs.n_heads % heads_deg:
        key = "parallel.cp" if par.cp_mode == "ulysses" else "parallel.ulysses"
        raise RecipeError(f"{file}: `{key}` = {heads_deg} is invalid: Ulysses shards attention heads, and the "
                          f"model's {margs.n_heads} query heads are not divisible by {heads_deg}; use a degree that "
                          f"divides {margs.n_heads} (or cp_mode ring / allgather).")


def _check_memory_run_wide(recipe: Recipe, file: str) -> None:
    """The memory switches apply to the whole run: parallel.apply wraps the model once (checkpointing, tiled
    MLP, offload, sharding), so a stage that changes them would otherwise fail when it starts, hours in."""
    first = recipe.stages[0].memory
    for i, st in enumerate(recipe.stages[1:], 1):
        changed = [f.name for f in dataclasses.fields(first) if getattr(st.memory, f.name) != getattr(first, f.name)]
        if changed:
            key = changed[0]
            raise RecipeError(f"{file}: `stages[{i}].memory.{key}` = {getattr(st.memory, key)!r} is invalid: the "
                              f"memory section applies to the whole run (the model is wrapped once), and stage 0 "
                              f"has {getattr(first, key)!r}; set `memory.{key}` at the top level for every stage.")


def _check_offload(recipe: Recipe, file: str) -> None:
    """Offload switches the sharding engine can honour (a silent no-op would cost a night's run)."""
    par = recipe.parallel
    for i, st in enumerate(recipe.stages):
        mem, where = st.memory, f"stages[{i}].memory" if len(recipe.stages) > 1 else "memory"
        if par.backend == "fsdp2" and mem.offload_optimizer and not mem.offload_params:
            raise RecipeError(f"{file}: `{where}.offload_optimizer` = true is invalid with parallel.backend fsdp2: "
                              f"FSDP2 offloads optimizer states only together with the parameters and gradients "
                              f"(CPUOffloadPolicy). Set memory.offload_params: true (all three on the host), or "
                              f"parallel.backend: deepspeed for optimizer-only offload (ZeRO-Offload).")
        if par.backend == "deepspeed" and mem.offload_params and (par.zero_stage != 3 or not mem.offload_optimizer):
            raise RecipeError(f"{file}: `{where}.offload_params` = true is invalid with parallel.backend deepspeed, "
                              f"zero_stage {par.zero_stage}, offload_optimizer {mem.offload_optimizer}: DeepSpeed "
                              f"offloads parameters only at zero_stage 3 and together with the optimizer states; "
                              f"set parallel.zero_stage: 3 and memory.offload_optimizer: true.")
        if mem.checkpoint_stride > 1 and par.backend == "deepspeed":
            raise RecipeError(f"{file}: `{where}.checkpoint_stride` = {mem.checkpoint_stride} is invalid with "
                              f"parallel.backend deepspeed: re-running a layer outside its own forward needs FSDP2's "
                              f"unshard (ZeRO-3 would need its own gathering); use parallel.backend fsdp2 or stride 1.")
        if mem.master_dtype != "auto" and par.backend == "deepspeed":
            raise RecipeError(f"{file}: `{where}.master_dtype` = {mem.master_dtype!r} is invalid with parallel.backend "
                              f"deepspeed: DeepSpeed always keeps fp32 master weights and states; leave it at auto.")

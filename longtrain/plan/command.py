"""The `longtrain plan RECIPE` command: the plan of every stage of a recipe and the switches that make it fit."""

from __future__ import annotations

import argparse
import sys

from longtrain.plan.memory import GIB, RUNTIME_OVERHEAD_BYTES, MemoryPlan, plan_memory, suggest
from longtrain.plan.switches import ATTENTION_BACKENDS

# Host RAM the OS, the Python processes and the CUDA driver's pinned staging keep for themselves.
HOST_RESERVE_GIB = 8.0


def _format(plan: MemoryPlan, gpu_bytes: int) -> str:
    g = plan.gib()
    rows = [f"  {k:<13} {v:>9.2f} GiB" for k, v in g.items() if k not in ("total", "host_offload")]
    rows.append(f"  {'total':<13} {g['total']:>9.2f} GiB   ({'fits' if plan.fits(gpu_bytes) else 'does NOT fit'} "
                f"in {gpu_bytes / GIB:.0f} GiB with {RUNTIME_OVERHEAD_BYTES / GIB:.0f} GiB runtime overhead; "
                f"peak at {plan.peak_at})")
    if plan.host_offload or plan.host_states:
        rows.append(f"  host RAM per GPU: {g['host_states']:.2f} GiB parameters/gradients/optimizer states + "
                    f"{g['host_offload']:.2f} GiB activation checkpoints = {plan.host_total / GIB:.2f} GiB")
    rows.append(f"  tokens/GPU {plan.tokens_per_gpu:,}   tokens/step {plan.tokens_per_step:,}")
    return "\n".join(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtrain plan RECIPE [a.b=c ...] [--gpu-memory-gib N] [--world-size N]`."""
    p = subparsers.add_parser("plan", help="predicted memory per GPU for a recipe and what makes it fit")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs in the job (resolves dp_shard: -1)")
    p.add_argument("--host-memory-gib", type=float, default=None,
                   help="host RAM of one node, shared by its GPUs' processes (default: 128 for one GPU, 70 a GPU)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(world size, 8)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan of every stage of the recipe and the switches that fit. Returns 0 if all stages fit."""
    from longtrain.config import load_recipe  # config sits above plan in the data flow
    from longtrain.kernels.attention_auto import dense_choice_here
    from longtrain.kernels.linear_cross_entropy import auto_chunk_tokens

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.model.attention not in ATTENTION_BACKENDS:
        print(f"error: model.attention {recipe.model.attention!r} is not modelled by the plan; valid: "
              f"{', '.join(ATTENTION_BACKENDS)}", file=sys.stderr)
        return 2
    par = recipe.parallel
    dp_shard = par.dp_shard if par.dp_shard != -1 else max(1, args.world_size // (par.cp * par.dp_replicate))
    gpu = int(args.gpu_memory_gib * GIB)
    per_node = args.gpus_per_node or min(args.world_size, 8)
    # Default host RAM: this project's GPU machines (1 GPU: 128 GiB; 8 GPUs: 560 GiB, ~70 GiB a GPU).
    node_host = args.host_memory_gib if args.host_memory_gib else (128.0 if per_node == 1 else 70.0 * per_node)
    host = int((node_host - HOST_RESERVE_GIB) * GIB) // per_node  # host RAM each GPU's process may use
    model_args = recipe.model.model_args()
    dtype = "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype
    ok = True
    # What the trainer runs on a GPU: the recipe's attention backend, its loss chunk and impl
    # (linear_cross_entropy's defaults: the Triton epilogue on CUDA), the fused kernels unless the recipe
    # turns them off (model.fused_kernels auto = on with a GPU), no sequence-tiled blocks (the trainer does
    # not apply them), and the optimizer states of every step after the first.
    # `auto` is planned as the kernel it picks on this machine's GPU; without one, as the larger candidate.
    attention = dense_choice_here(recipe.model.attention, model_args.head_dim)
    common = dict(attention=attention, loss_chunk=auto_chunk_tokens(model_args.vocab_size),
                  loss_impl="auto", fused_kernels=recipe.model.fused_kernels is not False, steady_state=True)
    for i, stage in enumerate(recipe.stages):
        mem = stage.memory
        tiled = recipe.mlp_tile()  # what the trainer installs for the whole run (config.py Recipe.mlp_tile)
        kwargs = dict(model_args=model_args, seq_len=stage.seq_len, micro_batch=stage.train.micro_batch,
                      dp_shard=dp_shard, cp=par.cp, cp_mode=par.cp_mode, cp_layout=par.cp_layout, dtype=dtype,
                      optimizer="adamw",
                      backend=par.backend, zero_stage=par.zero_stage, dp_replicate=par.dp_replicate, **common)
        master = None if mem.master_dtype == "auto" else mem.master_dtype
        plan = plan_memory(**kwargs, ac_mode=mem.activation_checkpoint, offload=mem.offload_activations,
                           tiled_mlp=tiled, chunkwise=mem.chunkwise.chunk if mem.chunkwise else None,
                           offload_params=mem.offload_params, offload_optimizer=mem.offload_optimizer,
                           master_dtype=master, gpu_checkpoint_layers=mem.gpu_checkpoint_layers,
                           checkpoint_stride=mem.checkpoint_stride)
        print(f"stage {i} ({stage.name}): seq_len {stage.seq_len:,}, dp_shard {dp_shard}, "
              f"cp {par.cp} ({par.cp_mode}, {par.cp_layout} layout), "
              f"ac {mem.activation_checkpoint}, offload {mem.offload_activations}, tiled_mlp {tiled is not None}, "
              f"offload_params {mem.offload_params}, attention {recipe.model.attention}")
        print(_format(plan, gpu))
        if plan.host_total > host:
            print(f"  host RAM does NOT fit: {plan.host_total / GIB:.1f} GiB per GPU, {host / GIB:.1f} GiB available "
                  f"({node_host:.0f} GiB less {HOST_RESERVE_GIB:.0f} for the OS shared by {per_node} GPU process(es)); "
                  f"memory.master_dtype: bfloat16 halves FSDP2's offloaded states, memory.gpu_checkpoint_layers "
                  f"keeps checkpoints on the GPU")
        if not plan.fits(gpu, host):
            ok = False
            fits = suggest(gpu, host, **{**kwargs, "master_dtype": master})
            if fits:
                print("  fits with: " + "; ".join(f"{label} ({p.total / GIB:.1f} GiB)" for label, p in fits[:3]))
            else:
                print("  no memory switch makes it fit: raise parallel.cp or parallel.dp_shard, or shorten seq_len")
    return 0 if ok else 1

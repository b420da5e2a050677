"""`longtrain check-parallel`: the parallel layout against cp=1 on the same packed batches.

Runs under torchrun (or any initialised process group). Every rank builds the same model twice from
one seed: a plain one (the reference: the whole global batch, every micro-batch, on one rank) and one
with the layout applied (CP attention + FSDP2 or DeepSpeed). Both compute the token-sum loss divided by
the global valid-token count; the report holds both losses, both gradient norms and the largest
per-parameter gradient difference, relative to that parameter's largest gradient entry:
max_p max|g_p - g_ref_p| / max|g_ref_p|.

    torchrun --nproc-per-node 4 -m longtrain.trainer.check_parallel --flavor debug --cp 4 --cp-mode ring
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain import parallel
from longtrain.data.batch import Batch
from longtrain.kernels.attention import get_attention_backend
from longtrain.model.args import ModelArgs, model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel.context_parallel import CP_MODES, apply_cp, cp_ulysses_degree
from longtrain.parallel.cp_shard import make_packed_batches, prepare_cp_inputs
from longtrain.parallel.dims import CP_LAYOUTS, ParallelDims, submesh, validate_seq_len
from longtrain.trainer.engine import DeepSpeedEngine, TorchEngine, forward_backward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelReport:
    loss: float
    loss_ref: float
    grad_norm: float
    grad_norm_ref: float
    max_rel_grad_diff: float  # max over parameters of max|g - g_ref| / max|g_ref|
    worst_param: str
    n_valid_tokens: int

    @property
    def loss_rel_diff(self) -> float:
        return abs(self.loss - self.loss_ref) / max(abs(self.loss_ref), 1e-30)

    def ok(self, tolerance: float) -> bool:
        return self.loss_rel_diff <= tolerance and self.max_rel_grad_diff <= tolerance


def _compare(grads: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, str]:
    if grads.keys() != ref.keys():
        raise ValueError(f"parameter names differ: {sorted(set(grads) ^ set(ref))}")
    worst, worst_name = 0.0, ""
    for name, g_ref in ref.items():
        diff = float((grads[name] - g_ref).abs().max()) / max(float(g_ref.abs().max()), 1e-30)
        if diff > worst or not worst_name:
            worst, worst_name = diff, name
    return worst, worst_name


def check_parallel(model_args: ModelArgs, seq_len: int, cp: int, mode: str, *, layout: str = "zigzag",
                   ulysses: int = 1, dp_shard: int = -1, dp_replicate: int = 1, sharding: str = "fsdp2",
                   attention_backend: str = "reference", dtype: torch.dtype = torch.float32, n_batches: int = 2,
                   bs: int = 1, seed: int = 0, zero_stage: int = 3, ac_mode: str = "none",
                   tiled_mlp: int | bool = False, batches: list[Batch] | None = None) -> ParallelReport:
    """Compare the loss and gradients of a parallel layout with cp=1 on the same data.

    Must run inside an initialised default process group (all ranks call it).

    Args:
        model_args: the model (e.g. model_flavor("debug")).
        seq_len: tokens per sequence (any length >= 2*cp; padding is internal).
        cp: context-parallel degree; mode: one of CP_MODES; layout: one of CP_LAYOUTS (zigzag, contiguous,
            balanced, auto).
        ulysses: Ulysses degree inside cp (hybrid modes; mode "ulysses" uses cp).
        dp_shard, dp_replicate: data-parallel degrees (dp_shard=-1: what the world leaves).
        sharding: "fsdp2", "deepspeed" or "none" (no sharding: cp ranks sum gradients by all-reduce).
        attention_backend: local backend name (kernels.attention).
        dtype: compute dtype of the parallel model (and of the reference).
        n_batches: micro-batches per data-parallel rank.
        bs: rows per micro-batch; seed: model init and data seed.
        zero_stage: DeepSpeed ZeRO stage (sharding="deepspeed").
        ac_mode: activation checkpointing (none | selective | full); tiled_mlp: tokens per MLP tile or
            False (both through parallel.apply, so not with sharding "none").
        batches: the global micro-batches to use instead of make_packed_batches' (a multiple of the dp
            degree; dp rank d takes batches d, d + dp, ...).

    Returns:
        A ParallelReport (identical on all ranks).

    Raises:
        ValueError: bad degrees, modes or sequence length.
    """
    world = dist.get_world_size()
    if mode == "ulysses":
        ulysses = cp
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ulysses=ulysses, world_size=world)
    validate_seq_len(seq_len, cp, layout)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    mesh = dims.build_mesh(device_type)
    u_degree = cp_ulysses_degree(mode, dims)

    ref, model, backend = _twin_models(model_args, seed, device, dtype, attention_backend)
    window = model_args.sliding_window

    # The global data: dp ranks x micro-batches; every rank sees all of it for the reference.
    if batches is None:
        batches = make_packed_batches(dims.dp * n_batches, bs, seq_len, model_args.vocab_size, seed)
    elif len(batches) % dims.dp:
        raise ValueError(f"{len(batches)} batches cannot be split evenly over dp={dims.dp} ranks")
    batches = [b.to(device) for b in batches]
    n_valid = sum(b.num_valid_tokens for b in batches)
    denom = max(n_valid, 1)  # zero valid tokens: the loss is 0, not 0/0

    # The reference runs the trainer's own forward/backward (engine.forward_backward) on the whole global batch.
    ref_engine = TorchEngine(ref, None)
    loss_ref = forward_backward(ref_engine, batches, _rope_lens(batches), denom, cp_sharded=False)

    # The layout, through the same parallel.apply and the same step the trainer uses.
    engine = _apply_layout(model, dims, mesh, mode, sharding, attention_backend, backend, dtype, zero_stage, ac_mode,
                           tiled_mlp)
    dp_rank, cp_rank = submesh(mesh, "dp").get_local_rank(), submesh(mesh, "cp").get_local_rank()
    mine = batches[dp_rank::dims.dp]
    local = [prepare_cp_inputs(b, cp_rank, cp, layout, ulysses=u_degree, window=window) for b in mine]
    loss_par = forward_backward(engine, local, _rope_lens(mine), denom, cp_sharded=cp > 1).float()
    dist.all_reduce(loss_par)
    if sharding == "none":  # cp (and dp) ranks hold different tokens: sum their gradients
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    grads, grads_ref = engine.full_grads(), ref_engine.full_grads()
    worst, worst_name = _compare(grads, grads_ref)
    return ParallelReport(loss=float(loss_par) / denom, loss_ref=float(loss_ref) / denom, grad_norm=_norm(grads),
                          grad_norm_ref=_norm(grads_ref), max_rel_grad_diff=worst, worst_param=worst_name,
                          n_valid_tokens=n_valid)


def _twin_models(model_args: ModelArgs, seed: int, device: torch.device, dtype: torch.dtype, attention_backend: str):
    """The cp=1 reference (in `dtype`, with the local attention backend) and an identical model for the layout."""
    torch.manual_seed(seed)
    ref = Transformer(copy.deepcopy(model_args)).to(device)
    ref.init_weights(seed)
    model = copy.deepcopy(ref)
    ref.to(dtype)
    backend = get_attention_backend(attention_backend)
    ref.set_attention(backend)
    return ref, model, backend


def _rope_lens(batches: list[Batch]) -> list[int]:
    return [int(b.position_ids.max()) + 1 for b in batches]


def _norm(grads: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def _apply_layout(model: Transformer, dims: ParallelDims, mesh, mode: str, sharding: str, attention_backend: str,
                  backend, dtype: torch.dtype, zero_stage: int, ac_mode: str, tiled_mlp: int | bool):
    """Apply the layout to `model` in place; returns the trainer's engine around it (no optimizer: no step)."""
    match sharding:
        case "fsdp2" | "deepspeed":
            out = parallel.apply(model, dims, mesh, cp_mode=mode, attention_backend=attention_backend,
                                 param_dtype=dtype, reduce_dtype=torch.float32, ac_mode=ac_mode, tiled_mlp=tiled_mlp,
                                 backend=sharding, zero_stage=zero_stage)
            return DeepSpeedEngine(out, model) if sharding == "deepspeed" else TorchEngine(out, None)
        case "none":  # CP attention only; gradients summed by all-reduce in check_parallel (a check-only layout)
            if ac_mode != "none" or tiled_mlp:
                raise ValueError("sharding 'none' applies CP attention only; use fsdp2 or deepspeed with ac_mode / "
                                 "tiled_mlp")
            model.to(dtype)
            apply_cp(model, mode, mesh, backend)
            return TorchEngine(model, None)
        case _:
            raise ValueError(f"unknown sharding {sharding!r}; valid: fsdp2, deepspeed, none")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults of None mean "from the recipe, else the built-in default" (see _resolve).
    p.add_argument("recipe", nargs="?", default=None,
                   help="a YAML recipe: model, stage-1 seq_len and the `parallel` section (flags override it)")
    p.add_argument("overrides", nargs="*", default=[], help="recipe overrides such as parallel.cp=4")
    p.add_argument("--flavor", default=None, help="model flavor (model.args.MODEL_FLAVORS) instead of a recipe")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; need not divide 2*cp (default 77)")
    p.add_argument("--cp", type=int, default=None, help="context-parallel degree (default: world size)")
    p.add_argument("--cp-mode", default=None, choices=CP_MODES)
    p.add_argument("--cp-layout", default=None, choices=CP_LAYOUTS,
                   help="how sequences are cut over cp ranks (default: the recipe's parallel.cp_layout, else auto)")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree inside cp (hybrid modes)")
    p.add_argument("--dp-shard", type=int, default=None)
    p.add_argument("--dp-replicate", type=int, default=None)
    p.add_argument("--sharding", default=None, choices=("fsdp2", "deepspeed", "none"))
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3))
    p.add_argument("--attention-backend", default=None, help="local attention backend (default reference)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default fp32 (recipe: its model.dtype)")
    p.add_argument("--ac", default="none", choices=("none", "selective", "full"), help="activation checkpointing")
    p.add_argument("--tiled-mlp", type=int, default=0, help="tokens per MLP tile (0: no tiling)")
    p.add_argument("--batches", type=int, default=2, help="micro-batches per data-parallel rank")
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative loss / gradient difference (default 1e-5 in fp32, 2e-2 in bf16/fp16)")


def _first(*values):
    return next(v for v in values if v is not None)


def _resolve(args: argparse.Namespace) -> dict:
    """check_parallel keyword arguments from flags, the recipe (if any), then defaults."""
    world = dist.get_world_size()
    if args.recipe is None:
        if args.overrides:
            raise ValueError(f"overrides {args.overrides} need a recipe")
        mcfg_args, par, seq_len, attn, dtype = model_flavor(args.flavor or "debug"), None, None, None, None
    else:
        from longtrain.config import load_recipe
        from longtrain.trainer.build import model_args, resolve_dtype

        if args.flavor is not None:
            raise ValueError("give either a recipe or --flavor, not both")
        recipe = load_recipe(args.recipe, args.overrides)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mcfg_args, par, seq_len = model_args(recipe), recipe.parallel, recipe.stages[0].seq_len
        attn = recipe.model.attention
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_dtype(recipe.model.dtype, device)]
    dtype_name = _first(args.dtype, dtype, "fp32")
    cp = _first(args.cp, par.cp if par else None, world)
    mode = _first(args.cp_mode, par.cp_mode if par else None, "ring")
    ulysses = cp if mode == "ulysses" else _first(args.ulysses, par.ulysses if par else None, 1)
    return dict(model_args=mcfg_args, seq_len=_first(args.seq_len, seq_len, 77), cp=cp, mode=mode,
                layout=_first(args.cp_layout, par.cp_layout if par else None, "auto"), ulysses=ulysses,
                dp_shard=_first(args.dp_shard, par.dp_shard if par else None, -1),
                dp_replicate=_first(args.dp_replicate, par.dp_replicate if par else None, 1),
                sharding=_first(args.sharding, par.backend if par else None, "fsdp2"),
                zero_stage=_first(args.zero_stage, par.zero_stage if par else None, 3),
                attention_backend=_first(args.attention_backend, attn, "reference"), dtype=DTYPES[dtype_name],
                n_batches=args.batches, bs=args.bs, seed=args.seed, ac_mode=args.ac, tiled_mlp=args.tiled_mlp or False)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtrain check-parallel [RECIPE] [overrides] [--flags]` on the CLI's subparsers."""
    p = subparsers.add_parser("check-parallel", help="compare a parallel layout with cp=1 on packed batches",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the check from parsed arguments (initialises the process group from torchrun's env if needed).

    Returns:
        0 when loss and every gradient are within tolerance, 1 otherwise, 2 for a bad recipe or flags.
    """
    own_pg = not dist.is_initialized()
    if own_pg:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    try:
        try:
            kwargs = _resolve(args)
        except ValueError as e:  # RecipeError is a ValueError too
            if dist.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        dtype = kwargs["dtype"]
        tolerance = args.tolerance if args.tolerance is not None else (1e-5 if dtype == torch.float32 else 2e-2)
        report = check_parallel(**kwargs)
        ok = report.ok(tolerance)
        if dist.get_rank() == 0:
            print(f"check-parallel cp={kwargs['cp']} mode={kwargs['mode']} layout={kwargs['layout']} "
                  f"ulysses={kwargs['ulysses']} sharding={kwargs['sharding']} dtype={dtype} "
                  f"backend={kwargs['attention_backend']} seq_len={kwargs['seq_len']} world={dist.get_world_size()}\n"
                  f"  loss      {report.loss:.8f}  cp=1: {report.loss_ref:.8f}  rel diff {report.loss_rel_diff:.2e}\n"
                  f"  grad norm {report.grad_norm:.8f}  cp=1: {report.grad_norm_ref:.8f}\n"
                  f"  max per-parameter relative grad diff {report.max_rel_grad_diff:.2e} ({report.worst_param})\n"
                  f"  {'OK' if ok else 'FAILED'} (tolerance {tolerance:.1e}, {report.n_valid_tokens} valid tokens)",
                  flush=True)
        return 0 if ok else 1
    finally:
        if own_pg:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longtrain.trainer.check_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

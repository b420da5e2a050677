"""Context-parallel weak scaling: tokens/s per GPU and MFU for each cp mode as the sequence grows with cp.

Run under torchrun, one process per GPU. For every (mode, cp, tokens per GPU) the world is laid out as
dp_shard = world / cp (FSDP2 over dp_shard x cp, bf16 compute, fp32 reduce) and every cp group trains one
sequence of cp x tokens-per-GPU tokens: random init, AdamW, the memory switches named on the command line.
Each configuration builds a fresh model; an out-of-memory is reported as such and the sweep goes on.

    torchrun --nproc-per-node 4 benchmarks/cp_scaling.py --flavor llama3.1-8b \
        --tokens-per-gpu 65536,131072 --cps 1,2,4 --modes ring,allgather,ulysses,hybrid

    # CPU smoke test of the logic (gloo, tiny model):
    torchrun --nproc-per-node 2 benchmarks/cp_scaling.py --smoke

Weak-scaling efficiency of a mode = (tokens/s/GPU at cp) / (tokens/s/GPU at cp=1 with the same tokens per GPU)
x (attention work per token at cp=1) / (attention work per token at cp): the sequence at cp is cp times longer,
so each token costs more attention FLOPs; efficiency is therefore reported on MFU, which counts them.

Memory of the Llama-3.1-8B shape (8.03B parameters) on 2 x 80 GB, FSDP2 over 2 ranks, per GPU:
fp32 master weights + fp32 grads + fp32 AdamW states = 16 B/param / 2 = 64 GB before any activation, so they do
not fit beside a 64K-token sequence; `--master-dtype bf16` (bf16 weights, grads and AdamW states, 8 B/param / 2
= 32 GB) does. Full AC keeps one (tokens x 4096) bf16 block input per layer: 16 GiB at 64K tokens per GPU,
32 GiB at 128K, where `--offload-activations` moves them to host memory (longtrain plan: ~67 GiB per GPU at 64K
without offload, ~66 GiB at 128K with it). bf16 AdamW loses updates smaller than bf16's resolution; that
changes training quality, not the step's work, so it is fine for throughput (a real 8B run wants 4+ GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from longtrain.data.batch import Batch
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel import apply
from longtrain.parallel.cp_shard import local_attn_mask, prepare_cp_inputs
from longtrain.parallel.dims import ParallelDims
from longtrain.trainer.flops import device_peak_flops, flops_per_token, mfu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # random_init.py beside this script
from random_init import init_random  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="llama3.1-8b")
    p.add_argument("--tokens-per-gpu", default="65536,131072,262144")
    p.add_argument("--cps", default="1,2,4", help="cp degrees to measure (each must divide the world size)")
    p.add_argument("--modes", default="ring,allgather,ulysses,hybrid")
    p.add_argument("--attention", default="auto", help="per-rank attention backend")
    p.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    p.add_argument("--tiled-mlp", action="store_true", default=True)
    p.add_argument("--no-tiled-mlp", dest="tiled_mlp", action="store_false")
    p.add_argument("--master-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the sharded weights, gradients and AdamW states (compute is bf16 on GPU)")
    p.add_argument("--offload-activations", action="store_true", help="saved activations to host memory")
    p.add_argument("--fused", action="store_true", help="fused Triton RMSNorm / RoPE / SwiGLU kernels")
    p.add_argument("--best-of", default=None,
                   help="a JSONL of an earlier run: measure only its mode with the best MFU at cp > 1")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up steps")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps first (allocator, kernels, NCCL); 0 for very long steps where one more "
                        "step costs minutes (the timed step then carries those first-call costs)")
    p.add_argument("--out", default=None, help="JSONL file for the results (rank 0)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU/gloo, for testing the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.flavor, args.tokens_per_gpu, args.attention, args.steps = "debug", "32,64", "reference", 1
        args.cps, args.ac, args.tiled_mlp = "1,2", "none", False
    if args.best_of:
        with open(args.best_of) as f:
            args.modes = best_mode([json.loads(line) for line in f if line.strip()])
    return args


def best_mode(results: list[dict]) -> str:
    """The cp mode with the highest MFU among the measured cp > 1 configurations (tokens/s where the device
    has no known peak, e.g. the CPU smoke test: the same ranking at equal lengths).

    Raises:
        ValueError: no cp > 1 configuration succeeded.
    """
    ok = [r for r in results if r.get("status") == "ok" and r.get("cp", 1) > 1]
    if not ok:
        raise ValueError(f"--best-of: no successful cp > 1 result among {len(results)} records")
    return max(ok, key=lambda r: r["mfu"] if r["mfu"] is not None else r["tokens_per_s_per_gpu"])["mode"]


def weak_scaling(results: list[dict]) -> dict[tuple[str, int, int], float]:
    """Weak-scaling efficiency of each successful cp > 1 result: its MFU over the cp=1 MFU at the same
    tokens per GPU (see the module docstring), keyed by (mode, cp, tokens per GPU)."""
    base = {r["tokens_per_gpu"]: r["mfu"] for r in results if r["status"] == "ok" and r["cp"] == 1 and r["mfu"]}
    return {(r["mode"], r["cp"], r["tokens_per_gpu"]): r["mfu"] / base[r["tokens_per_gpu"]]
            for r in results
            if r["status"] == "ok" and r["cp"] > 1 and r["mfu"] and r["tokens_per_gpu"] in base}


def build(flavor: str, dims: ParallelDims, mesh, mode: str, args: argparse.Namespace, device: torch.device):
    model_args = model_flavor(flavor)
    bf16 = device.type == "cuda"
    master = torch.bfloat16 if args.master_dtype == "bf16" else torch.float32
    with torch.device("meta"):
        model = Transformer(model_args)
    model.to(dtype=master)  # still on meta: the weights are allocated once, in the master dtype (rope stays fp32)
    model.to_empty(device=device)
    torch.manual_seed(0)
    init_random(model, model_args.initializer_range)
    if args.fused:  # before apply: tiled MLP and AC wrap whatever forward the modules then have
        from longtrain.parallel.fused_kernels import apply_fused_kernels

        apply_fused_kernels(model)
    model = apply(model, dims, mesh, cp_mode=mode, attention_backend=args.attention,
                  param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32,
                  ac_mode=args.ac, offload_activations=args.offload_activations, tiled_mlp=args.tiled_mlp,
                  backend="fsdp2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=bf16)
    return model, opt, model_args


def one_step(model, opt, batch: Batch, dims: ParallelDims, cp_rank: int, mode: str, device: torch.device) -> None:
    local = prepare_cp_inputs(batch, cp_rank, dims.cp, "zigzag", dims.ulysses).to(device) if dims.cp > 1 \
        else batch.to(device)
    mask = local_attn_mask(local) if dims.cp > 1 else None
    hidden = model.hidden_states(local.input_ids, local.position_ids, local.doc_ids, mask)
    loss = linear_cross_entropy(hidden, model.output_weight, local.labels)
    total = torch.tensor([float(batch.num_valid_tokens * dims.dp)], device=device)  # global valid tokens
    (loss / total).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(mode: str, cp: int, tokens_per_gpu: int, args, world: int, rank: int, device: torch.device) -> dict:
    ulysses = {"ulysses": cp, "hybrid": 2 if cp >= 4 else 1}.get(mode, 1)
    if mode == "hybrid" and ulysses == 1:
        return {"status": "skipped (hybrid needs cp >= 4)"}
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=cp, ulysses=ulysses, world_size=world)
    mesh = dims.build_mesh(device.type)
    cp_rank = mesh["cp"].get_local_rank() if cp > 1 else 0
    dp_rank = mesh["dp"].get_local_rank() if dims.dp > 1 else 0
    seq = tokens_per_gpu * cp
    model, opt, model_args = build(args.flavor, dims, mesh, mode, args, device)
    gen = torch.Generator().manual_seed(1000 + dp_rank)  # every cp rank of a group: the same sequence
    ids = torch.randint(0, model_args.vocab_size, (1, seq + 1), generator=gen)
    positions = torch.arange(seq).unsqueeze(0)
    batch = Batch(ids[:, :-1], ids[:, 1:].clone(), positions, torch.zeros(1, seq, dtype=torch.int64))
    for _ in range(args.warmup):  # allocator, kernels, NCCL
        one_step(model, opt, batch, dims, cp_rank, mode, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step(model, opt, batch, dims, cp_rank, mode, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s_gpu = seq * dims.dp / dt / world
    fpt = flops_per_token(model_args, seq)
    peak = device_peak_flops(device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, opt
    return {"status": "ok", "seq_len": seq, "warmup": args.warmup, "step_s": dt, "tokens_per_s_per_gpu": tok_s_gpu,
            "mfu": mfu(tok_s_gpu, fpt, peak), "peak_mem_gib": mem}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for mode in args.modes.split(","):
        for cp in (int(c) for c in args.cps.split(",")):
            if world % cp:
                continue
            if cp == 1 and mode != args.modes.split(",")[0]:
                continue  # cp=1 is the same for every mode: measure it once
            for tpg in (int(t) for t in args.tokens_per_gpu.split(",")):
                try:
                    r = measure(mode if cp > 1 else "none", cp, tpg, args, world, rank, device)
                except torch.OutOfMemoryError:
                    r = {"status": "OOM"}
                except (RuntimeError, NotImplementedError, ValueError) as e:  # a failing mode is a result too
                    r = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r.update(mode=mode if cp > 1 else "-", cp=cp, tokens_per_gpu=tpg, world=world, flavor=args.flavor)
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
    if rank == 0:
        eff = weak_scaling(results)
        print(f"\n{'mode':<10} {'cp':>3} {'tok/GPU':>8} {'seq':>8} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'GiB':>6}"
              f" {'weak eff':>8}")
        for r in results:
            if r["status"] != "ok":
                print(f"{r['mode']:<10} {r['cp']:>3} {r['tokens_per_gpu']:>8} {r['status']}")
                continue
            m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            g = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            e = eff.get((r["mode"], r["cp"], r["tokens_per_gpu"]))
            e = f"{100 * e:.0f}%" if e is not None else "-"
            print(f"{r['mode']:<10} {r['cp']:>3} {r['tokens_per_gpu']:>8} {r['seq_len']:>8} {r['step_s']:>8.2f} "
                  f"{r['tokens_per_s_per_gpu']:>10.0f} {m:>6} {g:>6} {e:>8}")
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

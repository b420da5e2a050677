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
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--out", default=None, help="JSONL file for the results (rank 0)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU/gloo, for testing the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.flavor, args.tokens_per_gpu, args.attention, args.steps = "debug", "32,64", "reference", 1
        args.cps, args.ac, args.tiled_mlp = "1,2", "none", False
    return args


def build(flavor: str, dims: ParallelDims, mesh, mode: str, args: argparse.Namespace, device: torch.device):
    model_args = model_flavor(flavor)
    with torch.device("meta"):
        model = Transformer(model_args)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    bf16 = device.type == "cuda"
    model = apply(model, dims, mesh, cp_mode=mode, attention_backend=args.attention,
                  param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32,
                  ac_mode=args.ac, tiled_mlp=args.tiled_mlp, backend="fsdp2")
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
    one_step(model, opt, batch, dims, cp_rank, mode, device)  # warm-up: allocator, kernels, NCCL
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
    return {"status": "ok", "seq_len": seq, "step_s": dt, "tokens_per_s_per_gpu": tok_s_gpu,
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
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r.update(mode=mode if cp > 1 else "-", cp=cp, tokens_per_gpu=tpg, world=world, flavor=args.flavor)
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
    if rank == 0:
        print(f"\n{'mode':<10} {'cp':>3} {'tok/GPU':>8} {'seq':>8} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'GiB':>6}")
        for r in results:
            if r["status"] != "ok":
                print(f"{r['mode']:<10} {r['cp']:>3} {r['tokens_per_gpu']:>8} {r['status']}")
                continue
            m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            g = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{r['mode']:<10} {r['cp']:>3} {r['tokens_per_gpu']:>8} {r['seq_len']:>8} {r['step_s']:>8.2f} "
                  f"{r['tokens_per_s_per_gpu']:>10.0f} {m:>6} {g:>6}")
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-rank attention work of context-parallel layouts on packed long-context batches (issue 21).

Part 1 (CPU, exact, no model): draws packed rows from document-length mixtures and counts, for each cp
rank, the useful (query, key) pairs it computes under the zigzag and the balanced layouts: its total
(all-gather: one call per rank) and per ring step (ring: step s on rank r attends the keys of rank
r - s; every step waits for the slowest rank). Work is in pairs (x 4 * head_dim * n_heads FLOPs per
layer forward). Imbalance = max / mean - 1; ring excess = sum_s max_r work(r, s) / mean - 1.

    python benchmarks/cp_balance.py --tokens 131072 524288 1048576 --cp 2 4 8 --seeds 0 1 2

Part 2 (--time, one GPU): runs every local attention call each cp rank makes for one forward and
backward (parallel/cp_local_check.py's enumeration) on one device, times each, and reports the critical
path of a step: ring = sum over steps of the slowest rank's call, all-gather = the slowest rank.
UNRUN on an H100 so far (the CPU smoke test below only checks that it runs):

    python benchmarks/cp_balance.py --time --mixture prolong --tokens 524288 --cp 4 8 --backend flex \\
        --mode ring --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.parallel.cp_balance import balanced_pieces, pair_counts
from longtrain.parallel.cp_shard import cp_shard_indices

MIXTURES = ("prolong", "web", "single")


def draw_row(mixture: str, tokens: int, rng: random.Random) -> list[int]:
    """Document lengths of one packed row, shuffled into a row of document ids.

    prolong: ProLong-like (Gao et al. 2024, arXiv:2410.02660): half the tokens from long documents (books,
        code repositories: log-uniform 64K-512K tokens, the last cut to fit), the other half short
        documents (instruction / web data: lognormal, median ~1.1K tokens, sigma 1.0, at most 32K).
    web: a lognormal web-length mix (median ~700 tokens, sigma 1.3, at most 128K), no long documents.
    single: one document of `tokens`.
    """
    lengths: list[int] = []
    match mixture:
        case "single":
            lengths = [tokens]
        case "prolong":
            long_budget = tokens // 2
            while sum(lengths) < long_budget:
                n = int(math.exp(rng.uniform(math.log(65536), math.log(524288))))
                lengths.append(min(n, long_budget - sum(lengths)))
            while sum(lengths) < tokens:
                n = min(32768, max(1, int(rng.lognormvariate(math.log(1100), 1.0))))
                lengths.append(min(n, tokens - sum(lengths)))
        case "web":
            while sum(lengths) < tokens:
                n = min(131072, max(1, int(rng.lognormvariate(math.log(700), 1.3))))
                lengths.append(min(n, tokens - sum(lengths)))
        case _:
            raise ValueError(f"unknown mixture {mixture!r}; valid: {', '.join(MIXTURES)}")
    rng.shuffle(lengths)
    row = []
    for d, n in enumerate(lengths):
        row += [d] * n
    return row


def owners(row: list[int], cp: int, layout: str) -> torch.Tensor:
    """(S,) the cp rank holding each token under `layout` (zigzag: S must be a multiple of 2*cp)."""
    seqlen = len(row)
    owner = torch.empty(seqlen, dtype=torch.int64)
    match layout:
        case "zigzag":
            for r in range(cp):
                owner[cp_shard_indices(seqlen, r, cp, "zigzag")] = r
        case "balanced":
            for r, ranges in enumerate(balanced_pieces(row, cp)):
                for a, b in ranges:
                    owner[a:b] = r
        case _:
            raise ValueError(f"unknown layout {layout!r}; valid: zigzag, balanced")
    return owner


def work_stats(row: list[int], cp: int, layout: str) -> dict:
    doc = torch.tensor(row)
    t0 = time.perf_counter()
    balanced_pieces(doc, cp)  # what prepare_cp_inputs pays per row on each rank (host, one core)
    solve_s = time.perf_counter() - t0
    owner = owners(row, cp, layout)
    pairs = pair_counts(doc, owner, cp).double()  # (cp, cp) [query rank, key rank]
    total = pairs.sum(1)
    mean = float(total.mean())
    steps = torch.stack([pairs[torch.arange(cp), (torch.arange(cp) - s) % cp] for s in range(cp)])  # (step, rank)
    return {"imbalance": float(total.max()) / mean - 1, "ring_excess": float(steps.max(1).values.sum()) / mean - 1,
            "solve_s": solve_s}


def measure(args: argparse.Namespace) -> None:
    print(f"| mixture | tokens | cp | docs/row | zigzag imbalance | balanced imbalance | zigzag ring excess "
          f"| balanced ring excess | balanced solve (s/row) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mixture in args.mixture:
        for tokens in args.tokens:
            rows = {seed: draw_row(mixture, tokens, random.Random(seed)) for seed in args.seeds}
            n_docs = sum(len(set(r)) for r in rows.values()) / len(rows)
            for cp in args.cp:
                stats = {lay: [work_stats(rows[s], cp, lay) for s in args.seeds] for lay in ("zigzag", "balanced")}

                def worst(lay: str, key: str) -> str:
                    return f"{100 * max(x[key] for x in stats[lay]):.1f}%"

                solve = max(x["solve_s"] for x in stats["balanced"])
                print(f"| {mixture} | {tokens // 1024}K | {cp} | {n_docs:.0f} | {worst('zigzag', 'imbalance')} | "
                      f"{worst('balanced', 'imbalance')} | {worst('zigzag', 'ring_excess')} | "
                      f"{worst('balanced', 'ring_excess')} | {solve:.2f} |", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(args: argparse.Namespace) -> None:
    """Part 2: time each rank's local attention calls on one device; print the critical path per layout."""
    from longtrain.kernels.attention import AttnMask, get_attention_backend
    from longtrain.parallel.cp_local_check import local_attention_calls

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    backend = get_attention_backend(args.backend)
    scale = args.head_dim ** -0.5
    for tokens in args.tokens:
        row = draw_row(args.mixture[0], tokens, random.Random(args.seeds[0]))
        doc = torch.tensor([row])
        batch = Batch(torch.zeros_like(doc), torch.full_like(doc, IGNORE_INDEX), torch.arange(tokens)[None], doc)
        for cp in args.cp:
            path = {}
            for layout in ("zigzag", "balanced"):
                calls = local_attention_calls(batch, cp, args.mode, layout)
                per = {}  # (rank, what) -> seconds (forward + backward)
                for call in calls:
                    m = call.mask
                    mask = AttnMask(m.q_index.to(device), m.k_index.to(device), m.q_doc.to(device),
                                    m.k_doc.to(device), m.window, contiguous=False)
                    sq, sk = m.q_index.shape[1], m.k_index.shape[1]
                    q = torch.randn(1, sq, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                    k, v = (torch.randn(1, sk, args.kv_heads, args.head_dim, device=device, dtype=dtype,
                                        requires_grad=True) for _ in range(2))
                    times = []
                    for it in range(args.warmup + args.iters):
                        fresh = AttnMask(mask.q_index, mask.k_index, mask.q_doc, mask.k_doc, mask.window,
                                         contiguous=False) if it == 0 else fresh  # the backend's cache per layout
                        _sync(device)
                        t0 = time.perf_counter()
                        out, lse = backend(q, k, v, fresh, scale)
                        out.float().sum().backward()
                        _sync(device)
                        if it >= args.warmup:
                            times.append(time.perf_counter() - t0)
                    per[(call.rank, call.what)] = sorted(times)[len(times) // 2]
                steps = sorted({w for _, w in per})
                if args.mode == "ring":  # every ring step waits for the slowest rank
                    crit = sum(max(t for (r, w), t in per.items() if w == s) for s in steps)
                else:
                    crit = max(sum(t for (r, _), t in per.items() if r == rank) for rank in {r for r, _ in per})
                path[layout] = crit
                print(f"{args.mixture[0]} {tokens // 1024}K cp={cp} {args.mode} {layout}: critical path "
                      f"{1e3 * crit:.2f} ms ({len(calls)} calls, {args.backend}, {args.dtype}, {device})", flush=True)
            print(f"  -> balanced / zigzag critical path: {path['balanced'] / path['zigzag']:.3f} "
                  f"(attention step-time gain {path['zigzag'] / path['balanced']:.2f}x)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixture", nargs="+", default=list(MIXTURES), choices=MIXTURES)
    p.add_argument("--tokens", nargs="+", type=int, default=[131072, 524288, 1048576])
    p.add_argument("--cp", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--time", action="store_true", help="part 2: time the per-rank local calls on one device")
    p.add_argument("--mode", default="ring", choices=("ring", "allgather"))
    p.add_argument("--backend", default="flex")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    for t in args.tokens:
        for cp in args.cp:
            if t % (2 * cp):
                raise ValueError(f"--tokens {t} must be a multiple of 2*cp = {2 * cp}")
    time_calls(args) if args.time else measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

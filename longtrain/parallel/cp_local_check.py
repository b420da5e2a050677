"""The local attention calls a context-parallel layout makes, on one device: check a fast backend's per-rank math.

`local_attention_calls` enumerates, without any process group, every (queries, keys, mask) call that
each cp rank hands its local backend for one forward pass: the ring's skipped-or-kept sub-blocks (the
same `ring_blocks` the ring uses), the all-gather call, Ulysses' full-sequence call and the hybrid
combinations. `check_backend` runs each call with a backend and with the reference (fp32 oracle) on the
same tensors and compares out, lse and dq/dk/dv (gradients through both out and lse, as the LSE merge
needs). One GPU suffices:

    python -m longtrain.parallel.cp_local_check --backend sdpa_flash --mode ring --cp 8 --seq-len 4096 --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.data.batch import Batch
from longtrain.kernels.attention import AttnMask, attention_reference, get_attention_backend
from longtrain.parallel.context_parallel import CP_MODES
from longtrain.parallel.cp_shard import local_attn_mask, make_packed_batches, prepare_cp_inputs
from longtrain.parallel.dims import CP_LAYOUTS
from longtrain.parallel.ring_attention import ring_blocks


@dataclass
class LocalCall:
    rank: int  # cp rank making the call (for Ulysses: the first rank of its group)
    what: str  # e.g. "ring step 1"
    mask: AttnMask  # q_index / k_index are the global (padded) positions of the call's queries and keys


def _cat_meta(masks: list[AttnMask]) -> tuple[Tensor, Tensor | None]:
    index = torch.cat([m.k_index for m in masks], dim=1)  # (bs, n * s) in rank order
    doc = None if masks[0].k_doc is None else torch.cat([m.k_doc for m in masks], dim=1)
    return index, doc


def _ring_calls(masks: list[AttnMask], label: str, ranks: list[int]) -> list[LocalCall]:
    k_index, k_doc = _cat_meta(masks)
    calls = []
    for r, mask in enumerate(masks):
        for step, blk in enumerate(ring_blocks(mask, k_index, k_doc, r, len(masks))):
            if blk is not None:
                calls.append(LocalCall(ranks[r], f"{label}ring step {step}", blk.mask))
    return calls


def _allgather_calls(masks: list[AttnMask], label: str, ranks: list[int]) -> list[LocalCall]:
    k_index, k_doc = _cat_meta(masks)
    return [LocalCall(ranks[r], f"{label}allgather", AttnMask(m.q_index, k_index, m.q_doc, k_doc, m.window))
            for r, m in enumerate(masks)]


def local_attention_calls(batch: Batch, cp: int, mode: str, layout: str = "zigzag", ulysses: int = 1,
                          window: int | None = None) -> list[LocalCall]:
    """Every local backend call of one forward pass of cp attention over `batch` (a global batch).

    Args:
        batch: the global batch (seq_index None).
        cp: cp degree; mode: one of CP_MODES; layout: one of CP_LAYOUTS (zigzag, contiguous, balanced, auto).
        ulysses: Ulysses degree for the hybrid modes (mode ulysses uses cp).
        window: the model's sliding window.

    Returns:
        The calls, rank by rank.

    Raises:
        ValueError: unknown mode, or cp not a multiple of ulysses.
    """
    match mode:
        case "ring" | "allgather":
            u = 1
        case "ulysses":
            u = cp
        case "hybrid" | "hybrid_allgather":
            u = ulysses
        case _:
            raise ValueError(f"unknown cp mode {mode!r}; valid: {', '.join(CP_MODES)}")
    if cp % u:
        raise ValueError(f"cp={cp} must be a multiple of ulysses={u}")
    masks = [local_attn_mask(prepare_cp_inputs(batch, r, cp, layout, u, window), window) for r in range(cp)]
    if u > 1:
        # Ulysses gathers its group's sequence (rank order) and attends on a slice of the heads.
        groups = [list(range(g * u, (g + 1) * u)) for g in range(cp // u)]
        gathered = []
        for ranks in groups:
            index, doc = _cat_meta([masks[r] for r in ranks])
            gathered.append(AttnMask(index, index, doc, doc, window))
        masks, ranks = gathered, [g[0] for g in groups]
    else:
        ranks = list(range(cp))
    label = "ulysses + " if u > 1 else ""
    if len(masks) == 1:
        return [LocalCall(ranks[0], f"{label}local", masks[0])]
    if mode in ("ring", "hybrid"):
        return _ring_calls(masks, label, ranks)
    return _allgather_calls(masks, label, ranks)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x (bs, L, h, d) at positions index (bs, s) -> (bs, s, h, d)."""
    return torch.stack([x[b, index[b]] for b in range(x.shape[0])])


def check_backend(backend: str, calls: list[LocalCall], n_heads: int, n_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device | str, seed: int = 0, grad: bool = True) -> list[dict]:
    """Run every call with `backend` and the reference on the same random tensors.

    Args:
        grad: also compare dq/dk/dv (flex_attention has no CPU backward: pass False there).

    Returns:
        Per call: rank, what, and max errors of out, lse (and dq, dk, dv) relative to the reference's
        largest entry (rows that see no key are compared on out only).
    """
    fast = get_attention_backend(backend)
    bs = calls[0].mask.q_index.shape[0]
    length = 1 + max(int(c.mask.k_index.max()) for c in calls)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bs, length, n_heads, head_dim, generator=gen)
    k, v = (torch.randn(bs, length, n_kv_heads, head_dim, generator=gen) for _ in range(2))
    w_out = torch.randn(bs, length, n_heads, head_dim, generator=gen)
    w_lse = torch.randn(bs, length, n_heads, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)
    rows = []
    for call in calls:
        m = call.mask
        mask = AttnMask(m.q_index.to(device), m.k_index.to(device), None if m.q_doc is None else m.q_doc.to(device),
                        None if m.k_doc is None else m.k_doc.to(device), m.window)
        results = {}
        for name, fn, dt in (("fast", fast, dtype), ("ref", attention_reference, torch.float32)):
            ql = _take(q, call.mask.q_index).to(device, dt).requires_grad_(grad)
            kl = _take(k, call.mask.k_index).to(device, dt).requires_grad_(grad)
            vl = _take(v, call.mask.k_index).to(device, dt).requires_grad_(grad)
            # A fresh mask per backend: backends cache derived structures on it.
            out, lse = fn(ql, kl, vl, AttnMask(mask.q_index, mask.k_index, mask.q_doc, mask.k_doc, mask.window),
                          scale)
            wo = _take(w_out, call.mask.q_index).to(device)
            wl = _take(w_lse[..., None], call.mask.q_index).squeeze(-1).transpose(1, 2).to(device)  # (bs, h, s)
            seen = torch.isfinite(lse.detach())
            if grad:
                ((out.float() * wo).sum() + torch.where(seen, lse.float() * wl, 0.0).sum()).backward()
                grads = (ql.grad.float(), kl.grad.float(), vl.grad.float())
            else:
                grads = ()
            results[name] = (out.detach().float(), lse.detach()) + grads
        row = {"rank": call.rank, "what": call.what}
        seen = torch.isfinite(results["ref"][1])
        for i, key in enumerate(("out", "lse", "dq", "dk", "dv")[:len(results["ref"])]):
            a, b = results["fast"][i], results["ref"][i]
            if key == "lse":
                a, b = torch.where(seen, a, 0.0), torch.where(seen, b, 0.0)
                if not torch.equal(torch.isfinite(results["fast"][1]), seen):
                    row[key] = float("inf")  # a row that sees no key must have lse -inf in both
                    continue
            row[key] = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longtrain.parallel.cp_local_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, help="attention backend to check against the reference")
    p.add_argument("--mode", default="ring", choices=CP_MODES)
    p.add_argument("--layout", default="zigzag", choices=CP_LAYOUTS)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--single-doc", action="store_true", help="one document per row (causal layouts only)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-grad", action="store_true", help="forward only (flex_attention on CPU)")
    p.add_argument("--tolerance", type=float, default=None, help="default 1e-4 fp32, 3e-2 bf16/fp16")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tol = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    batch = make_packed_batches(1, args.bs, args.seq_len, 100, seed=0)[0]
    if args.single_doc:
        batch.doc_ids.zero_()
    calls = local_attention_calls(batch, args.cp, args.mode, args.layout, args.ulysses, args.window)
    u = args.cp if args.mode == "ulysses" else (args.ulysses if args.mode.startswith("hybrid") else 1)
    # Per-rank heads after Ulysses' all-to-all (K/V heads replicated to lcm(kv_heads, u) when fewer).
    kv_total = args.kv_heads * (u // math.gcd(args.kv_heads, u) if args.kv_heads % u else 1)
    heads, kv = args.heads // u, kv_total // u
    rows = check_backend(args.backend, calls, heads, kv, args.head_dim, dtype, args.device, grad=not args.no_grad)
    worst = 0.0
    for row in rows:
        errs = {k: row[k] for k in ("out", "lse", "dq", "dk", "dv") if k in row}
        worst = max(worst, *errs.values())
        print(f"rank {row['rank']:>3} {row['what']:<28} " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print(f"{args.backend} vs reference, {len(rows)} calls, {args.dtype}: worst {worst:.2e} "
          f"({'OK' if worst <= tol else 'FAILED'}, tolerance {tol:.0e})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput side by side: longtrain vs Hugging Face transformers (SDPA + gradient checkpointing)
vs transformers + liger-kernel, on the Llama-3.2-1B shape (random init, bf16, AdamW) (issue 8).

One command runs every side, each (side, length, layout) in its own process so that memory and compile
caches do not leak between them, and prints one table:

    python benchmarks/throughput.py                        # GPU: 8K, 32K, 128K causal + packed docs at 32K
    python benchmarks/throughput.py --smoke                # CPU, tiny model: exercises every code path

Columns: tokens/s, MFU (longtrain/trainer/flops.py: 6N + attention, causal halved, documents counted as
masked; the same formula for every side, so a peer that attends across documents gets no credit for the
masked work), the ceiling (the MFU the measured matmul and attention speeds allow for the shape), MFU as a
share of the ceiling, peak memory, and the ratio of longtrain's tokens/s to each peer's.

Packed documents ("docs" layout): lengths drawn uniformly from 2K-16K tokens (fixed seed); longtrain
masks across documents (varlen/cuDNN per document); the peers get no document mask (as a user of plain
SDPA would run them) and compute the full causal square.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # random_init.py beside this script

from longtrain.model.args import ModelArgs, model_flavor  # noqa: E402
from random_init import init_random  # noqa: E402
from longtrain.trainer.flops import (ceiling_mfu, device_peak_flops, flops_per_token, measure_attention_flops,  # noqa: E402
                                     measure_matmul_flops, mfu)

SIDES = ("longtrain", "hf", "hf_liger")


@dataclass
class Result:
    side: str
    seq: int
    layout: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    ceiling: float | None = None
    peak_gib: float | None = None
    step_s: float | None = None
    error: str | None = None
    profile: dict | None = None  # share of GPU kernel time per category (--profile)


# Kernel-name patterns per category, first match wins (names as the CUDA profiler reports them).
PROFILE_CATEGORIES = (
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("norm/rope/swiglu (fused)", ("_rmsnorm", "_swiglu", "_rope")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "wgmma")),
    ("loss epilogue / elementwise", ("triton", "elementwise", "reduce", "softmax", "copy", "fill", "cat")),
)
_LAST_STEP: list = [None]


def profile_step(step) -> dict:
    """GPU kernel time of one training step by category (single GPU: no communication; data is synthetic)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        name = ev.key.lower()
        cat = next((c for c, keys in PROFILE_CATEGORIES if any(k in name for k in keys)), "other")
        totals[cat] = totals.get(cat, 0.0) + us
    all_us = sum(totals.values())
    out = {c: round(100 * t / all_us, 1) for c, t in sorted(totals.items(), key=lambda x: -x[1])}
    out["kernel_ms"] = round(all_us / 1e3, 1)
    return out


def doc_lengths(seq: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Document lengths uniform in [lo, hi] (scaled down for short sequences) summing exactly to seq."""
    rng = random.Random(seed)
    hi = min(hi, seq)
    lo = min(lo, max(1, hi // 4))
    lens: list[int] = []
    while sum(lens) < seq:
        lens.append(rng.randint(lo, hi))
    lens[-1] -= sum(lens) - seq
    if lens[-1] < 1:
        lens.pop()
        lens[-1] += seq - sum(lens)
    return lens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run_longtrain(margs: ModelArgs, seq: int, docs: list[int] | None, device: torch.device, dtype: torch.dtype,
                  steps: int, warmup: int, ac: str, fused: bool, compile_blocks: bool, attn: str) -> float:
    from longtrain.kernels.linear_cross_entropy import linear_cross_entropy
    from longtrain.kernels.attention import get_attention_backend
    from longtrain.model.decoder import Transformer
    from longtrain.parallel.activation_checkpoint import apply_ac

    with torch.device(device):
        model = Transformer(margs)
    model.to(dtype)
    init_random(model, margs.initializer_range)
    model.set_attention(get_attention_backend(attn))
    if fused:
        from longtrain.parallel.fused_kernels import apply_fused_kernels
        apply_fused_kernels(model)
    apply_ac(model, ac)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, margs.vocab_size, (1, seq), device=device)
    labels = torch.roll(ids, -1, dims=1)
    doc_ids = None
    if docs is not None:
        doc_ids = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs))[None].to(device)

    def step():
        h = model.hidden_states(ids, doc_ids=doc_ids)
        loss = linear_cross_entropy(h, model.output_weight, labels) / seq  # impl auto: triton on CUDA
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _LAST_STEP[0] = step
    return _timed_steps(step, device, steps, warmup)


def run_hf(margs: ModelArgs, seq: int, device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
           liger: bool) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.model.hf import hf_config

    if liger:
        if device.type != "cuda":
            raise NotImplementedError("liger-kernel needs a CUDA GPU")
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    cfg = LlamaConfig(**hf_config(margs, dtype), attn_implementation="sdpa")
    cfg.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    init_random(model, margs.initializer_range)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, margs.vocab_size, (1, seq), device=device)

    def step():
        out = model(input_ids=ids, labels=ids, use_cache=False)  # HF shifts the labels itself
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed_steps(step, device, steps, warmup)


def worker(a: argparse.Namespace) -> Result:
    """One (side, seq, layout) measurement in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    margs = model_flavor(a.model)
    docs = doc_lengths(a.seq, a.doc_min, a.doc_max) if a.layout == "docs" else None
    res = Result(a.side, a.seq, a.layout)
    torch.manual_seed(0)
    try:
        match a.side:
            case "longtrain":
                ac = a.ac if a.ac != "auto" else ("none" if a.seq <= 32768 else "selective")
                sec = run_longtrain(margs, a.seq, docs, device, dtype, a.steps, a.warmup, ac, not a.no_fused,
                                    a.compile, a.attn)
            case "hf" | "hf_liger":
                sec = run_hf(margs, a.seq, device, dtype, a.steps, a.warmup, a.side == "hf_liger")
            case other:
                raise ValueError(f"unknown side {other!r}; valid: {', '.join(SIDES)}")
    except torch.OutOfMemoryError as e:
        res.error = f"OOM: {str(e).splitlines()[0][:120]}"
        return res
    except (ImportError, NotImplementedError) as e:
        res.error = f"skipped: {str(e)[:120]}"
        return res
    if a.profile and device.type == "cuda" and a.side == "longtrain":
        res.profile = profile_step(_LAST_STEP[0])
    res.step_s = sec
    res.tokens_per_s = a.seq / sec
    peak = device_peak_flops(device)
    res.mfu = mfu(res.tokens_per_s, flops_per_token(margs, a.seq, docs), peak)
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if a.side == "longtrain" and peak is not None:
        from longtrain.kernels.attention import get_attention_backend
        torch.cuda.empty_cache()
        mm = measure_matmul_flops(margs, min(a.seq, 32768), device, dtype)
        at = measure_attention_flops(get_attention_backend(a.attn), margs, a.seq, device, dtype, docs, iters=3)
        res.ceiling = ceiling_mfu(margs, a.seq, mm, at, peak, docs)
    return res


def _fmt(x: float | None, spec: str) -> str:
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def print_table(results: list[Result]) -> None:
    by_key = {(r.side, r.seq, r.layout): r for r in results}
    ceilings = {(r.seq, r.layout): r.ceiling for r in results if r.ceiling is not None}
    print(f"\n{'side':<10} {'seq':>7} {'layout':<7} {'tok/s':>9} {'MFU':>6} {'ceil':>6} {'%ceil':>6} "
          f"{'GiB':>6} {'x hf':>6} {'x liger':>7}  note")
    for r in results:
        ceil = ceilings.get((r.seq, r.layout))
        share = None if (r.mfu is None or not ceil) else r.mfu / ceil
        ratios = []
        for peer in ("hf", "hf_liger"):
            p = by_key.get((peer, r.seq, r.layout))
            ok = r.side == "longtrain" and p is not None and p.tokens_per_s and r.tokens_per_s
            ratios.append(r.tokens_per_s / p.tokens_per_s if ok else None)
        print(f"{r.side:<10} {r.seq:>7} {r.layout:<7} {_fmt(r.tokens_per_s, '9.0f')} {_fmt(r.mfu and 100 * r.mfu, '6.1f')} "
              f"{_fmt(ceil and 100 * ceil, '6.1f')} {_fmt(share and 100 * share, '6.1f')} {_fmt(r.peak_gib, '6.1f')} "
              f"{_fmt(ratios[0], '6.2f')} {_fmt(ratios[1], '7.2f')}  {r.error or ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="longtrain vs transformers (+ liger) training throughput")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--docs-lengths", default="32768", help="lengths that also run the packed-documents case")
    p.add_argument("--model", default="llama3.2-1b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", default="auto", help="longtrain activation checkpointing: auto|none|selective|full")
    p.add_argument("--attn", default="auto", help="longtrain attention backend")
    p.add_argument("--no-fused", action="store_true", help="longtrain without the fused RMSNorm/RoPE/SwiGLU")
    p.add_argument("--compile", action="store_true", help="torch.compile each longtrain block")
    p.add_argument("--profile", action="store_true", help="longtrain: GPU kernel time by category, one step")
    p.add_argument("--doc-min", type=int, default=2048)
    p.add_argument("--doc-max", type=int, default=16384)
    p.add_argument("--timeout", type=int, default=900, help="seconds per side process")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, debug model, 64 tokens")
    p.add_argument("--inline", action="store_true", help="run every side in this process (tests; no isolation)")
    # internal: run one measurement in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layout", default="causal", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.lengths, a.docs_lengths, a.steps, a.warmup, a.doc_min, a.doc_max = "debug", "64", "64", 1, 1, 8, 32
    if a.worker:
        print("RESULT " + json.dumps(asdict(worker(a))), flush=True)
        return 0
    jobs = [(side, int(n), "causal") for n in a.lengths.split(",") for side in a.sides.split(",")]
    jobs += [(side, int(n), "docs") for n in a.docs_lengths.split(",") if n for side in a.sides.split(",")]
    results = []
    passthrough = ["--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup), "--ac", a.ac,
                   "--attn", a.attn, "--doc-min", str(a.doc_min), "--doc-max", str(a.doc_max)]
    passthrough += (["--no-fused"] if a.no_fused else []) + (["--compile"] if a.compile else [])
    passthrough += ["--profile"] if a.profile else []
    passthrough += ["--smoke"] if a.smoke else []
    for side, seq, layout in jobs:
        if a.inline:
            one = argparse.Namespace(**{**vars(a), "side": side, "seq": seq, "layout": layout})
            results.append(worker(one))
            continue
        cmd = [sys.executable, __file__, "--worker", "--side", side, "--seq", str(seq), "--layout", layout, *passthrough]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=os.environ.copy())
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            res = Result(**json.loads(line[-1][7:])) if line else Result(
                side, seq, layout, error=f"crashed rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        except subprocess.TimeoutExpired:
            res = Result(side, seq, layout, error=f"timeout after {a.timeout}s")
        print(f"{side} {seq} {layout}: {time.time() - t0:.0f}s {res}", flush=True)
        results.append(res)
    print_table(results)
    for r in results:
        if r.profile:
            print(f"profile {r.side} {r.seq} {r.layout}: {r.profile}")
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.error is None or r.error.startswith(("OOM", "skipped")) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Longest sequence one training step fits on one GPU: longtrain (memory switches) vs transformers (+ liger).

For each model shape (Llama-3.2-1B, Llama-3.2-3B; random init, bf16, AdamW) and each side, the length is
searched by doubling until a step fails (out of memory), then one 1.5x step between the last success and
the first failure. Every trial runs in a fresh subprocess, so an OOM does not poison the allocator of the
next one, and holds the optimizer states before its timed step (a warm-up step, or with --warmup 0 a
zero-gradient opt.step, creates them), so "fits" means a step of steady training fits. Sides:

    longtrain        all memory switches: chunked loss, activation checkpointing + offload to host,
                     sequence-tiled blocks; `--lt-switches auto` takes the cheapest setting that
                     `longtrain plan` predicts to fit and, on OOM, the next costlier one
    longtrain_plain  no switch: no checkpointing, full-logits loss (the "plain path")
    hf               transformers LlamaForCausalLM, SDPA + gradient checkpointing
    hf_liger         the same + liger-kernel (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)

The table gives the maximum tokens, the step time and peak memory at the maximum, MFU
(longtrain/trainer/flops.py, same formula for every side) and, for longtrain points, `longtrain plan`'s
predicted peak and its error. It also times longtrain (switches) at longtrain_plain's maximum, the step-time
ratio the issue bounds (<= 1.35x).

    python benchmarks/max_context.py                                  # H100: both shapes, all sides
    python benchmarks/max_context.py --flavors llama3.2-1b --sides longtrain --start 524288
    python benchmarks/max_context.py --flavors llama3.2-1b --sides hf,hf_liger --side-start hf=32768,hf_liger=262144
    python benchmarks/max_context.py --smoke                          # CPU, tiny model: the logic only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # random_init.py beside this script

SIDES = ("longtrain", "longtrain_plain", "hf", "hf_liger")
GIB = 1024**3


@dataclass
class Trial:
    side: str
    flavor: str
    seq: int
    ok: bool = False
    error: str | None = None  # "OOM: ...", "skipped: ...", "crashed ...", "timeout ..."
    step_s: float | None = None
    peak_gib: float | None = None  # device peak (CPU smoke: process peak RSS)
    mfu: float | None = None
    switches: str = ""  # longtrain: the memory switches used
    plan_gib: float | None = None  # longtrain: plan_memory's predicted total

    @property
    def oom(self) -> bool:
        return bool(self.error and self.error.startswith("OOM"))


def find_max_context(trial: Callable[[int], Trial], start: int, max_seq: int, align: int) -> tuple[Trial | None, list[Trial]]:
    """Longest passing length: doubling from `start` until a failure or `max_seq`, then one 1.5x step.

    Args:
        trial: runs one length, returns its Trial (ok or not).
        start: first length; max_seq: never try beyond it; align: lengths are multiples of this.

    Returns:
        (the longest passing Trial or None, every Trial run in order).
    """
    tried: list[Trial] = []
    best: Trial | None = None
    fail: int | None = None
    seq = start
    while seq <= max_seq:
        t = trial(seq)
        tried.append(t)
        if not t.ok:
            fail = seq
            break
        best = t
        seq *= 2
    if best is not None and fail is not None:
        mid = (int(best.seq * 1.5) // align) * align
        if best.seq < mid < fail:
            t = trial(mid)
            tried.append(t)
            if t.ok:
                best = t
    return best, tried


# ---- one trial, in this process -------------------------------------------------------------------------

def _apply_switches(model, switches: dict, smoke: bool) -> None:
    from longtrain.kernels.tiled_mlp import apply_tiled_mlp
    from longtrain.parallel.activation_checkpoint import apply_ac

    seq_tile = switches.get("seq_tile")
    if switches.get("tiled_mlp") and seq_tile is None:
        apply_tiled_mlp(model, 16 if smoke else None)
    apply_ac(model, switches.get("ac_mode", "none"), offload=switches.get("offload", False),
             offload_min_bytes=0 if smoke else 1 << 20, seq_tile=(8 if smoke else seq_tile) if seq_tile else None)


def run_trial(a: argparse.Namespace) -> Trial:
    import torch

    from longtrain.model.args import model_flavor
    from longtrain.trainer.flops import device_peak_flops, flops_per_token, mfu

    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    margs = model_flavor(a.flavor)
    res = Trial(a.side, a.flavor, a.seq)
    torch.manual_seed(0)
    ids = torch.randint(0, margs.vocab_size, (1, a.seq), device=device)
    try:
        match a.side:
            case "longtrain" | "longtrain_plain":
                step = _longtrain_step(a, margs, ids, device, dtype, res)
            case "hf" | "hf_liger":
                step = _hf_step(a, margs, ids, device, dtype)
            case other:
                raise ValueError(f"unknown side {other!r}; valid: {', '.join(SIDES)}")
        if a.warmup == 0:  # a step of steady training holds the optimizer states: create them first
            _create_optimizer_states(step.optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(a.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        res.step_s = (time.perf_counter() - t0) / a.steps
    except torch.OutOfMemoryError as e:
        res.error = f"OOM: {str(e).splitlines()[0][:100]}"
        return res
    except (ImportError, NotImplementedError) as e:
        res.error = f"skipped: {str(e).splitlines()[0][:100]}"
        return res
    res.ok = True
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    else:
        res.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    res.mfu = mfu(a.seq / res.step_s, flops_per_token(margs, a.seq), device_peak_flops(device))
    return res


def _create_optimizer_states(opt) -> None:
    """Let AdamW create its moments now (a zero-gradient step), so one timed step measures the steady-state peak.

    torch creates the states inside the first opt.step(), after that step's backward: a first step alone
    would peak without them (2 moments x parameters: 4.6 GiB at 1B, 12 GiB at 3B in bf16).
    """
    import torch

    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _longtrain_step(a, margs, ids, device, dtype, res: Trial):
    import torch
    from random_init import init_random

    from longtrain.kernels.attention import get_attention_backend
    from longtrain.kernels.attention_auto import dense_choice_here
    from longtrain.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
    from longtrain.model.decoder import Transformer
    from longtrain.plan import ATTENTION_BACKENDS, plan_memory

    with torch.device(device):
        model = Transformer(margs)
    model.to(dtype)
    init_random(model, margs.initializer_range)
    model.set_attention(get_attention_backend(a.attn))
    if a.fused:  # before the memory switches: they wrap whatever forward the modules then have
        from longtrain.parallel.fused_kernels import apply_fused_kernels

        apply_fused_kernels(model)
    plain = a.side == "longtrain_plain"
    switches = {} if plain else json.loads(a.switches)
    if not plain:
        _apply_switches(model, switches, a.smoke)
    res.switches = "plain" if plain else a.switch_label
    dt = "float32" if dtype == torch.float32 else "bfloat16"
    if a.attn in ATTENTION_BACKENDS:  # the plan does not model flex / reference (the smoke run's): no plan then
        res.plan_gib = plan_memory(margs, a.seq, dtype=dt, loss_chunk=None if plain else 2048, fused_kernels=a.fused,
                                   loss_impl=a.loss_impl, steady_state=True,
                                   attention=dense_choice_here(a.attn, margs.head_dim), **switches).total / GIB
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    labels = torch.roll(ids, -1, dims=1)

    def step():
        h = model.hidden_states(ids)
        if plain:
            loss = linear_cross_entropy_reference(h.reshape(-1, h.shape[-1]), model.output_weight, labels.reshape(-1))
        else:
            loss = linear_cross_entropy(h, model.output_weight, labels, impl=a.loss_impl)
        (loss / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    return step


def _hf_step(a, margs, ids, device, dtype):
    import torch
    from random_init import init_random
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.model.hf import hf_config

    if a.side == "hf_liger":
        if device.type != "cuda":
            raise NotImplementedError("liger-kernel needs a CUDA GPU")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    cfg = LlamaConfig(**hf_config(margs, dtype), attn_implementation="sdpa")
    cfg.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    init_random(model, margs.initializer_range)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # HF shifts the labels itself
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    return step


# ---- driver ---------------------------------------------------------------------------------------------

def _spawn(a: argparse.Namespace, side: str, flavor: str, seq: int, switches: tuple[str, dict] | None) -> Trial:
    cmd = [sys.executable, __file__, "--trial", "--side", side, "--flavors", flavor, "--seq", str(seq),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--attn", a.attn, "--loss-impl", a.loss_impl]
    cmd += ["--fused"] if a.fused else []
    if switches is not None:
        cmd += ["--switch-label", switches[0], "--switches", json.dumps(switches[1])]
    cmd += ["--smoke"] if a.smoke else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return Trial(side, flavor, seq, error=f"timeout after {a.timeout}s")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        return Trial(**json.loads(lines[-1][len("RESULT "):]))
    tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    # A CUDA OOM can also kill the process outright (host OOM, allocator abort): report it as OOM.
    kind = "OOM" if "out of memory" in proc.stderr.lower() or proc.returncode == -9 else "crashed"
    return Trial(side, flavor, seq, error=f"{kind}: rc={proc.returncode} {tail[0][:100]}")


def _longtrain_trial(a: argparse.Namespace, flavor: str, seq: int) -> Trial:
    """Cheapest switch set predicted to fit first; on OOM the next costlier ones (each in a fresh process)."""
    from longtrain.kernels.attention_auto import dense_choice_here
    from longtrain.model.args import model_flavor
    from longtrain.plan import ATTENTION_BACKENDS, SWITCH_LADDER, plan_memory

    # Cheapest first. Parameter offload needs the trainer's engine (recipes/gpu-8b-offload.yaml with
    # benchmarks/one_gpu_8b.sh): this benchmark's hand-built step keeps the model states on the GPU.
    ladder = [rung for rung in SWITCH_LADDER if not rung[1].get("offload_params")]
    if a.lt_switches == "all":
        ladder = ladder[-1:]
    elif a.attn in ATTENTION_BACKENDS:  # otherwise no plan: the ladder is tried from its cheapest setting
        margs = model_flavor(flavor)
        dt = "float32" if a.smoke else "bfloat16"
        attention = dense_choice_here(a.attn, margs.head_dim)
        fits = [i for i, (_, sw) in enumerate(ladder)
                if plan_memory(margs, seq, dtype=dt, fused_kernels=a.fused, loss_impl=a.loss_impl,
                               steady_state=True, attention=attention, **sw).fits(int(a.gpu_memory_gib * GIB))]
        ladder = ladder[fits[0]:] if fits else ladder[-1:]
    t = Trial("longtrain", flavor, seq, error="no switch set tried")
    for sw in ladder:
        t = _spawn(a, "longtrain", flavor, seq, sw)
        if t.ok or not t.oom:
            return t
    return t


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[tuple[str, str, Trial | None, list[Trial]]], ratio_rows: list[str]) -> None:
    print(f"\n{'flavor':<12} {'side':<16} {'max tokens':>11} {'step s':>8} {'peak GiB':>9} {'MFU %':>6} "
          f"{'plan GiB':>9} {'plan err':>9}  switches / first failure")
    for flavor, side, best, tried in rows:
        fail = next((t for t in tried if not t.ok), None)
        err = None
        if best is not None and best.plan_gib and best.peak_gib:
            err = 100 * (best.plan_gib - best.peak_gib) / best.peak_gib
        note = (best.switches if best else "") + (f" | {fail.seq}: {fail.error}" if fail else "")
        print(f"{flavor:<12} {side:<16} {_fmt(best and best.seq, '11,d')} {_fmt(best and best.step_s, '8.2f')} "
              f"{_fmt(best and best.peak_gib, '9.2f')} {_fmt(best and best.mfu and 100 * best.mfu, '6.1f')} "
              f"{_fmt(best and best.plan_gib, '9.2f')} {(_fmt(err, '+8.1f') + '%') if err is not None else format('-', '>9')}  {note}")
    for line in ratio_rows:
        print(line)


def _parse_side_start(text: str) -> dict[str, int]:
    """'hf=32768,hf_liger=262144' -> {side: first length}; a clear error for an unknown side or a bad number."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        side, _, value = item.partition("=")
        if side not in SIDES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--side-start {item!r}: expected SIDE=N with SIDE one of {', '.join(SIDES)} "
                             f"and N a positive token count")
        out[side] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavors", default="llama3.2-1b,llama3.2-3b")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--start", type=int, default=16384, help="first length of the search")
    p.add_argument("--side-start", default="", metavar="SIDE=N,...",
                   help="first length per side (e.g. hf_liger=262144), where a side's range is known")
    p.add_argument("--max-seq", type=int, default=4 * 1024 * 1024, help="longest length tried")
    p.add_argument("--align", type=int, default=1024, help="lengths are multiples of this")
    p.add_argument("--steps", type=int, default=1, help="timed steps per trial")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trial (allocator and kernels warm)")
    p.add_argument("--attn", default="auto", help="longtrain attention backend (kernels/attention.py)")
    p.add_argument("--loss-impl", default="auto", choices=("auto", "torch", "compile", "triton"),
                   help="linear_cross_entropy impl (auto: triton on CUDA)")
    p.add_argument("--fused", action="store_true", help="longtrain sides: fused Triton RMSNorm/RoPE/SwiGLU")
    p.add_argument("--lt-switches", default="auto", choices=("auto", "all"),
                   help="auto: cheapest setting predicted to fit, costlier on OOM; all: every switch")
    p.add_argument("--gpu-memory-gib", type=float, default=79.0, help="memory budget for the plan-based choice")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per trial process")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, debug model, lengths 32-64: the logic only")
    # internal: one trial in this process
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--switches", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--switch-label", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.flavors, a.start, a.align, a.attn, a.gpu_memory_gib = "debug", 32, 8, "reference", 80.0
        a.max_seq = min(a.max_seq, 64)
        a.lt_switches = "all"
    if a.trial:
        a.flavor = a.flavors
        print("RESULT " + json.dumps(asdict(run_trial(a))), flush=True)
        return 0
    side_start = _parse_side_start(a.side_start)
    rows, ratio_rows, every = [], [], []
    for flavor in a.flavors.split(","):
        best_by_side: dict[str, Trial | None] = {}
        for side in a.sides.split(","):
            if side not in SIDES:
                raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")

            def trial(seq: int, side=side, flavor=flavor) -> Trial:
                t0 = time.time()
                t = _longtrain_trial(a, flavor, seq) if side == "longtrain" else _spawn(a, side, flavor, seq, None)
                print(f"  {flavor} {side} {seq}: {'ok' if t.ok else t.error} ({time.time() - t0:.0f}s) "
                      f"step {_fmt(t.step_s, '.2f')}s peak {_fmt(t.peak_gib, '.2f')} GiB", flush=True)
                return t

            best, tried = find_max_context(trial, side_start.get(side, a.start), a.max_seq, a.align)
            rows.append((flavor, side, best, tried))
            every += tried
            best_by_side[side] = best
        lt, plain = best_by_side.get("longtrain"), best_by_side.get("longtrain_plain")
        if lt is not None and plain is not None:
            at_plain = _longtrain_trial(a, flavor, plain.seq)
            every.append(at_plain)
            ratio = at_plain.step_s / plain.step_s if at_plain.ok and plain.step_s else None
            ratio_rows.append(f"{flavor}: at {plain.seq:,} tokens (plain maximum) longtrain[{at_plain.switches}] "
                              f"{_fmt(at_plain.step_s, '.2f')} s vs plain {plain.step_s:.2f} s: "
                              f"{_fmt(ratio, '.2f')}x; max tokens {lt.seq:,} vs {plain.seq:,} "
                              f"({lt.seq / plain.seq:.1f}x)")
    print_table(rows, ratio_rows)
    if a.json:
        a.json.write_text(json.dumps([asdict(t) for t in every], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

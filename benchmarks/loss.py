"""Output projection + cross-entropy, fwd+bwd: longtrain's chunked kernel vs Liger's and the full-logits path.

At the Llama-3.2-1B shapes (dim 2048, vocabulary 128256, bf16), for each token count: time of loss forward
+ backward (hidden and weight gradients), the peak memory it adds, and the relative L2 error of the loss and
both gradients against an fp32 full-logits reference (at the shortest length; fp32 logits of longer ones
would not fit). Sides:

    longtrain          kernels.linear_cross_entropy, impl auto (on CUDA: the Triton epilogue that overwrites
                       the logits with their gradient; each chunk's weight gradient accumulated into fp32 by
                       the GEMM itself)
    longtrain_compile  impl compile: the torch.compile'd epilogue (fp32 view, separate gradient buffer)
    longtrain_sep_dw   impl compile with the weight gradient as separate bf16 product + fp32 cast + add
                       (the kernel before 2026-11-27): what the in-GEMM accumulation saves
    liger              liger_kernel's LigerFusedLinearCrossEntropyFunction (if installed)
    torch_full         F.linear to bf16 logits, F.cross_entropy in fp32 (what a plain model does)

    python benchmarks/loss.py                         # GPU: 8K and 32K tokens
    python benchmarks/loss.py --smoke                 # CPU, tiny shapes: the logic only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longtrain.kernels import linear_cross_entropy as lce  # noqa: E402
from longtrain.trainer.flops import median_seconds  # noqa: E402

SIDES = ("longtrain", "longtrain_compile", "longtrain_sep_dw", "liger", "torch_full")


def _separate_dw(dw: torch.Tensor, dl: torch.Tensor, h: torch.Tensor) -> None:
    dw += (dl.t() @ h).float()  # bf16 product, fp32 copy, add: three passes over (vocab, dim)


def loss_fn(side: str):
    """(hidden (n, dim), weight (V, dim), labels (n,)) -> summed fp32 loss, for one side."""
    match side:
        case "longtrain":
            return lambda h, w, y: lce.linear_cross_entropy(h, w, y)
        case "longtrain_compile" | "longtrain_sep_dw":
            impl = "compile" if torch.cuda.is_available() else "torch"  # CPU smoke: eager
            return lambda h, w, y: lce.linear_cross_entropy(h, w, y, impl=impl)
        case "liger":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def liger(h, w, y):
                out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "sum")
                return out[0] if isinstance(out, tuple) else out
            return liger
        case "torch_full":
            return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
        case _:
            raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")


def run_side(side: str, h0: torch.Tensor, w0: torch.Tensor, y: torch.Tensor, iters: int,
             ref: tuple[torch.Tensor, ...] | None) -> dict:
    device = h0.device
    row: dict = {"side": side, "tokens": h0.shape[0]}
    try:
        fn = loss_fn(side)
    except ImportError as e:
        return row | {"skip": f"not installed ({e.name})"}
    saved = lce._accumulate_weight_grad
    if side == "longtrain_sep_dw":
        lce._accumulate_weight_grad = _separate_dw
    try:
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()

        def step():
            loss = fn(h, w, y)
            gh, gw = torch.autograd.grad(loss, (h, w))
            return loss, gh, gw

        out = step()  # compile / autotune outside the timing
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        row["ms"] = median_seconds(step, device, iters, 2) * 1e3
        if device.type == "cuda":
            row["extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        if ref is not None:
            rel = lambda a, b: float((a.detach().float() - b).norm() / b.norm())  # noqa: E731
            row.update(loss_err=rel(out[0], ref[0]), dh_err=rel(out[1], ref[1]), dw_err=rel(out[2], ref[2]))
    except torch.OutOfMemoryError:
        row["skip"] = "out of memory"
    finally:
        lce._accumulate_weight_grad = saved
    return row


def fp32_reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    loss = lce.linear_cross_entropy_reference(hf, wf, y)
    gh, gw = torch.autograd.grad(loss, (hf, wf))
    return loss.detach(), gh, gw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="8192,32768")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    a = p.parse_args(argv)
    if a.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        a.tokens, a.dim, a.vocab, a.iters, a.sides = "96", 32, 500, 2, "longtrain,longtrain_compile,longtrain_sep_dw,torch_full"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/loss.py needs a CUDA GPU (or --smoke on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"{'side':<17} {'tokens':>7} {'ms':>8} {'extra GiB':>9} {'loss err':>9} {'dh err':>9} {'dw err':>9}  note")
    for i, n in enumerate(int(x) for x in a.tokens.split(",")):
        g = torch.Generator(device="cpu").manual_seed(n)
        h = torch.randn(n, a.dim, generator=g).to(device, dtype)
        w = (torch.randn(a.vocab, a.dim, generator=g) * 0.02).to(device, dtype)
        y = torch.randint(0, a.vocab, (n,), generator=g).to(device)
        ref = fp32_reference(h, w, y) if i == 0 else None
        for side in a.sides.split(","):
            r = run_side(side, h, w, y, a.iters, ref)
            f = lambda k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
            print(f"{side:<17} {n:>7} {f('ms', '8.2f'):>8} {f('extra_gib', '9.2f'):>9} {f('loss_err', '9.1e'):>9} "
                  f"{f('dh_err', '9.1e'):>9} {f('dw_err', '9.1e'):>9}  {r.get('skip', '')}", flush=True)
        del ref
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

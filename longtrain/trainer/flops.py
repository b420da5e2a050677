"""FLOPs per token, device peaks, MFU and the MFU ceiling one GPU allows for a shape.

One formula for every side of a benchmark and for the trainer's log line:

    flops/token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * context

N_matmul counts the weights that take part in a matrix product per token (attention and MLP
projections of every layer plus the output projection; the embedding lookup is not a matmul, norms are
negligible). 6 = 2 (multiply-add) x 3 (forward, backward for activations, backward for weights)
(Kaplan et al. 2020, arXiv:2001.08361; PaLM appendix B, arXiv:2204.02311). The attention term is
QK^T and PV: 2 matmuls x 2 FLOPs x 3 passes = 12 per layer, head channel and visible key. `context`
is the average number of keys a query sees: the sequence length without a mask, half of it causal,
and for packed documents sum(L_d^2) / (2 * seq_len) because cross-document blocks are masked and
skipped by a document-aware kernel (so they are not useful work, whatever a peer spends on them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from longtrain.kernels.attention import AttnMask
from longtrain.model.args import ModelArgs

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, keyed by a substring of
# torch.cuda.get_device_name(). Order matters: the first match wins, so specific names come first.
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def matmul_params(args: ModelArgs) -> int:
    """Weights used in a matrix product once per token: all layer projections plus the output head."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    mlp = 3 * args.dim * args.intermediate_size
    return args.n_layers * (attn + mlp) + args.vocab_size * args.dim


def attention_context(seq_len: int, doc_lens: Sequence[int] | None = None, causal: bool = True,
                      window: int | None = None) -> float:
    """Average number of keys one query attends to (the `context` of the module docstring).

    Args:
        seq_len: tokens per sequence.
        doc_lens: lengths of the packed documents (must sum to seq_len); None: one document.
        causal: causal attention counts half of each document's square.
        window: sliding window (Mistral); a query sees at most `window` keys.

    Returns:
        Keys per query, averaged over the sequence.

    Raises:
        ValueError: seq_len < 1, or doc_lens do not sum to seq_len or hold a length < 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lens = [seq_len] if doc_lens is None else [int(n) for n in doc_lens]
    if sum(lens) != seq_len or min(lens) < 1:
        raise ValueError(f"doc_lens must be positive and sum to seq_len={seq_len}, got {lens}")
    total = 0.0
    for n in lens:
        w = n if window is None else min(window, n)
        # Causal with window w over n tokens: n*w - w^2/2 visible pairs (= n^2/2 when w = n).
        total += (n * w - w * w / 2) if causal else n * w
    return total / seq_len


def flops_per_token(args: ModelArgs, seq_len: int, doc_lens: Sequence[int] | None = None,
                    causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token: 6 * N_matmul plus attention.

    Args:
        args: the model shape.
        seq_len: tokens per sequence.
        doc_lens: packed document lengths (sum = seq_len); masked cross-document attention is not counted.
        causal: halve the attention term (causal LM).

    Returns:
        FLOPs per trained token.

    Raises:
        ValueError: see `attention_context`.
    """
    ctx = attention_context(seq_len, doc_lens, causal, args.sliding_window)
    return 6.0 * matmul_params(args) + 12.0 * args.n_layers * args.n_heads * args.head_dim * ctx


def device_peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of `device`; None for CPU or a GPU not in the table (MFU is then unknown).

    Raises:
        ValueError: an unknown device type.
    """
    device = torch.device(device)
    match device.type:
        case "cpu" | "mps":
            return None
        case "cuda":
            name = torch.cuda.get_device_name(device)
            return peak_flops_by_name(name)
        case other:
            raise ValueError(f"unknown device type {other!r}; valid: cpu, mps, cuda")


def peak_flops_by_name(name: str) -> float | None:
    """Dense bf16 peak for a device name such as "NVIDIA H100 80GB HBM3"; None when not in the table."""
    for key, peak in _PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (per device: pass that device's tokens/s); None without a peak."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_tok / peak_flops


def ceiling_mfu(args: ModelArgs, seq_len: int, matmul_flops_s: float, attn_flops_s: float,
                peak_flops: float, doc_lens: Sequence[int] | None = None, causal: bool = True) -> float:
    """The MFU this GPU allows for the shape if every matmul and attention ran at its measured speed.

    Time per token = matmul FLOPs / measured matmul rate + attention FLOPs / measured attention rate
    (norms, loss, optimizer taken as free), so a run at this MFU wastes nothing outside the kernels.

    Args:
        args: the model shape.
        seq_len: tokens per sequence.
        matmul_flops_s: measured bf16 FLOP/s of the model's projection matmuls (see `measure_matmul_flops`).
        attn_flops_s: measured FLOP/s of the best attention kernel, fwd+bwd, counted with the same
            masked-FLOPs rule as `flops_per_token` (useful FLOPs per second).
        peak_flops: the device's dense peak.
        doc_lens, causal: as in `flops_per_token`.

    Returns:
        Ceiling MFU in [0, 1].

    Raises:
        ValueError: a non-positive rate.
    """
    if min(matmul_flops_s, attn_flops_s, peak_flops) <= 0:
        raise ValueError(f"rates must be > 0, got matmul={matmul_flops_s}, attn={attn_flops_s}, peak={peak_flops}")
    mm = 6.0 * matmul_params(args)
    attn = flops_per_token(args, seq_len, doc_lens, causal) - mm
    t = mm / matmul_flops_s + attn / attn_flops_s  # seconds per token
    return (mm + attn) / t / peak_flops


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of fn() over `iters` runs after `warmup` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_matmul_flops(args: ModelArgs, tokens: int, device: torch.device | str, dtype: torch.dtype,
                         iters: int = 10, warmup: int = 3) -> float:
    """FLOP/s of the model's projection matmuls (fwd + both bwd products) at `tokens` rows, on random data.

    Returns:
        Measured FLOP/s, weighting each projection shape by its share of the model's matmul FLOPs.
    """
    device = torch.device(device)
    L = args.n_layers
    # (in, out, how many per model): q, kv, o, gate+up, down per layer; the output head once.
    shapes = [(args.dim, args.n_heads * args.head_dim, L), (args.dim, 2 * args.n_kv_heads * args.head_dim, L),
              (args.n_heads * args.head_dim, args.dim, L), (args.dim, 2 * args.intermediate_size, L),
              (args.intermediate_size, args.dim, L), (args.dim, args.vocab_size, 1)]
    total_flops, total_s = 0.0, 0.0
    for k, n, count in shapes:
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        g = torch.randn(tokens, n, device=device, dtype=dtype)

        def step(x=x, w=w, g=g):
            x @ w.t()  # forward (tokens, n)
            g @ w  # grad of the activations (tokens, k)
            g.t() @ x  # grad of the weight (n, k)

        total_s += median_seconds(step, device, iters, warmup) * count
        total_flops += 6.0 * tokens * k * n * count
    return total_flops / total_s


def measure_attention_flops(attn_fn: Callable, args: ModelArgs, seq_len: int, device: torch.device | str,
                            dtype: torch.dtype, doc_lens: Sequence[int] | None = None, iters: int = 5,
                            warmup: int = 2) -> float:
    """Useful FLOP/s of `attn_fn` fwd+bwd for one layer of the shape (masked pairs not counted).

    Args:
        attn_fn: an AttentionFn (kernels/attention.py).
        args, seq_len, doc_lens: the shape; documents become the mask's doc ids.
        device, dtype: where and in what precision to run.

    Returns:
        12 * n_heads * head_dim * visible pairs / measured seconds.
    """
    device = torch.device(device)
    doc = None
    if doc_lens is not None:
        doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(list(doc_lens)))[None].to(device)
    mask = AttnMask.causal(1, seq_len, device, doc, args.sliding_window)
    q = torch.randn(1, seq_len, args.n_heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq_len, args.n_kv_heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    scale = args.head_dim ** -0.5

    def step():
        out, _ = attn_fn(q, k, v, mask, scale)
        torch.autograd.grad(out, (q, k, v), dout)

    sec = median_seconds(step, device, iters, warmup)
    pairs = attention_context(seq_len, doc_lens, True, args.sliding_window) * seq_len
    return 12.0 * args.n_heads * args.head_dim * pairs / sec


def measure_ceiling(args: ModelArgs, seq_len: int, attn_fn: Callable, device: torch.device | str,
                    dtype: torch.dtype, peak_flops: float | None = None) -> tuple[float, float, float] | None:
    """(ceiling MFU, matmul FLOP/s, attention FLOP/s) for a causal sequence of `seq_len`, measured here.

    The rates are measured at bounded sizes, so that the measurement takes seconds and little memory whatever
    the stage's length: the matmuls at min(seq_len, 8192) rows (cuBLAS is at its speed there), attention at
    min(seq_len, 32768) tokens (flash kernels' rate is flat beyond: 469 vs 462 TFLOP/s at 32K / 128K on the
    H100, docs/benchmarks.md); the ceiling is then computed for the full length.

    Returns:
        None where the device's peak is unknown (CPU, a GPU not in the table) and `peak_flops` is not given.
    """
    peak = peak_flops if peak_flops is not None else device_peak_flops(device)
    if peak is None:
        return None
    mm = measure_matmul_flops(args, min(seq_len, 8192), device, dtype)
    attn = measure_attention_flops(attn_fn, args, min(seq_len, 32768), device, dtype)
    return ceiling_mfu(args, seq_len, mm, attn, peak), mm, attn

"""Torch's fused attention kernels (flash-attention 2 and cuDNN) behind the backend interface.

`F.scaled_dot_product_attention` hides the log-sum-exp that context parallelism needs, so these call the
aten ops underneath it (PITFALLS.md):

- `sdpa_flash`: `aten._flash_attention_forward/_backward`, PyTorch's vendored flash-attention 2 (Dao,
  arXiv:2307.08691). Layout (bs, s, h, d) as ours, native GQA, sliding windows, and packed documents as
  one variable-length call over `cu_seqlens` (the flattened batch): no padding, no per-document launches.
- `sdpa_cudnn`: `aten._scaled_dot_product_cudnn_attention[_backward]`, cuDNN's fused attention (often the
  fastest on Hopper for dense causal). Packed documents: one call per document (cuDNN's ragged mode is not
  exposed with a backward through these ops); launch cost is small against 2K+ token documents.

Both are `torch.autograd.Function`s whose backward is the fused backward kernel. Both accept the layouts
of attention_layout.py: causal, full, empty (and varlen for documents); anything else raises
NotImplementedError naming `flex`.

The LSE is differentiable: a gradient on the LSE (ring attention merges partial results with it) is folded
into the fused backward. The backward kernels compute D_i = dO_i . O_i and then dS = P * (dP - D); the LSE
adds dlse_i * P_ij to dS, i.e. replaces D_i with D_i - dlse_i. We pass O'_i = O_i - dlse_i dO_i / |dO_i|^2
as the output, whose dot with dO_i is exactly that. Under an LSE merge dlse_i = w dO_i . (O_i - O_merged),
so O' stays bounded (it equals the merged output up to rounding: the ring-flash-attention identity) and a
row with dO_i = 0 has dlse_i = 0. A row with dO_i = 0 but dlse_i != 0 cannot be expressed this way; its LSE
gradient is dropped (only possible when the LSE feeds the loss directly, never in an LSE merge).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.kernels.attention_base import AttnMask
from longtrain.kernels.attention_layout import Layout, classify

# cuDNN takes fewer K/V heads than Q heads (GQA) natively (benchmarks/attention.py --check on an H100;
# docs/benchmarks.md, "Attention backends"). Set False to repeat K/V heads for builds whose cuDNN refuses
# it. flash-attention 2 handles GQA natively.
CUDNN_NATIVE_GQA = True


def _check_inputs(name: str, q: Tensor, k: Tensor) -> None:
    if q.device.type != "cuda":
        raise NotImplementedError(f"attention backend {name!r} needs a CUDA GPU (got {q.device}); "
                                  "on CPU use 'flex' or 'reference'")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"attention backend {name!r} takes float16/bfloat16, got {q.dtype}; "
                                  "use 'flex' or 'reference' for float32")
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        raise NotImplementedError(f"attention backend {name!r} takes head_dim a multiple of 8 up to 256, "
                                  f"got {q.shape[-1]}")


def _out_for_backward(out: Tensor, dout: Tensor, dlse: Tensor | None) -> Tensor:
    """O' with dO . O' = dO . O - dlse (module docstring). out, dout (bs, s, h, d); dlse (bs, h, s)."""
    if dlse is None:
        return out
    dlse = dlse.transpose(1, 2).unsqueeze(-1).float()  # (bs, s, h, 1)
    d2 = dout.float().pow(2).sum(-1, keepdim=True)  # (bs, s, h, 1)
    coef = torch.where(d2 > 0, dlse / d2.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(d2))
    return (out.float() - coef * dout.float()).to(out.dtype)


def _empty(q: Tensor) -> tuple[Tensor, Tensor]:
    """A block where no query sees a key: out 0, lse -inf (the LSE merge then ignores it)."""
    # Kept in q's graph (zero gradient) so that autograd.grad over (out, lse) works as for any block.
    zero = q.float().sum(-1).transpose(1, 2) * 0.0  # (bs, h, s)
    return q * 0.0, zero + float("-inf")


def _windows(window: int | None, causal: bool) -> tuple[int | None, int | None]:
    """flash-attention's (left, right) window: key j visible iff i - left <= j <= i + right."""
    if window is None:
        return None, None
    return window - 1, 0 if causal else None


class _FlashAttention(torch.autograd.Function):
    """flash-attention 2 through aten; dense (cu_seqlens None) or variable-length over the flattened batch."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, max_seqlen: int,
                causal: bool, scale: float, window: int | None) -> tuple[Tensor, Tensor]:
        bs, sq, h, d = q.shape
        sk = k.shape[1]
        left, right = _windows(window, causal)
        if cu_seqlens is None:
            qf, kf, vf, max_q, max_k = q.contiguous(), k.contiguous(), v.contiguous(), sq, sk
        else:
            # (bs * s, h, d): documents are segments of the flattened batch.
            qf, kf, vf = q.reshape(bs * sq, h, d), k.reshape(bs * sk, -1, d), v.reshape(bs * sk, -1, d)
            max_q = max_k = max_seqlen
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            qf, kf, vf, cu_seqlens, cu_seqlens, max_q, max_k, 0.0, causal, False, scale=scale,
            window_size_left=left, window_size_right=right)
        if cu_seqlens is not None:
            out = out.view(bs, sq, h, d)
            # Variable-length LSE is (h, total) ("unpadded", flash-attention >= 2.5).
            assert lse.shape == (h, bs * sq), f"unexpected varlen LSE shape {tuple(lse.shape)}"
            lse = lse.view(h, bs, sq).transpose(0, 1)  # (bs, h, sq)
        ctx.save_for_backward(qf, kf, vf, out, lse, cu_seqlens, rng_state, unused)
        ctx.args = (bs, sq, max_q, max_k, causal, scale, left, right)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        qf, kf, vf, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        bs, sq, max_q, max_k, causal, scale, left, right = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        out_b = _out_for_backward(out, dout, dlse)
        lse_k = lse
        if cu_seqlens is not None:
            h, d = out.shape[2], out.shape[3]
            dout, out_b = dout.reshape(bs * sq, h, d), out_b.reshape(bs * sq, h, d)
            lse_k = lse.transpose(0, 1).reshape(h, bs * sq).contiguous()  # back to (h, total)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), qf, kf, vf, out_b.contiguous(), lse_k, cu_seqlens, cu_seqlens, max_q, max_k,
            0.0, causal, rng_state, unused, scale=scale, window_size_left=left, window_size_right=right)
        if cu_seqlens is not None:
            dq, dk, dv = dq.view(bs, sq, *dq.shape[1:]), dk.view(bs, -1, *dk.shape[1:]), dv.view(bs, -1, *dv.shape[1:])
        return dq, dk, dv, None, None, None, None, None


class _CudnnAttention(torch.autograd.Function):
    """cuDNN fused attention through aten, dense causal or non-causal; (bs, s, h, d) in and out."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        bs, sq, h, d = q.shape
        rep = 1 if CUDNN_NATIVE_GQA else h // k.shape[2]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (bs, sk, h, d)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bs, h, s, d) views
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, causal, False, scale=scale)
        ctx.lse_shape = lse.shape  # some cuDNN versions return (bs, h, sq, 1)
        lse = lse.reshape(bs, h, sq)
        ctx.save_for_backward(qt, kt, vt, out, lse, cu_q, cu_k, seed, offset)
        ctx.args = (max_q, max_k, causal, scale, rep)
        ctx.set_materialize_grads(False)
        return out.transpose(1, 2), lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        qt, kt, vt, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
        max_q, max_k, causal, scale, rep = ctx.args
        out_bshd = out.transpose(1, 2)  # (bs, s, h, d)
        if dout is None:
            dout = torch.zeros_like(out_bshd)
        # cuDNN wants dO (and O') with O's strides.
        dout_t = torch.empty_like(out).copy_(dout.transpose(1, 2))  # (bs, h, s, d)
        out_b = out if dlse is None else torch.empty_like(out).copy_(
            _out_for_backward(out_bshd, dout, dlse).transpose(1, 2))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout_t, qt, kt, vt, out_b, lse.reshape(ctx.lse_shape), seed, offset, None, cu_q, cu_k,
            max_q, max_k, 0.0, causal, scale=scale)
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)  # (bs, s, h, d)
        if rep > 1:
            bs, sk, h, d = dk.shape
            dk = dk.reshape(bs, sk, h // rep, rep, d).sum(3)  # (bs, sk, n_kv_heads, d)
            dv = dv.reshape(bs, sk, h // rep, rep, d).sum(3)
        return dq, dk, dv, None, None


def _reject(name: str, layout: Layout) -> None:
    raise NotImplementedError(f"attention backend {name!r} cannot take this mask ({layout.reason}); "
                              "use 'flex' (or 'reference') for it")


def attention_sdpa_flash(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """flash-attention 2 (aten): causal / full / empty blocks, windows on full sequences, packed documents
    as one variable-length call. See the module docstring for layouts and the LSE gradient.

    Raises:
        NotImplementedError: not CUDA, not fp16/bf16, head_dim unsupported, or a `general` mask.
    """
    _check_inputs("sdpa_flash", q, k)
    layout = classify(mask, q.shape[1], k.shape[1])
    match layout.kind:
        case "empty":
            return _empty(q)
        case "causal" | "full":
            return _FlashAttention.apply(q, k, v, None, 0, layout.kind == "causal", scale, mask.window)
        case "varlen":
            return _FlashAttention.apply(q, k, v, layout.cu_seqlens, layout.max_seqlen, True, scale, mask.window)
        case _:
            _reject("sdpa_flash", layout)


def attention_sdpa_cudnn(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """cuDNN fused attention (aten): causal / full / empty blocks; packed documents one call per document.

    Raises:
        NotImplementedError: not CUDA, not fp16/bf16, head_dim unsupported, a sliding window, or a
            `general` mask.
    """
    _check_inputs("sdpa_cudnn", q, k)
    if mask.window is not None:
        raise NotImplementedError("attention backend 'sdpa_cudnn' has no sliding window; use 'sdpa_flash' or 'flex'")
    layout = classify(mask, q.shape[1], k.shape[1])
    match layout.kind:
        case "empty":
            return _empty(q)
        case "causal" | "full":
            return _CudnnAttention.apply(q, k, v, layout.kind == "causal", scale)
        case "varlen":
            outs: list[list[Tensor]] = [[] for _ in range(q.shape[0])]
            lses: list[list[Tensor]] = [[] for _ in range(q.shape[0])]
            for row, start, end in layout.segments:
                o, l = _CudnnAttention.apply(q[row:row + 1, start:end], k[row:row + 1, start:end],
                                             v[row:row + 1, start:end], True, scale)
                outs[row].append(o)
                lses[row].append(l)
            out = torch.cat([torch.cat(o, dim=1) for o in outs])  # (bs, s, h, d)
            lse = torch.cat([torch.cat(l, dim=2) for l in lses])  # (bs, h, s)
            return out, lse
        case _:
            _reject("sdpa_cudnn", layout)

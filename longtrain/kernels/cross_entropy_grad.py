"""Cross-entropy of a chunk of logits and its gradient, in one Triton kernel that overwrites the logits.

Layout: logits (n, V) in bf16 / fp16 / fp32, rows contiguous; labels (n,) int64 with `ignore_index` = ignore.
For each row: a first pass computes the log-sum-exp online in fp32; a second pass overwrites the row with
d loss / d logits = softmax - onehot(label) (zero for an ignored row) in the logits' dtype. Two reads and
one write of the chunk and no fp32 copy of it, where the compiled torch epilogue of linear_cross_entropy
materialises an fp32 view and a separate gradient buffer (the "softmax in place" of Liger-kernel's fused
linear cross-entropy, arXiv:2410.10989). Returns the fp32 loss of every row.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (the tests); `ce_loss_and_grad_reference` is the oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.kernels.rmsnorm import _require_triton, triton

if triton is not None:
    import triton.language as tl


def ce_loss_and_grad_reference(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                               need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Pure torch: (fp32 loss per row (n,), d loss / d logits (n, V) in the logits' dtype, or None).

    The oracle of the kernel, and the epilogue linear_cross_entropy's eager and compiled impls run.
    """
    lf = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(lse))
    if not need_grad:
        return loss, None
    grad = torch.exp(lf - lse[:, None])  # softmax - onehot(label) on valid rows, 0 on ignored rows
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    return loss, (grad * valid[:, None]).to(logits.dtype)


if triton is not None:

    @triton.jit
    def _ce_kernel(logits_ptr, stride, labels_ptr, loss_ptr, V, ignore_index,
                   WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        # Pass 1: per-lane running max and sum of exp, merged at the end (log-sum-exp in fp32).
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_vec, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that saw only padding stays 0
            s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
            m_vec = m_new
        m = tl.max(m_vec, 0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), 0))
        target = tl.load(base + tl.where(valid, y, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WRITE_GRAD:
            # Pass 2: the row becomes softmax - onehot(label), zero when the label is ignored.
            scale = tl.where(valid, 1.0, 0.0)
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(cols == y, g - 1.0, g) * scale
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def ce_loss_and_grad_inplace(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                             write_grad: bool = True) -> Tensor:
    """fp32 loss per row (n,); with `write_grad`, `logits` is overwritten with d loss / d logits.

    Raises:
        ValueError: logits not 2-D with contiguous rows, labels not (n,).
        NotImplementedError: triton missing, or a device it cannot run on.
    """
    _require_triton("ce_loss_and_grad_inplace", logits)
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"ce_loss_and_grad_inplace: logits must be (n, V) with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    n, vocab = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"ce_loss_and_grad_inplace: labels must be ({n},), got {tuple(labels.shape)}")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block = min(8192, triton.next_power_of_2(vocab))
    _ce_kernel[(n,)](logits, logits.stride(0), labels.contiguous(), loss, vocab, ignore_index,
                     WRITE_GRAD=write_grad, BLOCK=block, num_warps=8)
    return loss

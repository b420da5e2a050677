"""Output projection + cross-entropy. (Simple form: the memory issue replaces the internals, same signature.)"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from longtrain.data.batch import IGNORE_INDEX


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Sum of cross-entropy over valid labels, with full fp32 logits. hidden (N, dim), weight (V, dim), labels (N,)."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Sum of cross-entropy over labels != -100 (fp32 scalar); 0 (not NaN) when no label is valid."""
    return linear_cross_entropy_reference(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1))

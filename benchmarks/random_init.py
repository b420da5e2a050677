"""Random weights on the model's device, shared by the benchmark scripts (a module beside them, not a package).

`Transformer.init_weights` draws on the CPU (about a minute for 8B parameters); a benchmark only needs sane
values: norms 1, biases 0, every matrix normal(0, std).
"""

from __future__ import annotations

import torch


def init_random(model: torch.nn.Module, std: float) -> None:
    """In-place random init of every parameter of `model`, on its device."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, std)

"""LoRA adapters, LongLoRA-style (Chen et al. 2023, arXiv:2309.12307): low-rank updates on the chosen projections,
with embeddings and norms also trainable (their Table 2: without them long-context LoRA lags full fine-tuning).

The adapter is an `nn.Linear` subclass that keeps the frozen `weight`/`bias` under their original names (adding
`lora_a`/`lora_b`), so base-model state dicts load unchanged and `merge_lora` gives back a plain model that
`save_hf` exports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * x A^T B^T, with W (and b) frozen and B initialised to zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        # Kaiming-uniform A and zero B (Hu et al. 2021): the adapted model starts equal to the base model.
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(self.lora_a.shape).uniform_(-bound, bound, generator=generator)
        self.lora_a.copy_(a)
        self.lora_b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # (out, in)
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], train_embed_norm: bool = True,
               seed: int = 0) -> int:
    """Freeze `model` and add adapters to the target projections of every layer.

    The arguments are the recipe's `model.lora` block (config.LoraConfig) and a checkpoint's meta.json `lora`,
    spelt out so that the model layer needs neither.

    Args:
        model: a longtrain Transformer (plain, before any parallel wrapping).
        rank: the adapters' rank.
        alpha: the adapter output is scaled by alpha / rank.
        targets: projections that get adapters, keys of TARGETS (q k v o gate up down).
        train_embed_norm: embeddings and norms stay trainable (LongLoRA).
        seed: seed of the adapters' random init.
    Returns:
        The number of trainable parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = {TARGETS[t] for t in targets}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and type(child) is nn.Linear:
                lora = LoRALinear(child, rank, alpha)
                lora.reset_lora(gen)
                setattr(module, child_name, lora)
    if train_embed_norm:
        for name, p in model.named_parameters():
            if "embed_tokens" in name or name.endswith("norm.weight") or "layernorm" in name:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling * B A (in place); returns `model`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model

"""The one checkpoint reader: a longtrain checkpoint -> the plain model it holds (LoRA merged), on any device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from longtrain.checkpoint.store import CheckpointMeta, load_model_weights, read_meta, verified_checkpoint
from longtrain.model.args import ModelArgs
from longtrain.model.decoder import Transformer
from longtrain.model.lora import apply_lora, merge_lora


def load_checkpoint_model(ckpt: str | Path, device: str | torch.device = "cpu",
                          rope: dict | None = None) -> tuple[Transformer, CheckpointMeta]:
    """The checkpoint's model in fp32 with its rope (that of the stage it ended in) and any LoRA adapters merged.

    Args:
        ckpt: a `step-N` folder, a `latest` link or a `checkpoints` folder (its newest complete checkpoint).
        device: where the model ends up (it is read on the CPU).
        rope: a rope block replacing the checkpoint's (e.g. to score an extension before training it).

    Returns:
        (the model, the checkpoint's meta.json).

    Raises:
        ValueError: no complete checkpoint at `ckpt`, or a damaged one (the message names the problem).
    """
    ckpt = verified_checkpoint(ckpt)
    meta = read_meta(ckpt)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in meta.model_args.items() if k in known})
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    if meta.lora is not None:
        apply_lora(model, **meta.lora)
    model.float()
    load_model_weights(ckpt, model)
    if meta.lora is not None:
        merge_lora(model)
    if rope is not None:
        model.set_rope(rope)
    return model.to(device), meta

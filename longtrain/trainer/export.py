"""`longtrain export CKPT_DIR OUT_DIR`: a training checkpoint -> a Hugging Face directory (LoRA merged)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from longtrain.config import LoraConfig
from longtrain.model.args import ModelArgs
from longtrain.model.decoder import Transformer
from longtrain.trainer.checkpoint import load_model_weights, read_meta, verified_checkpoint
from longtrain.trainer.lora import apply_lora, merge_lora


def load_checkpoint_model(ckpt: str | Path) -> Transformer:
    """The plain model of a checkpoint on CPU (fp32), with its rope and any LoRA adapters merged.

    Raises:
        ValueError: no complete checkpoint at `ckpt`.
    """
    ckpt = verified_checkpoint(ckpt)
    meta = read_meta(ckpt)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in meta.model_args.items() if k in known})
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    if meta.lora is not None:
        apply_lora(model, LoraConfig(**meta.lora))
    model.float()
    load_model_weights(ckpt, model)
    if meta.lora is not None:
        merge_lora(model)
    return model


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> Path:
    """Write the checkpoint's model as a Hugging Face directory with its rope (that of the stage it ended in)
    and its tokenizer.

    Args:
        ckpt: a step-N folder, the `latest` link, or a checkpoints folder (its newest complete checkpoint).
        out_dir: the directory to write.
        dtype: tensor dtype written; None: float32.
        overwrite: replace a non-empty out_dir.
    Returns:
        The written directory.
    Raises:
        ValueError: no complete checkpoint, or out_dir exists and is not empty (without overwrite).
    """
    from longtrain.data.tokenizer import load_tokenizer
    from longtrain.model.hf import save_hf

    ckpt = verified_checkpoint(ckpt)
    meta = read_meta(ckpt)
    model = load_checkpoint_model(ckpt)
    with tempfile.TemporaryDirectory() as tok_dir:
        tok_src = None
        if meta.tokenizer is not None:
            load_tokenizer(meta.tokenizer).save(tok_dir)
            tok_src = tok_dir
        # The Hugging Face directory the run started from carries generation defaults (eos ids, sampling): they
        # travel with the export (docs/export.md), also when the tokenizer is rewritten from its own files.
        src = meta.model_args.get("source_dir")
        if src and (Path(src) / "generation_config.json").is_file():
            shutil.copy2(Path(src) / "generation_config.json", Path(tok_dir) / "generation_config.json")
            tok_src = tok_dir
        return save_hf(model, out_dir, dtype=dtype, tokenizer_dir=tok_src, overwrite=overwrite)

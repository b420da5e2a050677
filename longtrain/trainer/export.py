"""`longtrain export CKPT_DIR OUT_DIR`: a training checkpoint -> a Hugging Face directory (LoRA merged)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from longtrain.checkpoint.model import load_checkpoint_model


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

    model, meta = load_checkpoint_model(ckpt)
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

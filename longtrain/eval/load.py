"""Load what an eval runs on: a Hugging Face directory or a longtrain checkpoint, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from longtrain.checkpoint.model import load_checkpoint_model
from longtrain.checkpoint.store import resolve_checkpoint
from longtrain.data.tokenizer import Tokenizer, load_tokenizer
from longtrain.model.decoder import Transformer


def load_for_eval(path: str | Path, rope: dict | None = None, device: str | torch.device = "cpu",
                  tokenizer: str | None = None) -> tuple[Transformer, Tokenizer | None, str]:
    """Load a model for evaluation, in eval mode, fp32 on CPU (the config's dtype elsewhere).

    Args:
        path: a Hugging Face directory (config.json + safetensors), a longtrain checkpoint (`step-N` folder, a
            `latest` link, a `checkpoints` folder) or a run directory holding `checkpoints/`.
        rope: a rope block replacing the model's (e.g. to score a PI extension before training it).
        device: where to load the model.
        tokenizer: "builtin", "builtin:N" or a tokenizer directory overriding the one found with the model.

    Returns:
        (model, tokenizer or None when the directory has none, a one-line description of what was loaded).

    Raises:
        ValueError: the path does not exist or is neither a Hugging Face directory nor a complete checkpoint, or
            the checkpoint is damaged. A checkpoint with LoRA adapters is scored with them merged.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model path {str(p)!r} does not exist; give a Hugging Face directory (config.json + "
                         "safetensors) or a longtrain checkpoint / run directory")
    if (p / "config.json").is_file():
        from longtrain.model.hf import load_hf

        dtype = torch.float32 if torch.device(device).type == "cpu" else None
        model = load_hf(p, rope=rope, dtype=dtype, device=device)
        tok_path = tokenizer or (str(p) if _has_tokenizer(p) else None)
        tok = load_tokenizer(tok_path) if tok_path else None
        what = f"Hugging Face directory {p}"
    else:
        model, tok_name, what = _load_checkpoint(p, rope, device)
        tok_name = tokenizer or tok_name
        tok = load_tokenizer(tok_name) if tok_name else None
    model.eval()
    return model, tok, what


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _load_checkpoint(p: Path, rope: dict | None, device: str | torch.device) -> tuple[Transformer, str | None, str]:
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    try:
        resolve_checkpoint(root)
    except ValueError as e:
        raise ValueError(f"model path {str(p)!r} is neither a Hugging Face directory (no config.json) nor a "
                         f"longtrain checkpoint: {e}") from None
    model, meta = load_checkpoint_model(root, device=device, rope=rope)
    lora = " (LoRA adapters merged)" if meta.lora else ""
    return model, meta.tokenizer, f"longtrain checkpoint {root} (step {meta.step}, stage {meta.stage}){lora}"

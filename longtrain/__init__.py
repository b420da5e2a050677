"""longtrain: distributed long-context training for Llama-family decoders."""

from longtrain.model.args import ModelArgs
from longtrain.model.decoder import Transformer

__version__ = "0.1.0"


def load_hf(path, rope=None, **kwargs):
    """Load a Hugging Face directory as a longtrain Transformer (see longtrain.model.hf.load_hf)."""
    from longtrain.model.hf import load_hf as _load_hf

    return _load_hf(path, rope=rope, **kwargs)


def save_hf(model, out_dir, **kwargs):
    """Write `model` as a Hugging Face directory (see longtrain.model.hf.save_hf)."""
    from longtrain.model.hf import save_hf as _save_hf

    return _save_hf(model, out_dir, **kwargs)


__all__ = ["ModelArgs", "Transformer", "load_hf", "save_hf", "__version__"]

"""Data pipeline: tokenizers, sources via `datasets`, packing, synthetic long-context tasks, the resumable loader.

Public names are imported lazily (PEP 562) so that `import longtrain.data.batch` from the kernels stays cheap
and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "batch", "IGNORE_INDEX": "batch",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "SourceSpec": "sources", "SourceStats": "sources", "BadRecordError": "sources",
    "Document": "pack", "Packer": "pack", "PackedRow": "pack", "PACKING_MODES": "pack",
    "pack_documents": "pack", "rows_to_batch": "pack",
    "DataLoader": "loader", "build_loader": "loader",
    "SYNTHETIC_OPTIONS": "readers",
    "RetrievalSample": "synthetic", "passkey_sample": "synthetic", "needle_sample": "synthetic",
    "shuffled_chunks_sample": "synthetic", "variable_tracking_sample": "synthetic_ruler",
    "common_words_sample": "synthetic_ruler", "retrieval_batch": "synthetic",
    "stdlib_documents": "corpus", "read_tiny_corpus": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"longtrain.data.{_EXPORTS[name]}"), name)

"""The Batch that flows data -> trainer -> model (see ARCHITECTURE.md, "Interfaces")."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from longtrain.types import IGNORE_INDEX  # re-exported: data.batch.IGNORE_INDEX is what data/ code imports


@dataclass
class Batch:
    """A packed batch. All tensors are (bs, seqlen); after context-parallel sharding, (bs, local_seqlen).

    Rotary positions and document boundaries are separate: positions may run across packed documents
    (`continuous`) or restart per document (`reset`); the attention mask always follows `doc_ids`.
    """

    input_ids: Tensor  # int64 token ids
    labels: Tensor  # int64, already shifted (labels[t] is the target of input_ids[t]); -100 = ignore
    position_ids: Tensor  # int64 rotary positions, global even after CP sharding
    doc_ids: Tensor  # int64 document id of each token (ANCHOR_DOC = -1 is visible to every document)
    seq_index: Tensor | None = None  # int64 index of each token in the full sequence; None = 0..seqlen-1

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                        for f in fields(self)})

    @property
    def num_valid_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

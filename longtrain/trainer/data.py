"""The trainer's side of the data pipeline: one resumable batch source per stage (longtrain.data.build_loader).

Contract the loop relies on (`BatchSource`): `next_batch()` returns this data-parallel rank's next Batch of shape
(micro_batch, seq_len), identical on the context-parallel ranks of a group (they share a dp rank); `state_dict()` /
`load_state_dict()` capture the position exactly (the checkpoint stores it per rank); `close()` stops prefetching.
"""

from __future__ import annotations

from typing import Protocol

from longtrain.config import DataConfig
from longtrain.data.batch import Batch
from longtrain.data.tokenizer import Tokenizer


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


def build_batch_source(cfg: DataConfig, tok: Tokenizer, seq_len: int, micro_batch: int, dp_rank: int,
                       dp_size: int) -> BatchSource:
    """The batch source of one stage for data-parallel rank `dp_rank` of `dp_size`.

    Raises:
        ValueError: a bad source or record (see longtrain.data.build_loader).
    """
    from longtrain.data.loader import build_loader

    return build_loader(list(cfg.sources), tok, seq_len, micro_batch, packing=cfg.packing, seed=cfg.seed,
                        dp_rank=dp_rank, dp_size=dp_size, on_bad_record=cfg.on_bad_record)

"""Resume on another layout (issue 20): the data keeps the layout the run started with.

Each data-parallel rank's loader reads its own documents and packs them itself, so the sequences of a step depend
on the number of data-parallel ranks (the *data layout*, `data_dp`). A checkpoint saved with dp=2 and resumed with
dp=1 (or cp=2 instead of dp=2, or world 2 instead of 1) must still see exactly the sequences the uninterrupted run
would have seen: no sequence skipped or repeated. So the run keeps its data layout for good: when the ranks that
compute (`layout.dp_size`) differ from it, every rank runs the `data_dp` loaders of the original layout in lockstep,
puts each step's global batch together in their order (loader 0's micro-batches, then loader 1's, ...), and keeps its
share: data-parallel rank r of D takes sequences [r * S / D, (r + 1) * S / D) of the S in the step. Model and
optimizer state are resharded by DCP (torchtitan does the same); the loss is a sum over the same global batch, so
losses match the uninterrupted run up to summation order (fp32: 1e-5).

The cost: each rank reads and packs the whole global batch (data_dp loaders) instead of its share. A run started
fresh on the new layout has none of this.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from longtrain.config import StageConfig
from longtrain.data.batch import Batch
from longtrain.trainer.data import BatchSource, build_batch_source


def global_sequences(stage: StageConfig, dp_size: int) -> int:
    """Sequences in one optimizer step over all ranks (train.global_batch_tokens, or one micro-batch per dp rank)."""
    gbt = stage.train.global_batch_tokens
    return gbt // stage.seq_len if gbt else dp_size * stage.train.micro_batch


class RemappedSource:
    """This data-parallel rank's share of each step's global batch, read through the run's original data layout."""

    def __init__(self, loaders: list[BatchSource], micro_per_loader: int, dp_rank: int, dp_size: int,
                 micro_batch: int):
        self.loaders, self.micro_per_loader = loaders, micro_per_loader
        self.dp_rank, self.dp_size, self.micro_batch = dp_rank, dp_size, micro_batch
        self.queue: deque[Batch] = deque()

    def _fill(self) -> None:
        parts = [ld.next_batch() for ld in self.loaders for _ in range(self.micro_per_loader)]
        full = {name: torch.cat([getattr(b, name) for b in parts]) for name in ("input_ids", "labels", "position_ids",
                                                                                "doc_ids")}
        share = full["input_ids"].shape[0] // self.dp_size  # (global sequences / dp, seq_len)
        lo = self.dp_rank * share
        for start in range(lo, lo + share, self.micro_batch):
            self.queue.append(Batch(**{k: v[start:start + self.micro_batch] for k, v in full.items()}))

    def next_batch(self) -> Batch:
        if not self.queue:
            self._fill()
        return self.queue.popleft()

    def state_dict(self) -> dict:
        # Saves happen between steps, when every step's share has been taken.
        assert not self.queue, "a remapped data source is saved mid-step"
        return {"loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        for ld, st in zip(self.loaders, state["loaders"], strict=True):
            ld.load_state_dict(st)

    def close(self) -> None:
        for ld in self.loaders:
            ld.close()


def build_stage_source(stage: StageConfig, tokenizer, dp_rank: int, dp_size: int, data_dp: int) -> BatchSource:
    """The stage's batch source: this rank's own loader, or (data_dp != dp_size) a RemappedSource.

    Raises:
        ValueError: the global batch cannot be cut into the original layout's micro-batches.
    """
    mb = stage.train.micro_batch
    if data_dp == dp_size:
        return build_batch_source(stage.data, tokenizer, stage.seq_len, mb, dp_rank, dp_size)
    seqs = global_sequences(stage, dp_size)
    if seqs % (data_dp * mb):
        raise ValueError(f"stage {stage.name!r}: the global batch of {seqs} sequences cannot be read through the "
                         f"run's data layout of {data_dp} data-parallel loaders x micro_batch {mb}; set "
                         f"train.global_batch_tokens to a multiple of {data_dp * mb * stage.seq_len}")
    loaders = [build_batch_source(stage.data, tokenizer, stage.seq_len, mb, d, data_dp) for d in range(data_dp)]
    return RemappedSource(loaders, seqs // (data_dp * mb), dp_rank, dp_size, mb)


def states_by_data_rank(ckpt: Path, world_size: int, key: str = "data") -> list[dict] | None:
    """The loader state of each data-parallel rank of the original layout, from every rank file of `ckpt`.

    `key` is "data" (saved mid-stage) or "stage_end" (saved at a stage's end). None when nothing was saved there.
    """
    by_rank: dict[int, dict] = {}
    for rank in range(world_size):
        state = torch.load(Path(ckpt) / f"rank-{rank:05d}.pt", weights_only=False)
        data = state.get(key)
        if key == "stage_end" and data is not None:
            data = data["data"]
        if data is None:
            return None
        if "loaders" in data:  # already remapped: every rank holds every loader of the original layout
            return list(data["loaders"])
        by_rank.setdefault(data["dp_rank"], data)
    return [by_rank[d] for d in sorted(by_rank)]


def data_state_for(states: list[dict], dp_rank: int, dp_size: int) -> dict:
    """What this rank's stage source loads: its own loader's state, or every loader's (a RemappedSource)."""
    return states[dp_rank] if len(states) == dp_size else {"loaders": states}


def remap_rank_state(rank_state: dict, ckpt: Path, world_size: int, dp_rank: int, dp_size: int) -> None:
    """Replace the loader states of `rank_state` (read from one saved rank) by this rank's share on the new layout."""
    data = states_by_data_rank(ckpt, world_size, "data")
    rank_state["data"] = None if data is None else data_state_for(data, dp_rank, dp_size)
    end = states_by_data_rank(ckpt, world_size, "stage_end")
    rank_state["stage_end"] = None if end is None else {"data": data_state_for(end, dp_rank, dp_size)}

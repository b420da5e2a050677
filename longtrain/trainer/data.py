"""The trainer's side of the data pipeline: a resumable source of global micro-batches for one stage.

Contract the loop relies on (`BatchSource`): `next_batch()` returns this data-parallel rank's next Batch of shape
(micro_batch, seq_len), identical on the context-parallel ranks of a group; `state_dict()` / `load_state_dict()`
capture the position exactly (the checkpoint stores it per rank), so a resumed run sees the same batches.
"""

from __future__ import annotations

import random
from typing import Protocol

from longtrain.config import DataConfig, SourceConfig
from longtrain.data.batch import Batch
from longtrain.data.tokenizer import Tokenizer


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


SYNTHETIC_TASKS = ("passkey",)


class SyntheticTaskSource:
    """`synthetic:<task>` sources: each sample is built from its own seed (data seed, dp rank, sample index),
    so the position is one integer and any rank can resume anywhere. Sources are mixed by weight per sample."""

    def __init__(self, sources: list[SourceConfig], tok: Tokenizer, seq_len: int, micro_batch: int, seed: int,
                 dp_rank: int):
        from longtrain.data import synthetic

        self.synthetic, self.sources, self.tok = synthetic, sources, tok
        self.seq_len, self.micro_batch, self.seed, self.dp_rank = seq_len, micro_batch, seed, dp_rank
        self.index = 0
        for i, s in enumerate(sources):
            task = s.path.split(":", 1)[1]
            if task not in SYNTHETIC_TASKS:
                raise ValueError(f"data.sources[{i}].path = {s.path!r}: unknown synthetic task {task!r}; "
                                 f"valid: {', '.join('synthetic:' + t for t in SYNTHETIC_TASKS)}")
            bad = set(s.options) - {"digits", "filler", "loss_on"}
            if bad:
                raise ValueError(f"data.sources[{i}].options: unknown option(s) {sorted(bad)} for {s.path}; "
                                 f"valid: digits, filler, loss_on")

    def _sample(self, index: int):
        rng = random.Random(f"{self.seed}/{self.dp_rank}/{index}")
        weights = [s.weight for s in self.sources]
        src = rng.choices(self.sources, weights=weights)[0]
        opts = dict(src.options)
        opts.pop("loss_on", None)
        return self.synthetic.passkey_sample(self.tok, self.seq_len, depth=rng.random(), rng=rng, **opts), src

    def next_batch(self) -> Batch:
        samples = []
        loss_on = "all"
        for _ in range(self.micro_batch):
            sample, src = self._sample(self.index)
            loss_on = src.options.get("loss_on", "all")
            samples.append(sample)
            self.index += 1
        return self.synthetic.retrieval_batch(samples, loss_on=loss_on)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def build_batch_source(cfg: DataConfig, tok: Tokenizer, seq_len: int, micro_batch: int, dp_rank: int,
                       dp_size: int) -> BatchSource:
    """The batch source of one stage for data-parallel rank `dp_rank` of `dp_size`.

    Raises:
        ValueError: a bad source.
        NotImplementedError: file sources mixed with synthetic ones.
    """
    synthetic = [s.path.startswith("synthetic:") for s in cfg.sources]
    if all(synthetic):
        return SyntheticTaskSource(cfg.sources, tok, seq_len, micro_batch, cfg.seed, dp_rank)
    if any(synthetic):
        raise NotImplementedError("mixing synthetic:<task> sources with file sources in one stage")
    raise NotImplementedError("file data sources: the data loader (longtrain.data) is not wired in yet")

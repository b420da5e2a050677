"""The training data loader of one data-parallel rank: sources -> mixture -> packing -> Batch.

Deterministic from a seed and exactly resumable: `state_dict()` after k batches, given to `load_state_dict()`
of a fresh loader (same sources, seed, layout), makes it yield exactly the batches k+1, k+2, ... of the
uninterrupted loader, prefetching or not. The state is small: per-source positions, the mixture's token counts
and the unfinished (carried-over) document.

Mixture: sources are weighted by tokens, deterministically: the next document comes from the source with the
fewest tokens emitted per unit of weight (ties to the first), so a 0.6/0.4 mix is 60/40 in tokens at every
point of the run (ProLong's long/short mix is specified in tokens, arXiv:2410.02660).

Data parallelism: each rank builds its own loader with (dp_rank, dp_size) and reads disjoint documents.
Context parallelism is not done here: all cp ranks of a group take the same batch and shard it with
`longtrain.parallel.cp_shard.prepare_cp_inputs`.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any

import numpy as np

from longtrain.data.batch import Batch
from longtrain.data.pack import Document, Packer, check_mode, rows_to_batch
from longtrain.data.readers import MapSource, StreamSource, SyntheticSource
from longtrain.data.sources import ON_BAD_RECORD, SourceSpec, SourceStats
from longtrain.data.tokenizer import Tokenizer

_STATE_VERSION = 1


class DataLoader:
    """An endless iterator of `Batch` (micro_batch, seq_len) for one data-parallel rank; build with `build_loader`."""

    def __init__(self, sources: list[SourceSpec], tokenizer: Tokenizer, seq_len: int, micro_batch: int,
                 packing: str = "continuous", seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 on_bad_record: str = "error", prefetch: int = 2, cache_dir: str | None = None):
        if not sources:
            raise ValueError("build_loader: no data sources")
        check_mode(packing)
        match on_bad_record:
            case "error" | "skip":
                pass
            case _:
                raise ValueError(f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(ON_BAD_RECORD)}")
        if micro_batch < 1 or seq_len < 2:
            raise ValueError(f"need micro_batch >= 1 and seq_len >= 2, got {micro_batch}, {seq_len}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.tokenizer, self.seq_len, self.micro_batch = tokenizer, seq_len, micro_batch
        self.packing, self.seed, self.dp_rank, self.dp_size = packing, seed, dp_rank, dp_size
        self.prefetch = prefetch
        # AnchorAttention's anchor is the BOS token; models without BOS (Qwen) use EOS in its place.
        anchor = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self._packer = Packer(seq_len, packing, tokenizer.pad_id, anchor)
        self.sources = [self._reader(spec, i, on_bad_record, cache_dir) for i, spec in enumerate(sources)]
        self._weights = np.array([s.weight for s in sources], dtype=np.float64)
        self._emitted = np.zeros(len(sources), dtype=np.int64)  # tokens drawn per source
        self._batches = 0
        self._consumed = self._snapshot()  # the state after the last batch handed out
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _reader(self, spec: SourceSpec, i: int, on_bad_record: str, cache_dir: str | None):
        if spec.is_synthetic:
            return SyntheticSource(spec, i, self.tokenizer, self.seed, self.dp_rank, self._packer.capacity)
        if spec.streaming:
            return StreamSource(spec, i, self.tokenizer, on_bad_record, self.seed, self.dp_rank, self.dp_size)
        return MapSource(spec, i, self.tokenizer, on_bad_record, self.seed, self.dp_rank, self.dp_size, cache_dir)

    @property
    def stats(self) -> list[SourceStats]:
        """Per-source counts: records, documents, tokens, skipped bad records (with examples), filtered."""
        return [s.stats for s in self.sources]

    # -- producing ------------------------------------------------------------------------------------------

    def _next_doc(self) -> Document:
        i = int(np.argmin(self._emitted / self._weights))  # the source furthest behind its token share
        doc = self.sources[i].next_doc()
        self._emitted[i] += len(doc)
        return doc

    def _make_batch(self) -> Batch:
        rows = [self._packer.next_row(self._next_doc) for _ in range(self.micro_batch)]
        self._batches += 1
        return rows_to_batch(rows)

    def _snapshot(self) -> dict[str, Any]:
        carry = self._packer.carry
        return {
            "version": _STATE_VERSION, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "seq_len": self.seq_len, "micro_batch": self.micro_batch, "packing": self.packing,
            "paths": [s.spec.path for s in self.sources], "batches": self._batches,
            "emitted": self._emitted.tolist(), "sources": [s.state_dict() for s in self.sources],
            "carry": None if carry is None else {
                "ids": carry.ids.tolist(), "source": carry.source, "atomic": carry.atomic,
                "loss_mask": None if carry.loss_mask is None else carry.loss_mask.tolist()},
        }

    def _produce(self) -> None:
        """Background worker: build batches ahead, each with the state right after it."""
        try:
            while not self._stop.is_set():
                item = (self._make_batch(), self._snapshot())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    # -- consuming ------------------------------------------------------------------------------------------

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> Batch:
        if self.prefetch == 0:
            batch = self._make_batch()
            self._consumed = self._snapshot()
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop.clear()
            self._thread = threading.Thread(target=self._produce, name="longtrain-data-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._consumed = item
        return batch

    def next_batch(self) -> Batch:
        """The next batch (the trainer's `BatchSource` protocol; same as `next(loader)`)."""
        return next(self)

    def close(self) -> None:
        """Stop the prefetch worker (the loader can be iterated again; it continues where the consumer was)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None
        # The worker ran ahead of the consumer: rewind to what was consumed.
        self._restore(self._consumed)

    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch returned by `next()` (plain Python data: ints, lists, dicts)."""
        return copy.deepcopy(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (of a loader with the same sources, seed, rank and shapes).

        Raises:
            ValueError: the state was saved by a loader with a different layout or data.
        """
        self.close()
        want = {"version": _STATE_VERSION, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "seq_len": self.seq_len, "micro_batch": self.micro_batch, "packing": self.packing,
                "paths": [s.spec.path for s in self.sources]}
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state does not match this loader (saved vs now): " +
                             ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._restore(state)
        self._consumed = copy.deepcopy(state)

    def _restore(self, state: dict[str, Any]) -> None:
        for src, sd in zip(self.sources, state["sources"]):
            src.load_state_dict(sd)
        self._emitted = np.array(state["emitted"], dtype=np.int64)
        self._batches = state["batches"]
        c = state["carry"]
        self._packer.carry = None if c is None else Document(
            np.array(c["ids"], dtype=np.int64), None if c["loss_mask"] is None else np.array(c["loss_mask"], bool),
            atomic=c["atomic"], source=c["source"])

    @property
    def batches_consumed(self) -> int:
        return self._consumed["batches"]


def build_loader(sources: list[SourceSpec], tokenizer: Tokenizer, seq_len: int, micro_batch: int, *,
                 packing: str = "continuous", seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 on_bad_record: str = "error", prefetch: int = 2, cache_dir: str | None = None) -> DataLoader:
    """Build the loader of one data-parallel rank.

    Args:
        sources: the mixture (see `SourceSpec`); weights are token shares.
        tokenizer: from `load_tokenizer`.
        seq_len: tokens per sequence (the stage's length).
        micro_batch: sequences per batch.
        packing: "continuous", "reset" or "anchor" (see `longtrain.data.pack`).
        seed: seeds document order, upsampling and synthetic tasks.
        dp_rank, dp_size: this rank among the data-parallel ranks; ranks read disjoint documents.
        on_bad_record: "error" (raise, naming file and line) or "skip" (skip, count in `stats` and the log).
        prefetch: batches built ahead in a background thread (0: build on demand in the caller's thread).
        cache_dir: `datasets` cache for the Arrow files (default: the `datasets` default cache).

    Returns:
        The DataLoader (an endless iterator of Batch; `state_dict()` / `load_state_dict()` for resume).

    Raises:
        ValueError: bad arguments, a bad record with on_bad_record="error", or a source without usable documents.
        NotImplementedError: an unsupported combination (e.g. streaming with upsampling).
    """
    return DataLoader(sources, tokenizer, seq_len, micro_batch, packing, seed, dp_rank, dp_size, on_bad_record,
                      prefetch, cache_dir)

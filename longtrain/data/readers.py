"""Per-source document readers for one data-parallel rank: map-style (Arrow), streaming and synthetic.

Every reader yields `Document`s forever (epoch after epoch) and has an exact `state_dict()`. Data-parallel
ranks read disjoint documents: map-style ranks take interleaved slices of one seeded permutation per epoch,
streaming ranks take disjoint shards or examples (`datasets.distributed.split_dataset_by_node`), synthetic
ranks draw from their own seeds.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from typing import Any

import numpy as np

from longtrain.data.pack import Document
from longtrain.data.sources import (PIPELINE_VERSION, BadRecordError, SourceSpec, SourceStats, check_value,
                                    file_signature, iter_records, resolve_files, to_document, tokenize_record)
from longtrain.data.synthetic import needle_sample, passkey_sample, shuffled_chunks_sample
from longtrain.data.synthetic_ruler import common_words_sample, variable_tracking_sample
from longtrain.data.tokenizer import Tokenizer

log = logging.getLogger("longtrain.data")

# Options of synthetic sources (SourceSpec.options) and their defaults.
SYNTHETIC_OPTIONS: dict[str, dict[str, Any]] = {
    "passkey": {"length": None, "loss_on": "all", "depth": None, "digits": 5, "filler": "repeat",
                "template": "classic"},
    "needle": {"length": None, "loss_on": "all", "depth": None, "n_keys": 4, "n_values": 1, "n_queries": 1,
               "filler": "text"},
    "shuffled_chunks": {"length": None, "loss_on": "all", "n_chunks": 8, "task": "restore"},
    "variable_tracking": {"length": None, "loss_on": "all", "depth": None, "n_chains": 1, "n_hops": 4,
                          "filler": "repeat"},
    "common_words": {"length": None, "loss_on": "all", "n_common": 10, "common_freq": 30, "rare_freq": 3},
}


def _features():
    from datasets import Features, Value

    return Features({"text": Value("string"), "messages": Value("string"), "_file": Value("string"),
                     "_line": Value("int64"), "_error": Value("string")})


def _tok_features():
    from datasets import Features, Value

    try:
        from datasets import List  # datasets >= 4
    except ImportError:  # datasets 2.x / 3.x spell a variable-length list `Sequence`
        from datasets import Sequence as List

    return Features({"input_ids": List(Value("int32")), "loss_mask": List(Value("int8")),
                     "n_tokens": Value("int64"), "_file": Value("string"), "_line": Value("int64")})


def _normalize_saved(batch: dict, indices: list[int], name: str, text_field: str, messages_field: str | None,
                     on_bad_record: str) -> dict:
    out = {"text": [], "messages": [], "_file": [], "_line": [], "_error": []}
    for value, i in zip(batch[messages_field or text_field], indices):
        text, messages, err = check_value({messages_field or text_field: value}, text_field, messages_field,
                                           f"{name} row {i}")
        if err and on_bad_record == "error":
            raise BadRecordError(err + " (set data.on_bad_record=skip to skip and count such records)")
        for k, v in zip(out, (text, messages, name, i, err)):
            out[k].append(v)
    return out


def _tokenize_batch(batch: dict, tok: Tokenizer) -> dict:
    texts = batch["text"]
    plain = [i for i, m in enumerate(batch["messages"]) if m is None]
    encoded = dict(zip(plain, tok.encode_batch([texts[i] for i in plain]))) if plain else {}
    bos = [tok.bos_id] if tok.add_bos else []
    ids, masks = [], []
    for i, m in enumerate(batch["messages"]):
        if m is None:
            ids.append(bos + encoded[i] + [tok.eos_id])
            masks.append([])
        else:
            x, mask = tokenize_record(tok, None, m)
            ids.append(x)
            masks.append(mask)
    return {"input_ids": ids, "loss_mask": masks, "n_tokens": [len(x) for x in ids],
            "_file": batch["_file"], "_line": batch["_line"]}


def _fp(*parts: object) -> str:
    """A `datasets` fingerprint (at most 64 characters) of the parts."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def _raise_bad_record(e: BaseException) -> None:
    """`datasets` wraps generator errors in DatasetGenerationError; surface our own error unchanged."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ValueError):
            raise cause from None
        cause = cause.__cause__ or cause.__context__
    raise e


class MapSource:
    """A source tokenized up front into a memory-mapped Arrow dataset (cached by `datasets`)."""

    def __init__(self, spec: SourceSpec, index: int, tok: Tokenizer, on_bad_record: str, seed: int,
                 dp_rank: int, dp_size: int, cache_dir: str | None):
        import datasets
        import pyarrow.compute as pc

        self.spec, self.index, self.seed, self.dp_rank, self.dp_size = spec, index, seed, dp_rank, dp_size
        self.stats = SourceStats(spec.path)
        kind, files = resolve_files(spec)
        if kind == "saved":
            raw = self._load_saved(files[0], on_bad_record)
        else:
            try:
                raw = datasets.Dataset.from_generator(
                    iter_records, features=_features(), cache_dir=cache_dir,
                    gen_kwargs={"files": files, "kind": kind, "text_field": spec.text_field,
                                "messages_field": spec.messages_field, "on_bad_record": on_bad_record,
                                "fingerprint": f"v{PIPELINE_VERSION}-{file_signature(files)}"})
            except datasets.exceptions.DatasetGenerationError as e:
                _raise_bad_record(e)
        errors = raw.data.column("_error")
        self.stats.records = len(raw)
        for reason in pc.drop_null(errors).to_pylist():
            self.stats.add_bad(reason)
        fp = f"{raw._fingerprint}-{tok.fingerprint}-v{PIPELINE_VERSION}"
        good = raw.filter(lambda e: [x is None for x in e], input_columns="_error", batched=True,
                          new_fingerprint=_fp(fp, "good"))
        if len(good) == 0:  # `datasets` skips map() on an empty dataset: say what happened instead
            raise ValueError(f"source {spec.path!r} has no usable document ({self.stats.records} records, "
                             f"{self.stats.bad_records} bad: {'; '.join(self.stats.bad_examples[:3])})")
        tokd = good.map(_tokenize_batch, batched=True, batch_size=512, fn_kwargs={"tok": tok},
                        remove_columns=good.column_names, features=_tok_features(), new_fingerprint=_fp(fp, "tok"))
        n = np.asarray(tokd.data.column("n_tokens").to_numpy())
        lo, hi = spec.min_tokens, spec.max_tokens if spec.max_tokens is not None else np.iinfo(np.int64).max
        self.stats.filtered_short = int((n < lo).sum())
        self.stats.filtered_long = int((n > hi).sum())
        keep = np.nonzero((n >= lo) & (n <= hi))[0]
        self.lengths = n[keep]
        self.stats.documents, self.stats.tokens = len(keep), int(self.lengths.sum())
        if self.stats.bad_records:
            log.warning("source %s: skipped %d bad record(s) of %d, e.g. %s", spec.path, self.stats.bad_records,
                        self.stats.records, "; ".join(self.stats.bad_examples[:3]))
        if self.stats.filtered_short or self.stats.filtered_long:
            log.info("source %s: filtered %d document(s) shorter than %d and %d longer than %s tokens", spec.path,
                     self.stats.filtered_short, lo, self.stats.filtered_long, spec.max_tokens)
        if len(keep) == 0:
            raise ValueError(f"source {spec.path!r} has no usable document ({self.stats.records} records, "
                             f"{self.stats.bad_records} bad, {self.stats.filtered_short} shorter than min_tokens="
                             f"{lo}, {self.stats.filtered_long} longer than max_tokens={spec.max_tokens})")
        ds = tokd
        if len(keep) < len(n):  # materialise the kept rows contiguously (cached) for fast row access
            ds = tokd.select(keep, new_fingerprint=_fp(fp, lo, hi)).flatten_indices(
                new_fingerprint=_fp(fp, lo, hi, "flat"))
        # Row access straight from the memory-mapped Arrow buffers: per chunk, (offsets, values) as numpy views.
        self._ids = [(c.offsets.to_numpy(), c.values.to_numpy(zero_copy_only=False))
                     for c in ds.data.column("input_ids").chunks]
        self._mask = [(c.offsets.to_numpy(), c.values.to_numpy(zero_copy_only=False))
                      for c in ds.data.column("loss_mask").chunks]
        self._chunk_starts = np.cumsum([0] + [len(c[0]) - 1 for c in self._ids])
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _load_saved(self, path: str, on_bad_record: str):
        import datasets

        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if self.spec.split not in loaded:
                raise ValueError(f"source {path!r}: no split {self.spec.split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[self.spec.split]
        name = self.spec.messages_field or self.spec.text_field
        if name not in loaded.column_names:
            raise ValueError(f"source {path!r}: missing column {name!r} (columns: {', '.join(loaded.column_names)})")
        return loaded.map(_normalize_saved, batched=True, with_indices=True, remove_columns=loaded.column_names,
                          features=_features(), new_fingerprint=_fp(loaded._fingerprint, name, on_bad_record, "norm"),
                          fn_kwargs={"name": path, "text_field": self.spec.text_field,
                                     "messages_field": self.spec.messages_field, "on_bad_record": on_bad_record})

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's document order for `epoch`: a slice of one permutation shared by all ranks."""
        rng = np.random.default_rng([self.seed, self.index, epoch])
        rows = np.arange(len(self.lengths))
        if self.spec.upsample_long is not None:
            long_rows = rows[self.lengths >= self.spec.upsample_long]
            f = self.spec.upsample_factor
            extra = int(f) - 1 + (rng.random(len(long_rows)) < f - int(f))  # copies beyond the first
            rows = np.concatenate([rows, np.repeat(long_rows, extra)])
        order = rng.permutation(rows)[self.dp_rank::self.dp_size]
        if len(order) == 0:
            raise ValueError(f"source {self.spec.path!r} has {len(rows)} document(s), fewer than dp_size="
                             f"{self.dp_size}: rank {self.dp_rank} would get none")
        return order

    def next_doc(self) -> Document:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        row = int(self._order[self.pos])
        self.pos += 1
        c = int(np.searchsorted(self._chunk_starts, row, side="right")) - 1
        j = row - int(self._chunk_starts[c])
        (io, iv), (mo, mv) = self._ids[c], self._mask[c]
        return to_document(iv[io[j]:io[j + 1]], mv[mo[j]:mo[j + 1]], self.index)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "epoch": self.epoch, "pos": self.pos, "documents": self.stats.documents}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") != "map" or sd.get("documents") != self.stats.documents:
            raise ValueError(f"source {self.spec.path!r}: saved loader state {sd} does not match this source "
                             f"({self.stats.documents} documents): the data changed since the checkpoint")
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self._order = self._epoch_order(self.epoch)


class StreamSource:
    """A source read and tokenized lazily (`datasets.IterableDataset`), in file order, without shuffling."""

    def __init__(self, spec: SourceSpec, index: int, tok: Tokenizer, on_bad_record: str, seed: int,
                 dp_rank: int, dp_size: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.spec, self.index, self.tok = spec, index, tok
        self.stats = SourceStats(spec.path)
        kind, files = resolve_files(spec)
        if kind == "saved":
            loaded = datasets.load_from_disk(files[0])
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[spec.split]
            ds = loaded.to_iterable_dataset(num_shards=max(1, dp_size)).map(
                _normalize_saved, batched=True, with_indices=True, remove_columns=loaded.column_names,
                fn_kwargs={"name": files[0], "text_field": spec.text_field, "messages_field": spec.messages_field,
                           "on_bad_record": on_bad_record})
        else:
            ds = datasets.IterableDataset.from_generator(
                iter_records, features=_features(),
                gen_kwargs={"files": files, "kind": kind, "text_field": spec.text_field,
                            "messages_field": spec.messages_field, "on_bad_record": on_bad_record})
        self._ds = split_dataset_by_node(ds, rank=dp_rank, world_size=dp_size)
        self.epoch, self._docs_in_epoch = 0, 0
        self._it = iter(self._ds)

    def next_doc(self) -> Document:
        while True:
            try:
                rec = next(self._it)
            except StopIteration:
                if self._docs_in_epoch == 0:
                    raise ValueError(f"source {self.spec.path!r}: no usable document for rank in a whole pass "
                                     f"({self.stats.records} records, {self.stats.bad_records} bad, "
                                     f"{self.stats.filtered_short + self.stats.filtered_long} filtered)") from None
                self.epoch, self._docs_in_epoch = self.epoch + 1, 0
                self._ds.set_epoch(self.epoch)
                self._it = iter(self._ds)
                continue
            self.stats.records += 1
            if rec["_error"] is not None:
                self.stats.add_bad(rec["_error"])
                if self.stats.bad_records <= 5:  # the first few in full, then a count every 1000
                    log.warning("source %s: skipped bad record: %s", self.spec.path, rec["_error"])
                elif self.stats.bad_records % 1000 == 0:
                    log.warning("source %s: %d bad records skipped so far", self.spec.path, self.stats.bad_records)
                continue
            ids, mask = tokenize_record(self.tok, rec["text"], rec["messages"])
            if len(ids) < self.spec.min_tokens:
                self.stats.filtered_short += 1
                continue
            if self.spec.max_tokens is not None and len(ids) > self.spec.max_tokens:
                self.stats.filtered_long += 1
                continue
            self.stats.documents += 1
            self.stats.tokens += len(ids)
            self._docs_in_epoch += 1
            return to_document(ids, mask, self.index)

    def state_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"kind": "stream", "epoch": self.epoch, "docs_in_epoch": self._docs_in_epoch,
                "hf": copy.deepcopy(self._ds.state_dict()),
                "stats": [s.records, s.documents, s.tokens, s.bad_records, s.filtered_short, s.filtered_long]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") != "stream":
            raise ValueError(f"source {self.spec.path!r}: saved loader state is not of a streaming source")
        self.epoch, self._docs_in_epoch = sd["epoch"], sd["docs_in_epoch"]
        self._ds.set_epoch(self.epoch)
        self._ds.load_state_dict(copy.deepcopy(sd["hf"]))
        s = self.stats
        s.records, s.documents, s.tokens, s.bad_records, s.filtered_short, s.filtered_long = sd["stats"]
        self._it = iter(self._ds)


class SyntheticSource:
    """Synthetic task documents (atomic: never cut), the k-th drawn from its own seed."""

    def __init__(self, spec: SourceSpec, index: int, tok: Tokenizer, seed: int, dp_rank: int, capacity: int):
        self.spec, self.index, self.tok, self.seed, self.dp_rank = spec, index, tok, seed, dp_rank
        self.task = spec.path.split(":", 1)[1]
        if self.task not in SYNTHETIC_OPTIONS:
            raise ValueError(f"unknown synthetic task {self.task!r} in {spec.path!r}; valid: "
                             f"{', '.join('synthetic:' + t for t in SYNTHETIC_OPTIONS)}")
        unknown = set(spec.options) - set(SYNTHETIC_OPTIONS[self.task])
        if unknown:
            raise ValueError(f"source {spec.path!r}: unknown option(s) {sorted(unknown)}; valid: "
                             f"{sorted(SYNTHETIC_OPTIONS[self.task])}")
        if spec.min_tokens or spec.max_tokens is not None or spec.upsample_long is not None or spec.streaming:
            raise ValueError(f"source {spec.path!r}: min_tokens/max_tokens/upsample_long/streaming do not apply "
                             "to synthetic sources; set options.length")
        self.opts = {**SYNTHETIC_OPTIONS[self.task], **spec.options}
        self.length = self.opts.pop("length") or capacity
        if not 0 < self.length <= capacity:
            raise ValueError(f"source {spec.path!r}: options.length={self.length} must be in 1..{capacity} "
                             "(the document tokens of one sequence)")
        self.loss_on = self.opts.pop("loss_on")
        if self.loss_on not in ("all", "answer"):
            raise ValueError(f"source {spec.path!r}: options.loss_on must be 'all' or 'answer', got {self.loss_on!r}")
        self.k = 0
        self.stats = SourceStats(spec.path)
        self.next_doc()  # fail now, not mid-training, if the length is too short for the task
        self.k = 0
        self.stats = SourceStats(spec.path)

    def next_doc(self) -> Document:
        # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
        rng = random.Random(f"{self.seed}/{self.index}/{self.dp_rank}/{self.k}")
        self.k += 1
        opts = dict(self.opts)
        match self.task:
            case "passkey":
                depth = opts.pop("depth")
                s = passkey_sample(self.tok, self.length, rng.random() if depth is None else depth, rng, **opts)
            case "needle":
                depth = opts.pop("depth")
                s = needle_sample(self.tok, self.length, rng.random() if depth is None else depth, rng, **opts)
            case "shuffled_chunks":
                s = shuffled_chunks_sample(self.tok, self.length, rng, **opts)
            case "variable_tracking":
                depth = opts.pop("depth")
                s = variable_tracking_sample(self.tok, self.length, rng.random() if depth is None else depth, rng,
                                             **opts)
            case "common_words":
                s = common_words_sample(self.tok, self.length, rng, **opts)
            case _:
                raise AssertionError(self.task)
        mask = None
        if self.loss_on == "answer":
            mask = np.zeros(len(s.input_ids), dtype=bool)
            mask[s.answer_start:] = True
        self.stats.documents += 1
        self.stats.tokens += len(s.input_ids)
        return Document(np.asarray(s.input_ids, dtype=np.int64), mask, atomic=True, source=self.index)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "k": self.k}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") != "synthetic":
            raise ValueError(f"source {self.spec.path!r}: saved loader state is not of a synthetic source")
        self.k = sd["k"]

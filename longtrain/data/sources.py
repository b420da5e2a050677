"""Data sources: local files and saved datasets through Hugging Face `datasets`, tokenized and cached.

A source is described by a `SourceSpec` (recipe keys map 1:1 onto its fields). Files are read by one record
reader (`iter_records`) that knows the file and line/row of every record, so a bad record is either a
`BadRecordError` naming them (`on_bad_record="error"`) or skipped and counted (`"skip"`); nothing is dropped
silently. Map-style sources are written once to Arrow by `datasets` (memory-mapped, cached by fingerprint),
tokenized with `Dataset.map` (cached too), length-filtered and kept as token ids; streaming sources
(`streaming=True`) read and tokenize lazily for corpora larger than RAM or disk cache.

Paths: a .jsonl / .json (one JSON object per line), .parquet or .txt / .md file (one document per file), a glob,
a directory of such files, a directory written by `Dataset.save_to_disk`, "builtin:tiny" (the bundled corpus),
"builtin:tiny_chat" (bundled chat, `messages_field="messages"`), "builtin:stdlib" (the Python standard library's
source files) or "synthetic:<task>" (see `longtrain.data.loader`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from longtrain.data.corpus import TINY_CHAT, TINY_CORPUS
from longtrain.data.pack import Document
from longtrain.data.tokenizer import Tokenizer

log = logging.getLogger("longtrain.data")

ON_BAD_RECORD = ("error", "skip")
_TEXT_EXT = (".txt", ".md", ".text", ".py", ".rst")
_JSONL_EXT = (".jsonl", ".json")
_PARQUET_EXT = (".parquet",)
PIPELINE_VERSION = 1  # part of every cache fingerprint; bump when tokenization below changes


class BadRecordError(ValueError):
    """A record that cannot be used, naming its file and line (JSONL) or row (Parquet, saved datasets)."""


@dataclass
class SourceSpec:
    """One source of a mixture (recipe `data.sources[i]`).

    Attributes:
        path: file, glob, directory, saved dataset dir, "builtin:<name>" or "synthetic:<task>".
        text_field: field holding the document text.
        messages_field: field holding a chat `messages` list instead of text (prompt tokens get label -100).
        weight: share of the mixture's tokens (normalised over sources).
        min_tokens: drop documents shorter than this many tokens (counted as filtered).
        max_tokens: drop documents longer than this (None: no limit).
        upsample_long: documents with at least this many tokens are repeated `upsample_factor` times per epoch
            (long-document upsampling, as in ProLong / Fu et al. 2024, arXiv:2402.10171); None: off.
        upsample_factor: expected copies of a long document per epoch (the fraction is drawn per document).
        split: split of a saved DatasetDict.
        streaming: read lazily (no up-front tokenization; no upsampling, no shuffling).
        options: task options of synthetic sources (see `loader.SYNTHETIC_OPTIONS`).
    """

    path: str
    text_field: str = "text"
    messages_field: str | None = None
    weight: float = 1.0
    min_tokens: int | None = 0
    max_tokens: int | None = None
    upsample_long: int | None = None
    upsample_factor: float = 2.0
    split: str = "train"
    streaming: bool = False
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.path:
            raise ValueError("SourceSpec.path is empty")
        if not self.weight > 0:
            raise ValueError(f"source {self.path!r}: weight must be > 0, got {self.weight}")
        self.min_tokens = self.min_tokens or 0
        if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens < max(1, self.min_tokens)):
            raise ValueError(f"source {self.path!r}: need 0 <= min_tokens <= max_tokens, got "
                             f"min_tokens={self.min_tokens}, max_tokens={self.max_tokens}")
        if self.upsample_long is not None and (self.upsample_long < 1 or self.upsample_factor < 1.0):
            raise ValueError(f"source {self.path!r}: upsample_long must be >= 1 and upsample_factor >= 1.0, got "
                             f"{self.upsample_long}, {self.upsample_factor}")
        if self.streaming and self.upsample_long is not None:
            raise NotImplementedError(f"source {self.path!r}: upsample_long needs document lengths up front; "
                                      "it is not supported with streaming=True")
        if self.options and not self.path.startswith("synthetic:"):
            raise ValueError(f"source {self.path!r}: options are for synthetic:<task> sources only")

    @property
    def is_synthetic(self) -> bool:
        return self.path.startswith("synthetic:")


@dataclass
class SourceStats:
    """What happened to a source's records (logged when the source is prepared)."""

    path: str
    records: int = 0  # records read (good and bad)
    documents: int = 0  # usable documents after filters
    tokens: int = 0  # tokens of the usable documents (map-style: total; streaming: read so far)
    bad_records: int = 0  # skipped with on_bad_record="skip"
    filtered_short: int = 0
    filtered_long: int = 0
    bad_examples: list[str] = field(default_factory=list)  # the first few reasons, "file:line: why"

    def add_bad(self, reason: str) -> None:
        self.bad_records += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(reason)


def resolve_files(spec: SourceSpec) -> tuple[str, list[str]]:
    """Which reader and which files a path means.

    Returns:
        (kind, files): kind is "jsonl", "parquet", "text" or "saved" (files = [the directory]).

    Raises:
        ValueError: the path does not exist, matches no file, mixes formats or has an unknown extension.
    """
    path = spec.path
    match path:
        case "builtin:tiny":
            return "jsonl", [str(TINY_CORPUS)]
        case "builtin:tiny_chat":
            return "jsonl", [str(TINY_CHAT)]
        case "builtin:stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            files = sorted(str(p) for p in root.glob("*.py"))  # top level only: deterministic and ~10 MB
            return "text", files
        case _ if path.startswith("builtin:"):
            raise ValueError(f"unknown builtin source {path!r}; valid: builtin:tiny, builtin:tiny_chat, "
                             "builtin:stdlib")
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise ValueError(f"source {path!r}: the pattern matches no file")
    elif not os.path.exists(path):
        raise ValueError(f"source {path!r} does not exist")
    elif os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            return "saved", [path]
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"source {path!r} is an empty directory")
    else:
        files = [path]
    kinds = {_kind_of(f) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"source {path!r} mixes file formats {sorted(kinds)}; use one source per format")
    return kinds.pop(), files


def _kind_of(file: str) -> str:
    low = file.lower()
    if low.endswith(_JSONL_EXT):
        return "jsonl"
    if low.endswith(_PARQUET_EXT):
        return "parquet"
    if low.endswith(_TEXT_EXT):
        return "text"
    raise ValueError(f"file {file!r}: unknown format; supported: {', '.join(_JSONL_EXT + _PARQUET_EXT + _TEXT_EXT)}"
                     " or a directory written by datasets' save_to_disk")


def _record(text: str | None, messages: str | None, file: str, line: int, error: str | None) -> dict[str, Any]:
    return {"text": text, "messages": messages, "_file": file, "_line": line, "_error": error}


def check_value(row: dict, text_field: str, messages_field: str | None,
                where: str) -> tuple[str | None, str | None, str | None]:
    """Validate one decoded record.

    Args:
        row: the record.
        text_field: its text field (used when messages_field is None).
        messages_field: its chat messages field, or None.
        where: "file:line" or "file row i", for the error message.

    Returns:
        (text, messages as JSON, None) for a usable record, (None, None, reason) for a bad one.
    """
    name = messages_field or text_field
    if name not in row:
        return None, None, f"{where}: missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})"
    value = row[name]
    if messages_field is not None:
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            return None, None, (f"{where}: field {name!r} must be a non-empty list of {{role, content}} string "
                                f"dicts, got {str(value)[:80]!r}")
        return None, json.dumps(value), None
    if not isinstance(value, str):
        return None, None, f"{where}: field {name!r} must be a string, got {type(value).__name__}"
    if not value:
        return None, None, f"{where}: zero-length document in field {name!r}"
    return value, None, None


def iter_records(files: list[str], kind: str, text_field: str, messages_field: str | None,
                 on_bad_record: str, fingerprint: str = "") -> Iterator[dict[str, Any]]:
    """Yield normalised records {text, messages, _file, _line, _error} of the files, in order.

    With on_bad_record="error" the first bad record raises; with "skip" it is yielded with `_error` set (so the
    count survives the `datasets` cache) and counted by the caller. `fingerprint` only keys the cache.

    Raises:
        BadRecordError: (on "error") an empty file, invalid UTF-8, a corrupt JSON line, a missing or non-string
            field or a zero-length document, naming file and line (1-based) or row (0-based).
    """
    def bad(msg: str) -> dict[str, Any]:
        if on_bad_record == "error":
            raise BadRecordError(msg + " (set data.on_bad_record=skip to skip and count such records)")
        return _record(None, None, file, line, msg)

    for file in files:
        line = 0
        match kind:
            case "jsonl":
                n_records = 0
                with open(file, "rb") as f:
                    for line, raw in enumerate(f, start=1):
                        if not raw.strip():
                            continue  # blank lines separate nothing in JSONL; they are not records
                        if n_records == 0 and raw.lstrip().startswith(b"["):
                            raise ValueError(f"{file}:{line}: a JSON array, not JSON Lines; write one JSON object "
                                             "per line (e.g. datasets.Dataset.to_json(path, lines=True))")
                        n_records += 1
                        try:
                            s = raw.decode("utf-8")
                        except UnicodeDecodeError as e:
                            yield bad(f"{file}:{line}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
                            continue
                        try:
                            row = json.loads(s)
                        except json.JSONDecodeError as e:
                            yield bad(f"{file}:{line}: corrupt JSON ({e.msg} at column {e.colno})")
                            continue
                        if not isinstance(row, dict):
                            yield bad(f"{file}:{line}: expected a JSON object, got {type(row).__name__}")
                            continue
                        text, messages, err = check_value(row, text_field, messages_field, f"{file}:{line}")
                        yield bad(err) if err else _record(text, messages, file, line, None)
                if n_records == 0:
                    yield bad(f"{file}: empty file (no records)")
            case "text":
                if messages_field is not None:
                    raise ValueError(f"{file}: a plain text file has no {messages_field!r} field")
                data = Path(file).read_bytes()
                if not data:
                    yield bad(f"{file}: empty file")
                    continue
                try:
                    yield _record(data.decode("utf-8"), None, file, 1, None)
                except UnicodeDecodeError as e:
                    line = data[: e.start].count(b"\n") + 1
                    yield bad(f"{file}:{line}: not valid UTF-8 ({e.reason} at byte {e.start} of the file)")
            case "parquet":
                import pyarrow.parquet as pq

                try:
                    pf = pq.ParquetFile(file)
                except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a corrupt file
                    raise ValueError(f"{file}: not a readable Parquet file ({e})") from e
                name = messages_field or text_field
                if name not in pf.schema_arrow.names:
                    raise ValueError(f"{file}: missing column {name!r} (columns: {', '.join(pf.schema_arrow.names)})")
                if pf.metadata.num_rows == 0:
                    yield bad(f"{file}: empty file (no rows)")
                row_i = 0
                for rb in pf.iter_batches(columns=[name], batch_size=4096):
                    for value in rb.column(0).to_pylist():
                        line = row_i
                        text, messages, err = check_value({name: value}, text_field, messages_field,
                                                           f"{file} row {row_i}")
                        yield bad(err) if err else _record(text, messages, file, row_i, None)
                        row_i += 1
            case _:
                raise AssertionError(kind)


def file_signature(files: list[str]) -> str:
    """A cache key of the files' paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenize_record(tok: Tokenizer, text: str | None, messages: str | None) -> tuple[list[int], list[int]]:
    """Token ids of one document with BOS (if the model wants it) and EOS, and its loss mask.

    Returns:
        (ids, loss_mask): loss_mask is [] when every token is a target (text), else one 0/1 per id (chat: only
        assistant tokens are targets).
    """
    bos = [tok.bos_id] if tok.add_bos else []
    if messages is None:
        return bos + tok.encode(text) + [tok.eos_id], []
    segments = tok.apply_chat_template(json.loads(messages))
    ids: list[int] = []
    mask: list[int] = []
    if tok.add_bos and segments and segments[0][0][:1] != [tok.bos_id]:
        ids, mask = [tok.bos_id], [0]
    for seg, trainable in segments:
        ids += seg
        mask += [int(trainable)] * len(seg)
    if ids[-1] != tok.eos_id:
        ids.append(tok.eos_id)
        mask.append(mask[-1])  # the end of a conversation is a target iff its last turn is
    return ids, mask


def to_document(ids: Any, mask: Any, source: int) -> Document:
    """A packer Document from token ids and a loss mask ([] = every token is a target)."""
    ids = np.asarray(ids, dtype=np.int64)
    return Document(ids, None if len(mask) == 0 else np.asarray(mask, dtype=bool), source=source)

"""Packing documents into fixed-length training sequences with document ids and rotary positions.

Documents are laid end to end (greedy, no padding) and cut at sequence boundaries: the rest of a cut document
opens the next sequence. Atomic documents (synthetic tasks, whose question must stay with its context) are never
cut: one that does not fit in the room left closes the sequence with padding and opens the next one.

Positions (`mode`), with the mask always following the documents (doc_ids):
* `continuous`: positions run 0..seq_len-1 across the packed documents (ProLong, arXiv:2410.02660; the
  AnchorAttention paper's default);
* `reset`: positions restart at 0 for every document (segment) in the sequence;
* `anchor`: AnchorAttention (arXiv:2411.13476): token 0 is a shared anchor (BOS, or EOS for tokenizers
  without BOS) at position 0 with doc id ANCHOR_DOC, visible to every document; positions run continuously.

Labels are pre-shifted: labels[t] = input_ids[t+1] when token t+1 is in the same document segment and is
trainable (chat prompts are not); -100 at every document boundary, at the end of each sequence and on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.types import ANCHOR_DOC

PACKING_MODES = ("continuous", "reset", "anchor")


@dataclass
class Document:
    """A tokenized document, BOS/EOS already in place."""

    ids: np.ndarray  # (n,) int64 token ids
    loss_mask: np.ndarray | None = None  # (n,) bool: token is a training target; None = every token
    atomic: bool = False  # never cut across sequences (synthetic tasks)
    source: int = 0  # index of the source it came from (mixture accounting)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PackedRow:
    """One packed sequence; all arrays (seq_len,) int64."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray


def check_mode(mode: str) -> None:
    """Raises ValueError listing the valid modes for an unknown packing `mode`."""
    match mode:
        case "continuous" | "reset" | "anchor":
            return
        case _:
            raise ValueError(f"unknown packing mode {mode!r}; valid: {', '.join(PACKING_MODES)}")


class Packer:
    """Builds sequences one at a time from a document supplier; `carry` is the unfinished document.

    Args:
        seq_len: tokens per sequence.
        mode: "continuous", "reset" or "anchor".
        pad_id: token id of padding (only used before an atomic document that does not fit).
        anchor_id: token id of the anchor (mode "anchor" only).

    Raises:
        ValueError: unknown mode, seq_len too small, or anchor mode without an anchor id.
    """

    def __init__(self, seq_len: int, mode: str, pad_id: int, anchor_id: int | None = None):
        check_mode(mode)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if mode == "anchor" and anchor_id is None:
            raise ValueError("packing mode 'anchor' needs an anchor token id (the tokenizer's BOS or EOS)")
        self.seq_len = seq_len
        self.mode = mode
        self.pad_id = pad_id
        self.anchor_id = anchor_id
        self.carry: Document | None = None

    @property
    def capacity(self) -> int:
        """Document tokens per sequence (seq_len minus the anchor)."""
        return self.seq_len - (1 if self.mode == "anchor" else 0)

    def next_row(self, next_doc: Callable[[], Document]) -> PackedRow:
        """Fill one sequence from the carried-over document, then from `next_doc()`.

        Raises:
            ValueError: an atomic document is longer than the capacity.
        """
        segments: list[Document] = []
        fill = 0
        cap = self.capacity
        while fill < cap:
            doc = self.carry if self.carry is not None else next_doc()
            self.carry = None
            room = cap - fill
            if len(doc) == 0:
                continue
            if len(doc) <= room:
                segments.append(doc)
                fill += len(doc)
            elif doc.atomic:
                if len(doc) > cap:
                    raise ValueError(f"an atomic (synthetic) document of {len(doc)} tokens cannot fit a sequence "
                                     f"of {cap} document tokens; generate it shorter")
                self.carry = doc  # starts the next sequence; pad the rest of this one
                segments.append(Document(np.full(room, self.pad_id, dtype=np.int64),
                                         np.zeros(room, dtype=bool), source=-1))
                fill = cap
            else:
                segments.append(Document(doc.ids[:room], None if doc.loss_mask is None else doc.loss_mask[:room],
                                         source=doc.source))
                self.carry = Document(doc.ids[room:], None if doc.loss_mask is None else doc.loss_mask[room:],
                                      source=doc.source)
                fill = cap
        return self._layout(segments)

    def _layout(self, segments: list[Document]) -> PackedRow:
        ids, labels, pos, docs = [], [], [], []
        if self.mode == "anchor":
            ids.append(np.array([self.anchor_id], dtype=np.int64))
            labels.append(np.array([IGNORE_INDEX], dtype=np.int64))  # the anchor predicts nothing
            docs.append(np.array([ANCHOR_DOC], dtype=np.int64))
        for d, seg in enumerate(segments):
            n = len(seg)
            lab = np.full(n, IGNORE_INDEX, dtype=np.int64)
            lab[:-1] = seg.ids[1:]  # (n-1,) next token within the segment; the last one crosses a boundary
            if seg.loss_mask is not None:
                lab[:-1][~seg.loss_mask[1:]] = IGNORE_INDEX  # targets that are prompt / padding
            ids.append(seg.ids.astype(np.int64, copy=False))
            labels.append(lab)
            docs.append(np.full(n, d, dtype=np.int64))
            if self.mode == "reset":
                pos.append(np.arange(n, dtype=np.int64))
        input_ids = np.concatenate(ids)
        if self.mode == "reset":
            position_ids = np.concatenate(pos)
        else:  # continuous and anchor: one running position, the anchor at 0
            position_ids = np.arange(self.seq_len, dtype=np.int64)
        row = PackedRow(input_ids, np.concatenate(labels), position_ids, np.concatenate(docs))
        assert len(row.input_ids) == self.seq_len, (len(row.input_ids), self.seq_len)
        return row


def pack_documents(docs: Iterable[Document], seq_len: int, mode: str, pad_id: int,
                   anchor_id: int | None = None, drop_last: bool = False) -> Iterator[PackedRow]:
    """Pack a finite stream of documents into rows (the last row is padded unless `drop_last`).

    Args:
        docs: documents in order.
        seq_len: tokens per row.
        mode: "continuous", "reset" or "anchor".
        pad_id: padding token id (padding has its own doc id, positions and labels -100).
        anchor_id: anchor token id for mode "anchor".
        drop_last: drop the final, partly filled row instead of padding it.

    Yields:
        PackedRow of length seq_len.
    """
    packer = Packer(seq_len, mode, pad_id, anchor_id)
    it = iter(docs)
    done = False

    def supply() -> Document:
        nonlocal done
        doc = next(it, None)
        if doc is None:
            done = True
            # The tail: an atomic padding document closes the last row.
            return Document(np.full(packer.capacity, pad_id, dtype=np.int64), np.zeros(packer.capacity, bool),
                            source=-1)
        return doc

    while not done:
        if packer.carry is None:
            first = next(it, None)
            if first is None:
                return
            packer.carry = first
        row = packer.next_row(supply)
        if done and drop_last:
            return
        yield row


def rows_to_batch(rows: list[PackedRow]) -> Batch:
    """Stack rows into a Batch of shape (len(rows), seq_len)."""
    stack = lambda name: torch.from_numpy(np.stack([getattr(r, name) for r in rows]))  # (bs, seq_len)
    return Batch(input_ids=stack("input_ids"), labels=stack("labels"), position_ids=stack("position_ids"),
                 doc_ids=stack("doc_ids"))

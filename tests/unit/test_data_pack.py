"""Packing invariants on random document lengths, for every mode, checked against AttnMask.dense()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX
from longtrain.data.pack import Document, Packer, pack_documents, rows_to_batch
from longtrain.kernels.attention import ANCHOR_DOC, AttnMask

PAD, ANCHOR = 7, 3
BASE, STRIDE = 1_000_000, 100_000  # token = BASE + doc * STRIDE + offset: every token names its origin


def _docs(rng: np.random.Generator, n: int, seq_len: int) -> list[Document]:
    docs = []
    for d in range(n):
        # lengths from 1 to 3 sequences: short, exact-fit and longer-than-a-sequence documents all occur
        length = int(rng.choice([1, 2, seq_len - 1, seq_len, seq_len + 1, rng.integers(1, 3 * seq_len)]))
        atomic = bool(rng.random() < 0.2) and length <= seq_len - 1
        mask = None if rng.random() < 0.5 else rng.random(length) < 0.7
        docs.append(Document(BASE + d * STRIDE + np.arange(length, dtype=np.int64), mask, atomic=atomic))
    return docs


def _origin(tok: int) -> tuple[int, int]:
    return (tok - BASE) // STRIDE, (tok - BASE) % STRIDE


@pytest.mark.parametrize("mode", ["continuous", "reset", "anchor"])
@pytest.mark.parametrize("seq_len", [8, 33])
def test_packing_invariants(mode, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _docs(rng, 60, seq_len)
    rows = list(pack_documents(docs, seq_len, mode, PAD, ANCHOR))
    batch = rows_to_batch(rows)
    n_rows = len(rows)
    for name in ("input_ids", "labels", "position_ids", "doc_ids"):
        t = getattr(batch, name)
        assert t.shape == (n_rows, seq_len) and t.dtype == torch.int64, name

    ids, labels, pos, doc_ids = (getattr(batch, n).numpy() for n in ("input_ids", "labels", "position_ids", "doc_ids"))
    # 1. no token lost or duplicated, in order; padding and anchors are the only additions
    real = ids[ids >= BASE]
    assert np.array_equal(real, np.concatenate([d.ids for d in docs]))
    assert set(np.unique(ids[ids < BASE]).tolist()) <= {PAD, ANCHOR}
    if mode == "anchor":
        assert (ids[:, 0] == ANCHOR).all() and (doc_ids[:, 0] == ANCHOR_DOC).all() and (pos[:, 0] == 0).all()
        assert (doc_ids[:, 1:] >= 0).all()
    else:
        assert (ids != ANCHOR).all() and (doc_ids >= 0).all()
    # 2. atomic documents are never cut; padding only appears right before one (or at the very end)
    for d, doc in enumerate(docs):
        where = np.argwhere((ids >= BASE) & ((ids - BASE) // STRIDE == d))
        if doc.atomic:
            assert len(np.unique(where[:, 0])) == 1, f"atomic document {d} was cut"
    # 3. the mask follows the documents: compare AttnMask.dense() with the origins of the tokens
    dense = AttnMask.causal(n_rows, seq_len, "cpu", batch.doc_ids).dense().numpy()  # (rows, s, s)
    for r in range(n_rows):
        origin = [_origin(int(t))[0] if t >= BASE else (-1 if t == ANCHOR and c == 0 and mode == "anchor"
                                                         else f"pad{doc_ids[r, c]}") for c, t in enumerate(ids[r])]
        for i in range(seq_len):
            for j in range(seq_len):
                allowed = j <= i and (origin[i] == origin[j] or origin[j] == -1)
                assert dense[r, i, j] == allowed, (mode, r, i, j, origin[i], origin[j])
    # 4. positions as each mode defines them
    for r in range(n_rows):
        match mode:
            case "continuous" | "anchor":
                assert np.array_equal(pos[r], np.arange(seq_len))
            case "reset":
                starts = np.r_[0, np.nonzero(np.diff(doc_ids[r]))[0] + 1]
                expected = np.arange(seq_len) - starts[np.searchsorted(starts, np.arange(seq_len), side="right") - 1]
                assert np.array_equal(pos[r], expected)
    # 5. labels: the next token of the same document when it is a target; -100 at boundaries and on padding
    masks = {d: doc.loss_mask for d, doc in enumerate(docs)}
    for r in range(n_rows):
        for t in range(seq_len):
            a = int(ids[r, t])
            b = int(ids[r, t + 1]) if t + 1 < seq_len else None
            if a >= BASE and b is not None and b >= BASE and _origin(b)[0] == _origin(a)[0]:
                d, off = _origin(b)
                assert off == _origin(a)[1] + 1
                target = masks[d] is None or masks[d][off]
                assert labels[r, t] == (b if target else IGNORE_INDEX), (r, t)
            else:
                assert labels[r, t] == IGNORE_INDEX, (r, t)


def test_long_documents_are_split_and_rows_full():
    docs = [Document(BASE + np.arange(100))]
    rows = list(pack_documents(docs, 16, "reset", PAD))
    assert len(rows) == 7  # 100 = 6 * 16 + 4: the last row is padded
    assert all(np.array_equal(r.position_ids, np.arange(16)) for r in rows[:6])  # restart per sequence
    assert (rows[-1].input_ids[4:] == PAD).all() and (rows[-1].labels[3:] == IGNORE_INDEX).all()
    assert len(list(pack_documents(docs, 16, "reset", PAD, drop_last=True))) == 6


def test_packer_errors():
    with pytest.raises(ValueError, match="unknown packing mode 'zigzag'; valid: continuous, reset, anchor"):
        Packer(8, "zigzag", PAD)
    with pytest.raises(ValueError, match="anchor token"):
        Packer(8, "anchor", PAD)
    p = Packer(8, "anchor", PAD, ANCHOR)
    with pytest.raises(ValueError, match="atomic .* of 8 tokens cannot fit a sequence of 7"):
        p.next_row(lambda: Document(BASE + np.arange(8), atomic=True))

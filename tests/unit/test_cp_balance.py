"""The balanced (document-aware) context-parallel layout: its invariants and its balance (issue 21)."""

import random

import pytest
import torch

from longtrain.parallel.cp_balance import balanced_pieces, pair_counts, piece_work
from longtrain.parallel.cp_shard import cp_shard_indices, shard_indices
from longtrain.parallel.dims import validate_seq_len

BALANCE_TOL = 0.05  # the target: largest rank's work within 5% of the mean on packed mixtures


def _owner(pieces: list[list[tuple[int, int]]], seqlen: int) -> torch.Tensor:
    owner = torch.full((seqlen,), -1, dtype=torch.int64)
    for r, ranges in enumerate(pieces):
        for a, b in ranges:
            assert (owner[a:b] == -1).all(), "a token placed twice"
            owner[a:b] = r
    assert (owner >= 0).all(), "a token placed nowhere"
    return owner


def _imbalance(doc: list[int], owner: torch.Tensor, world: int, window: int | None = None) -> float:
    work = pair_counts(torch.tensor(doc), owner, world, window).sum(1).double()
    return float(work.max() / work.mean() - 1)


def _lognormal_row(seqlen: int, seed: int) -> list[int]:
    rng, row, d = random.Random(seed), [], 0
    while len(row) < seqlen:
        row += [d] * max(1, int(rng.lognormvariate(5.5, 1.2)))
        d += 1
    return row[:seqlen]


@pytest.mark.parametrize("cp,ulysses", [(2, 1), (4, 1), (8, 1), (4, 2), (8, 4), (4, 4)])
def test_one_document_is_zigzag(cp, ulysses):
    doc = torch.zeros(2, 16 * cp, dtype=torch.int64)
    for r in range(cp):
        zig = cp_shard_indices(16 * cp, r, cp, "zigzag", ulysses)
        for mode in ("balanced", "auto"):
            assert torch.equal(shard_indices(doc, r, cp, mode, ulysses), zig.expand(2, -1)), (mode, r)


def test_pair_counts_match_the_mask():
    # Brute force: pairs (i, j), j <= i, same document (and inside the window), by owner of i and of j.
    doc = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3]
    owner = torch.tensor([0, 1, 1, 0, 2, 2, 1, 0, 0, 2, 1, 1])
    for window in (None, 2):
        want = torch.zeros(3, 3, dtype=torch.int64)
        for i in range(len(doc)):
            for j in range(i + 1):
                if doc[i] == doc[j] and (window is None or i - j < window):
                    want[owner[i], owner[j]] += 1
        assert torch.equal(pair_counts(torch.tensor(doc), owner, 3, window), want)
    assert piece_work(10, 12, 15) == 3 + 4 + 5 and piece_work(0, 0, 6, window=2) == 1 + 2 * 5


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_rows_balance(cp, seed):
    seqlen = 8192
    # A lognormal mix of short documents, and the same with one long document in the middle.
    mixed = _lognormal_row(seqlen // 2, seed)
    long_mix = mixed[:seqlen // 4] + [10_000] * (seqlen // 2) + [d + 20_000 for d in mixed[:seqlen // 4]]
    for row in (_lognormal_row(seqlen, seed), long_mix):
        pieces = balanced_pieces(row, cp)
        assert all(sum(b - a for a, b in p) == seqlen // cp for p in pieces)
        owner = _owner(pieces, seqlen)
        zig = torch.arange(seqlen) // (seqlen // (2 * cp))
        zig = torch.minimum(zig, 2 * cp - 1 - zig)
        assert _imbalance(row, owner, cp) <= BALANCE_TOL, (_imbalance(row, owner, cp), _imbalance(row, zig, cp))


def test_length_a_multiple_of_cp_only():
    # Balanced needs cp shares, not 2*cp chunks: 36 tokens on cp=4 (not a multiple of 8) need no padding.
    assert validate_seq_len(36, 4, "balanced") == 36 and validate_seq_len(36, 4, "zigzag") == 40
    row = [0] * 20 + [1] * 3 + [2] * 13
    pieces = balanced_pieces(row, 4)
    _owner(pieces, 36)
    assert all(sum(b - a for a, b in p) == 9 for p in pieces)
    # Each rank's ranges are sorted and disjoint: runs of consecutive tokens for varlen kernels.
    assert all(p == sorted(p) for p in pieces)


def test_planner_knows_the_layout():
    from longtrain.model.args import model_flavor
    from longtrain.plan.memory import plan_memory

    args = model_flavor("debug")
    # 36 tokens on cp=4: balanced holds 9 a rank; zigzag (and auto) pad to 40 first, 10 a rank.
    assert plan_memory(args, 36, cp=4, cp_layout="balanced").tokens_per_gpu == 9
    assert plan_memory(args, 36, cp=4, cp_layout="zigzag").tokens_per_gpu == 10
    assert plan_memory(args, 36, cp=4, cp_layout="auto").tokens_per_gpu == 10
    with pytest.raises(ValueError, match="cp_layout 'spiral'"):
        plan_memory(args, 36, cp=4, cp_layout="spiral")


def test_recipe_key_and_seq_len_check():
    import sys
    from pathlib import Path

    from longtrain.config import build_recipe
    from longtrain.config_yaml import RecipeError

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.golden.cases import BASE

    assert build_recipe(BASE, []).parallel.cp_layout == "auto"
    # 162 tokens on cp=2: a multiple of cp (balanced) but not of 2*cp (zigzag, auto).
    ok = build_recipe(BASE, ["parallel.cp=2", "parallel.cp_layout=balanced", "stages[0].seq_len=162"])
    assert ok.parallel.cp_layout == "balanced"
    for layout in ("zigzag", "auto"):
        with pytest.raises(RecipeError, match="multiple of 4"):
            build_recipe(BASE, ["parallel.cp=2", f"parallel.cp_layout={layout}", "stages[0].seq_len=162"])
    with pytest.raises(Exception, match="cp_layout"):
        build_recipe(BASE, ["parallel.cp_layout=spiral"])

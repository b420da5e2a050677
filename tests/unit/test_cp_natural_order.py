"""The natural-order plans of Ulysses and all-gather CP attention (pure functions, no process group):
which permutation they find, when they decline, and the layouts their masks give the local backend."""

import torch

from longtrain.kernels.attention import AttnMask
from longtrain.kernels.attention_layout import classify
from longtrain.parallel.context_parallel import _allgather_plan, _natural_mask, _natural_perm
from longtrain.parallel.cp_shard import cp_shard_indices


def _zigzag_keys(seqlen: int, cp: int, bs: int = 2) -> torch.Tensor:
    """(bs, seqlen) gathered key indices of a zigzag-sharded sequence, in rank order."""
    return torch.cat([cp_shard_indices(seqlen, r, cp, "zigzag") for r in range(cp)]).expand(bs, -1)


def test_natural_perm():
    keys = _zigzag_keys(16, 2)  # 0..3, 12..15, 4..11
    perm = _natural_perm(keys)
    assert torch.equal(keys[0][perm], torch.arange(16))
    assert _natural_perm(torch.stack([keys[0], keys[0].flip(0)])) is None  # rows differ: no shared perm
    assert _natural_perm(torch.tensor([[0, 2, 3, 4]])) is None  # a gap
    assert _natural_perm(torch.tensor([[0, 1, 1, 3]])) is None  # a repeat


def test_allgather_plan_zigzag_pieces():
    keys = _zigzag_keys(32, 4)
    local = cp_shard_indices(32, 1, 4, "zigzag").expand(2, -1)  # rank 1 of 4: 4..7, 24..27
    plan = _allgather_plan(AttnMask(local, local, contiguous=False), keys, None)
    assert [(p.rows, p.start) for p in plan.pieces] == [(slice(0, 4), 4), (slice(4, 8), 24)]
    for p in plan.pieces:
        n = p.rows.stop - p.rows.start
        assert classify(p.diag, n, n).kind == "causal"
        assert classify(p.past, n, p.start).kind == "full"
    local0 = cp_shard_indices(32, 0, 4, "zigzag").expand(2, -1)  # rank 0: 0..3 (no past), 28..31
    plan0 = _allgather_plan(AttnMask(local0, local0, contiguous=False), keys, None)
    assert plan0.pieces[0].past is None and plan0.pieces[1].start == 28
    # cp=2, rank 1 holds chunks 1 and 2: one run 4..11.
    keys2 = _zigzag_keys(16, 2)
    local2 = cp_shard_indices(16, 1, 2, "zigzag").expand(2, -1)
    plan2 = _allgather_plan(AttnMask(local2, local2, contiguous=False), keys2, None)
    assert [(p.rows, p.start) for p in plan2.pieces] == [(slice(0, 8), 4)]
    # One document per row (what local_attn_mask gives an unpadded one-document batch) is no document.
    doc = torch.zeros_like(local)
    assert _allgather_plan(AttnMask(local, local, doc, doc, contiguous=False), keys, torch.zeros_like(keys))


def test_allgather_plan_declines():
    keys = _zigzag_keys(16, 2)
    local = cp_shard_indices(16, 1, 2, "zigzag").expand(2, -1)
    docs = (keys >= 6).long()  # two documents: "full" has no documents
    assert _allgather_plan(AttnMask(local, local, (local >= 6).long(), (local >= 6).long()), keys, docs) is None
    assert _allgather_plan(AttnMask(local, local, window=4), keys, None) is None
    assert _allgather_plan(AttnMask(local, local), keys[:, :-1], None) is None  # not the whole sequence


def test_natural_mask_layouts():
    keys = _zigzag_keys(16, 2)
    docs = (keys >= 6).long()
    perm, inv, nat = _natural_mask(AttnMask(keys, keys, docs, docs, window=5, contiguous=False))
    assert torch.equal(keys[0][perm], torch.arange(16)) and torch.equal(perm[inv], torch.arange(16))
    assert nat.contiguous and nat.window == 5 and torch.equal(nat.q_doc, docs[:, perm])
    assert classify(nat, 16, 16).kind == "varlen"
    one = torch.zeros_like(keys)
    perm, _, nat = _natural_mask(AttnMask(keys, keys, one, one, contiguous=False))
    assert nat.q_doc is None and classify(nat, 16, 16).kind == "causal"
    natural = torch.arange(16).expand(2, -1)  # already natural (Ulysses sharding): nothing to permute
    perm, inv, nat = _natural_mask(AttnMask(natural, natural, one, one, contiguous=False))
    assert perm is None and inv is None and classify(nat, 16, 16).kind == "causal"
    assert _natural_mask(AttnMask(keys, keys.flip(1), contiguous=False)) is None  # not self-attention order

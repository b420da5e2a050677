"""prepare_cp_inputs / ParallelDims invariants (pure functions, no processes)."""

import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.parallel.cp_shard import cp_shard_indices, local_attn_mask, prepare_cp_inputs
from longtrain.parallel.dims import ParallelDims, validate_seq_len
from longtrain.trainer.check_parallel import make_packed_batches


def _batch(seqlen: int = 37, bs: int = 2) -> Batch:
    return make_packed_batches(1, bs, seqlen, vocab_size=100, seed=3)[0]


@pytest.mark.parametrize("cp,mode,ulysses", [(2, "zigzag", 1), (4, "zigzag", 1), (3, "contiguous", 1),
                                             (4, "zigzag", 2), (4, "contiguous", 2), (2, "zigzag", 2)])
def test_union_over_ranks_is_the_global_batch(cp, mode, ulysses):
    batch = _batch()
    seqlen = batch.input_ids.shape[1]
    shards = [prepare_cp_inputs(batch, r, cp, mode, ulysses) for r in range(cp)]
    assert len({s.input_ids.shape for s in shards}) == 1
    index = torch.cat([s.seq_index for s in shards], dim=1)  # (bs, padded)
    padded = index.shape[1]
    assert padded % (2 * cp if mode == "zigzag" else cp) == 0 and padded - seqlen < (2 * cp)
    # Every global position appears exactly once.
    assert torch.equal(index.sort(dim=1).values, torch.arange(padded).expand_as(index))
    for name in ("input_ids", "labels", "position_ids", "doc_ids"):
        glob = torch.cat([getattr(s, name) for s in shards], dim=1)
        restored = torch.empty_like(glob).scatter_(1, index, glob)
        # Real tokens are the global ones, positions included (global, never local).
        assert torch.equal(restored[:, :seqlen], getattr(batch, name)), name
    for s in shards:
        assert s.position_ids.dtype == torch.int64 and s.seq_index.dtype == torch.int64
        pad = s.seq_index >= seqlen
        assert (s.labels[pad] == IGNORE_INDEX).all()
        # The padding document is a fresh id: no real token of the row shares it (masks are per row).
        for row in range(batch.input_ids.shape[0]):
            assert not set(s.doc_ids[row][pad[row]].tolist()) & set(batch.doc_ids[row].tolist())


def test_zigzag_chunks():
    # cp=2, 8 tokens -> 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_shard_indices(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert cp_shard_indices(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    # Hybrid (ring 2 x ulysses 2): a ring rank's Ulysses ranks split its zigzag pair, so after the
    # all-to-all (rank order) the ring rank holds exactly chunks r and 2R-1-r.
    pieces = [cp_shard_indices(16, r, 4, "zigzag", ulysses=2).tolist() for r in range(4)]
    assert pieces[0] + pieces[1] == [0, 1, 2, 3, 12, 13, 14, 15]
    assert pieces[2] + pieces[3] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert cp_shard_indices(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


def test_local_mask_carries_global_metadata():
    batch = _batch()
    local = prepare_cp_inputs(batch, 1, 2, "zigzag")
    mask = local_attn_mask(local, window=5)
    assert mask.q_index is local.seq_index and mask.k_doc is local.doc_ids
    assert not mask.contiguous and mask.window == 5
    full = local_attn_mask(batch)
    assert full.contiguous and torch.equal(full.q_index[0], torch.arange(batch.input_ids.shape[1]))


def test_bad_inputs_raise():
    batch = _batch()
    local = prepare_cp_inputs(batch, 0, 2)
    with pytest.raises(ValueError, match="already sharded"):
        prepare_cp_inputs(local, 0, 2)
    with pytest.raises(ValueError, match="cp_rank=2"):
        prepare_cp_inputs(batch, 2, 2)
    with pytest.raises(ValueError, match="unknown cp layout 'spiral'.*zigzag, contiguous"):
        prepare_cp_inputs(batch, 0, 2, "spiral")
    with pytest.raises(ValueError, match="seq_len=5 is shorter than the 8 chunks"):
        validate_seq_len(5, 4, "zigzag")
    assert validate_seq_len(37, 4, "zigzag") == 40 and validate_seq_len(37, 4, "contiguous") == 40


def test_parallel_dims():
    d = ParallelDims(dp_replicate=2, dp_shard=-1, cp=4, ulysses=2, world_size=16)
    assert (d.dp_shard, d.ring, d.dp) == (2, 2, 4)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by dp_replicate x cp = 1 x 4"):
        ParallelDims(cp=4, world_size=6)
    with pytest.raises(ValueError, match=r"1 x 2 x 2 = 4 != world size 8.*dp_shard=-1"):
        ParallelDims(dp_shard=2, cp=2, world_size=8)
    with pytest.raises(ValueError, match=r"cp=4 must be a multiple of ulysses=3.*\[1, 2, 4\]"):
        ParallelDims(cp=4, ulysses=3, world_size=4)
    with pytest.raises(ValueError, match="dp_shard=0"):
        ParallelDims(dp_shard=0, world_size=1)

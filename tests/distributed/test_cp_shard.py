"""prepare_cp_inputs / ParallelDims invariants (pure functions, no processes)."""

import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.parallel.cp_shard import cp_shard_indices, local_attn_mask, prepare_cp_inputs
from longtrain.parallel.dims import ParallelDims, validate_seq_len
from longtrain.parallel.cp_shard import make_packed_batches


def _batch(seqlen: int = 37, bs: int = 2) -> Batch:
    return make_packed_batches(1, bs, seqlen, vocab_size=100, seed=3)[0]


@pytest.mark.parametrize("cp,mode,ulysses", [(2, "zigzag", 1), (4, "zigzag", 1), (3, "contiguous", 1),
                                             (4, "zigzag", 2), (4, "contiguous", 2), (2, "zigzag", 2),
                                             (2, "balanced", 1), (4, "balanced", 1), (3, "balanced", 1),
                                             (4, "balanced", 2), (4, "auto", 1), (4, "auto", 2)])
def test_union_over_ranks_is_the_global_batch(cp, mode, ulysses):
    batch = _batch()
    seqlen = batch.input_ids.shape[1]
    shards = [prepare_cp_inputs(batch, r, cp, mode, ulysses) for r in range(cp)]
    assert len({s.input_ids.shape for s in shards}) == 1
    index = torch.cat([s.seq_index for s in shards], dim=1)  # (bs, padded)
    padded = index.shape[1]
    assert padded % (2 * cp if mode in ("zigzag", "auto") else cp) == 0 and padded - seqlen < (2 * cp)
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


@pytest.mark.parametrize("mode,layout,ulysses,window", [("ring", "zigzag", 1, None), ("ring", "contiguous", 1, None),
                                                        ("ring", "zigzag", 1, 7), ("allgather", "zigzag", 1, None),
                                                        ("ulysses", "zigzag", 1, None), ("hybrid", "zigzag", 2, None),
                                                        ("hybrid_allgather", "zigzag", 2, None),
                                                        ("ring", "balanced", 1, None), ("ring", "balanced", 1, 7),
                                                        ("allgather", "balanced", 1, None),
                                                        ("hybrid", "balanced", 2, None), ("ring", "auto", 1, None)])
def test_local_attention_calls_rebuild_full_attention(mode, layout, ulysses, window):
    """The per-rank calls cp_local_check enumerates, LSE-merged, are exactly full attention (fp32, 1e-5)."""
    from longtrain.kernels.attention import AttnMask, attention_reference
    from longtrain.parallel.cp_local_check import local_attention_calls
    from longtrain.parallel.cp_ops import merge_partials

    batch = _batch(seqlen=45)
    cp, bs, seqlen, h, d = 4, 2, 45, 2, 8
    calls = local_attention_calls(batch, cp, mode, layout, ulysses, window)
    padded = 1 + max(int(c.mask.k_index.max()) for c in calls)
    q, k, v = (torch.randn(bs, padded, h, d) for _ in range(3))
    out = torch.zeros(bs, padded, h, d)
    lse = torch.full((bs, h, padded), float("-inf"))
    for call in calls:
        qi, ki = call.mask.q_index, call.mask.k_index
        take = lambda x, i: torch.stack([x[b, i[b]] for b in range(bs)])  # noqa: E731
        o, l = attention_reference(take(q, qi), take(k, ki), take(v, ki), call.mask, d ** -0.5)
        cur_o, cur_l = take(out, qi), torch.stack([lse[b][:, qi[b]] for b in range(bs)])
        new_o, new_l = merge_partials(cur_o, cur_l, o, l)
        for b in range(bs):
            out[b, qi[b]], lse[b][:, qi[b]] = new_o[b], new_l[b]
    ref_out, ref_lse = attention_reference(q[:, :seqlen], k[:, :seqlen], v[:, :seqlen],
                                           AttnMask.causal(bs, seqlen, "cpu", batch.doc_ids, window), d ** -0.5)
    assert torch.isfinite(lse[..., :seqlen]).all()  # every real query was computed
    assert (out[:, :seqlen] - ref_out).abs().max() / ref_out.abs().max() < 1e-5
    assert (lse[..., :seqlen] - ref_lse).abs().max() / ref_lse.abs().max() < 1e-5
    if mode == "ring" and layout == "zigzag" and window is None:
        # Zigzag balance: every step after the first computes half a block (rows x cols = s*s/2) on every rank.
        s = (padded // cp)
        sizes = {c.what: c.mask.q_index.shape[1] * c.mask.k_index.shape[1] for c in calls if "step 0" not in c.what}
        assert set(sizes.values()) == {s * s // 2}, sizes


def test_cp_local_check_flex_forward_on_cpu():
    """flex_attention (eager on CPU, forward only: no CPU backward) takes every ring block mask of a
    packed zigzag layout and matches the reference within 1e-5 (fp32)."""
    from longtrain.parallel.cp_local_check import check_backend, local_attention_calls

    calls = local_attention_calls(_batch(seqlen=45), 4, "ring", "zigzag")
    rows = check_backend("flex", calls, n_heads=4, n_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                         grad=False)
    assert len(rows) == len(calls) and max(max(r["out"], r["lse"]) for r in rows) < 1e-5, rows

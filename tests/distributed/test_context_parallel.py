"""Context-parallel attention (every mode) and FSDP2 against cp=1 on gloo ranks, fp32.

Each spawn groups several checks (process start-up dominates on 2 cores). The data are packed
multi-document batches (parallel.cp_shard.make_packed_batches): tiny documents, one document spanning every rank,
lengths not divisible by 2*cp.

Tolerance: fp32 throughout; CP changes only the summation order of the attention (LSE merge) and of the
gradient reductions, which moves results by a few ulps (measured ~5e-7 relative), hence 1e-5.
"""

import tempfile

import pytest
import torch
import torch.distributed as dist

from spawn_util import run_ranks

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.kernels.attention import AttnMask, attention_reference
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel.context_parallel import apply_cp, make_cp_attention
from longtrain.parallel.cp_shard import local_attn_mask, make_packed_batches, prepare_cp_inputs
from longtrain.parallel.dims import ParallelDims
from longtrain.trainer.check_parallel import check_parallel
from longtrain.trainer.engine import TorchEngine

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5  # fp32: only reduction order differs from cp=1


def _loss_sum(model, b: Batch):
    """The trainer's token-sum loss of one (possibly cp-sharded) micro-batch."""
    return TorchEngine(model, None).loss_sum(b, local_attn_mask(b), int(b.position_ids.max()) + 1)


def _assert_ok(report, what: str) -> None:
    assert report.ok(FP32_TOL), f"{what}: {report}"
    assert report.n_valid_tokens > 0 and report.grad_norm > 0, what


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _attention_parity(world: int, cases: list[tuple[str, str, int]], n_heads: int = 4, n_kv: int = 2) -> None:
    """Each CP attention's out, lse and dq/dk/dv (through both out and lse) vs the reference on the whole sequence."""
    bs, seqlen, head_dim, scale = 2, 45, 8, 8 ** -0.5
    gen = torch.Generator().manual_seed(0)  # the same global tensors on every rank
    batch = make_packed_batches(1, bs, seqlen, 100, seed=1)[0]
    q = torch.randn(bs, seqlen, n_heads, head_dim, generator=gen)
    k, v = (torch.randn(bs, seqlen, n_kv, head_dim, generator=gen) for _ in range(2))
    w_out = torch.randn(bs, seqlen, n_heads, head_dim, generator=gen)
    w_lse = torch.randn(bs, n_heads, seqlen, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_reference(*leaves, AttnMask.causal(bs, seqlen, "cpu", batch.doc_ids), scale)
    ((out_ref * w_out).sum() + (lse_ref * w_lse).sum()).backward()
    grads_ref = [t.grad for t in leaves]
    for mode, layout, ulysses in cases:
        mesh = ParallelDims(cp=world, ulysses=ulysses, world_size=world).build_mesh("cpu")
        local = prepare_cp_inputs(batch, dist.get_rank(), world, layout, ulysses)
        idx, real = local.seq_index, local.seq_index < seqlen  # (bs, s); padding tokens are not real
        safe = idx.clamp(max=seqlen - 1)

        def take(t: torch.Tensor) -> torch.Tensor:  # (bs, seqlen, h, d) -> this rank's tokens
            return torch.stack([t[b, safe[b]] for b in range(bs)])

        ql, kl, vl = (take(t).requires_grad_() for t in (q, k, v))
        out, lse = make_cp_attention(mode, mesh, attention_reference)(ql, kl, vl, local_attn_mask(local), scale)
        what = f"{mode}/{layout}/ulysses={ulysses}"
        assert _rel(out[real], take(out_ref.detach())[real]) < FP32_TOL, what
        lse_ref_local = torch.stack([lse_ref.detach()[b][:, safe[b]] for b in range(bs)])  # (bs, h, s)
        assert _rel(lse.transpose(1, 2)[real], lse_ref_local.transpose(1, 2)[real]) < FP32_TOL, what
        wl_out = take(w_out) * real[..., None, None]
        wl_lse = torch.stack([w_lse[b][:, safe[b]] for b in range(bs)]) * real[:, None, :]
        ((out * wl_out).sum() + (lse * wl_lse).sum()).backward()
        for name, local_leaf, g_ref in zip("qkv", (ql, kl, vl), grads_ref):
            g = torch.zeros_like(g_ref)
            for b in range(bs):
                g[b].index_add_(0, idx[b][real[b]], local_leaf.grad[b][real[b]])
            dist.all_reduce(g)
            assert _rel(g, g_ref) < FP32_TOL, f"{what} d{name}"


def _world2(rank: int, world: int, tmp: str) -> None:
    _attention_parity(world, [("ring", "zigzag", 1), ("ring", "contiguous", 1), ("allgather", "zigzag", 1),
                              ("ulysses", "zigzag", 2)])
    debug = model_flavor("debug")
    for mode, layout in [("ring", "zigzag"), ("ring", "contiguous"), ("allgather", "zigzag"), ("ulysses", "zigzag")]:
        rep = check_parallel(debug, 37, cp=2, mode=mode, layout=layout, sharding="none", n_batches=2)
        _assert_ok(rep, f"{mode}/{layout}")
    # Sliding window (Mistral): the ring also skips blocks that are entirely out of the window.
    rep = check_parallel(model_flavor("debug", sliding_window=6), 37, cp=2, mode="ring", sharding="none")
    _assert_ok(rep, "ring + window")
    # FSDP2 over dp_shard x cp (here cp only): gradients summed over cp, not averaged; through
    # parallel.apply with full activation checkpointing and a tiled MLP (the trainer's composition).
    rep = check_parallel(debug, 37, cp=2, mode="ring", sharding="fsdp2", bs=2, ac_mode="full", tiled_mlp=8)
    _assert_ok(rep, "ring + fsdp2 + full AC + tiled MLP")

    # A rank with zero valid tokens: only the first 9 labels are valid, all on cp rank 0 (zigzag chunk 0).
    batch = make_packed_batches(1, 1, 37, debug.vocab_size, seed=5)[0]
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[:, :9] = batch.labels[:, :9]
    few = Batch(batch.input_ids, labels, batch.position_ids, batch.doc_ids)
    assert prepare_cp_inputs(few, 1, 2).num_valid_tokens == 0
    for mode in ("ring", "allgather"):
        rep = check_parallel(debug, 37, cp=2, mode=mode, sharding="none", batches=[few])
        _assert_ok(rep, f"zero-token rank, {mode}")
    # No valid token anywhere: loss and gradients are 0, not 0/0.
    none = Batch(batch.input_ids, torch.full_like(labels, IGNORE_INDEX), batch.position_ids, batch.doc_ids)
    rep = check_parallel(debug, 37, cp=2, mode="ring", sharding="fsdp2", batches=[none])
    assert rep.loss == 0.0 and rep.grad_norm == 0.0 and rep.n_valid_tokens == 0, rep

    # The check is sensitive: the same sharded batch WITHOUT the K/V exchange is far off.
    dims = ParallelDims(cp=2, world_size=2)
    mesh = dims.build_mesh("cpu")
    model = Transformer(debug)
    model.init_weights(0)
    data = make_packed_batches(1, 1, 37, debug.vocab_size, seed=0)[0]
    ref = float(_loss_sum(model, data)) / data.num_valid_tokens
    local = prepare_cp_inputs(data, rank, 2)
    got = torch.tensor(float(_loss_sum(model, local)) / data.num_valid_tokens)  # local-only attention
    dist.all_reduce(got)
    assert abs(float(got) - ref) / ref > 1e-3, (float(got), ref)
    apply_cp(model, "ring", mesh, attention_reference)
    got = torch.tensor(float(_loss_sum(model, local)) / data.num_valid_tokens)
    dist.all_reduce(got)
    assert abs(float(got) - ref) / ref < FP32_TOL, (float(got), ref)

    _fsdp_checkpoint_roundtrip(rank, mesh, tmp)


def _fsdp_checkpoint_roundtrip(rank: int, mesh, tmp: str) -> None:
    """model_state_dict -> DCP save -> perturb -> DCP load -> load_model_state_dict restores the weights."""
    import torch.distributed.checkpoint as dcp

    from longtrain.parallel.fsdp import apply_fsdp, load_model_state_dict, model_state_dict

    model = Transformer(model_flavor("debug"))
    model.init_weights(1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    apply_fsdp(model, mesh)
    dcp.save({"model": model_state_dict(model)}, checkpoint_id=f"{tmp}/ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = {"model": model_state_dict(model)}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    load_model_state_dict(model, state["model"])
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), expected[name]), name


def _world4(rank: int, world: int) -> None:
    _attention_parity(world, [("ring", "zigzag", 1), ("allgather", "contiguous", 1), ("ulysses", "zigzag", 4),
                              ("hybrid", "zigzag", 2), ("hybrid_allgather", "zigzag", 2)])
    debug = model_flavor("debug")  # 4 heads, 2 K/V heads: Ulysses over 4 ranks replicates K/V heads
    for mode, ulysses, sharding in [("ring", 1, "none"), ("allgather", 1, "none"), ("ulysses", 4, "none"),
                                    ("hybrid", 2, "fsdp2"), ("hybrid_allgather", 2, "none")]:
        ac = "selective" if sharding == "fsdp2" else "none"  # AC needs parallel.apply (fsdp2)
        rep = check_parallel(debug, 45, cp=4, mode=mode, ulysses=ulysses, sharding=sharding, ac_mode=ac)
        _assert_ok(rep, f"{mode} cp=4")
    # FSDP2 dp_shard=2 x cp=2: different data per dp rank, global token normalisation.
    rep = check_parallel(debug, 45, cp=2, mode="ring", dp_shard=2, sharding="fsdp2")
    _assert_ok(rep, "fsdp2 dp_shard=2 x cp=2")
    # HSDP: dp_replicate=2 x cp=2 (replicas all-reduce, shards reduce-scatter; both sum).
    rep = check_parallel(debug, 45, cp=2, mode="allgather", dp_replicate=2, dp_shard=1, sharding="fsdp2", n_batches=1)
    _assert_ok(rep, "hsdp dp_replicate=2 x cp=2")
    # GQA where n_kv_heads (3) and the Ulysses degree (4) are coprime: K/V heads replicated to lcm = 12.
    gqa = model_flavor("debug", n_heads=12, n_kv_heads=3)
    _assert_ok(check_parallel(gqa, 45, cp=4, mode="ulysses", sharding="none"), "ulysses kv=3 cp=4")
    # n_heads not divisible by the Ulysses degree: a clear error.
    mesh = ParallelDims(cp=4, ulysses=4, world_size=4).build_mesh("cpu")
    with pytest.raises(ValueError, match=r"Ulysses degree 4 must divide n_heads=6"):
        apply_cp(Transformer(model_flavor("debug", n_heads=6, n_kv_heads=2)), "ulysses", mesh, attention_reference)


def test_cp_world2():
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_world2, 2, tmp)


def test_cp_world4():
    run_ranks(_world4, 4)

"""The balanced (document-aware) cp layout against cp=1 on gloo ranks, fp32, every sequence-sharding mode (issue 21).

The data are make_packed_batches' rows (tiny documents shorter than a chunk, one document over every rank,
positions restarting per document in even batches and continuous in odd ones). Lengths: multiples of cp
that are not multiples of 2*cp (the balanced layout needs no padding there), and ragged lengths (padded to
a multiple of cp). Tolerance as tests/distributed/test_context_parallel.py: only summation order differs.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from spawn_util import run_ranks

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.model.args import model_flavor
from longtrain.parallel.cp_shard import make_packed_batches, prepare_cp_inputs
from longtrain.trainer.check_parallel import check_parallel
from test_context_parallel import _attention_parity

pytestmark = pytest.mark.distributed

FP32_TOL = 1e-5  # fp32: only reduction order differs from cp=1
ROOT = Path(__file__).resolve().parents[2]


def _assert_ok(report, what: str) -> None:
    assert report.ok(FP32_TOL), f"{what}: {report}"
    assert report.n_valid_tokens > 0 and report.grad_norm > 0, what


def _one_rank_without_valid_tokens(seqlen: int, cp: int, vocab: int) -> Batch:
    """A packed batch whose valid labels all lie on tokens that the balanced layout gives to cp rank 0."""
    batch = make_packed_batches(1, 1, seqlen, vocab, seed=5)[0]
    mine = prepare_cp_inputs(batch, 0, cp, "balanced").seq_index[0]
    keep = torch.zeros(seqlen, dtype=torch.bool)
    keep[mine[mine < seqlen]] = True
    labels = torch.where(keep[None], batch.labels, torch.full_like(batch.labels, IGNORE_INDEX))
    return Batch(batch.input_ids, labels, batch.position_ids, batch.doc_ids)


def _world2(rank: int, world: int) -> None:
    _attention_parity(world, [("ring", "balanced", 1), ("allgather", "balanced", 1), ("ring", "auto", 1)])
    debug = model_flavor("debug")
    for mode, layout, seqlen in [("ring", "balanced", 38), ("allgather", "balanced", 38), ("ring", "balanced", 37),
                                 ("allgather", "auto", 37)]:
        rep = check_parallel(debug, seqlen, cp=2, mode=mode, layout=layout, sharding="none", n_batches=2)
        _assert_ok(rep, f"{mode}/{layout}/{seqlen}")
    rep = check_parallel(model_flavor("debug", sliding_window=6), 38, cp=2, mode="ring", layout="balanced",
                         sharding="fsdp2")
    _assert_ok(rep, "ring + window + fsdp2, balanced")
    few = _one_rank_without_valid_tokens(38, 2, debug.vocab_size)
    assert prepare_cp_inputs(few, 1, 2, "balanced").num_valid_tokens == 0
    for mode in ("ring", "allgather"):
        rep = check_parallel(debug, 38, cp=2, mode=mode, layout="balanced", sharding="none", batches=[few])
        _assert_ok(rep, f"zero-token rank, {mode}, balanced")


def _world4(rank: int, world: int) -> None:
    _attention_parity(world, [("ring", "balanced", 1), ("allgather", "balanced", 1), ("hybrid", "balanced", 2),
                              ("hybrid_allgather", "balanced", 2), ("ulysses", "balanced", 4)])
    debug = model_flavor("debug")
    for mode, ulysses, sharding, seqlen in [("ring", 1, "none", 44), ("allgather", 1, "fsdp2", 44),
                                            ("hybrid", 2, "none", 45), ("hybrid_allgather", 2, "none", 44),
                                            ("ulysses", 4, "none", 44)]:
        rep = check_parallel(debug, seqlen, cp=4, mode=mode, layout="balanced", ulysses=ulysses, sharding=sharding,
                             bs=2)
        _assert_ok(rep, f"{mode} cp=4 balanced {seqlen}")
    few = _one_rank_without_valid_tokens(44, 4, debug.vocab_size)
    assert all(prepare_cp_inputs(few, r, 4, "balanced").num_valid_tokens == 0 for r in (1, 2, 3))
    rep = check_parallel(debug, 44, cp=4, mode="ring", layout="balanced", sharding="none", batches=[few])
    _assert_ok(rep, "three ranks without valid tokens, ring, balanced")


def test_cp_balanced_world2():
    run_ranks(_world2, 2)


def test_cp_balanced_world4():
    run_ranks(_world4, 4)


def _packed_recipe(run_dir: str, corpus: str, overrides: list[str]):
    """The golden recipe (tests/golden/cases.py) on a corpus of short and long text documents, packed."""
    sys.path.insert(0, str(ROOT))
    from longtrain.config import build_recipe
    from tests.golden.cases import BASE

    base = {**BASE, "data": {"sources": [{"path": corpus}], "packing": "reset", "seed": 7}}
    return build_recipe(base, [f"run_dir={run_dir}", *overrides])


def _write_corpus(path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "key", "value", "long", "short"]
    docs = []
    for i in range(200):
        n = int(torch.randint(2, 60, (1,), generator=rng)) if i % 5 else 150
        docs.append(" ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=rng)))
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _train_rank(rank: int, world: int, run_dir: str, corpus: str, overrides: list[str], out: str) -> None:
    from longtrain.trainer.train import train

    torch.set_num_threads(1)
    result = train(_packed_recipe(run_dir, corpus, overrides))
    if rank == 0:
        Path(out).write_text(json.dumps([result.losses[s] for s in sorted(result.losses)]))


def test_trainer_balanced_matches_cp1(tmp_path):
    """The trainer's path (recipe key -> Layout.cp_layout -> prepare_cp_inputs) on packed documents: cp=2
    ring with the balanced and the auto layout give the cp=1 losses within the fp32 tolerance."""
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus)
    ref = tmp_path / "ref.json"
    run_ranks(_train_rank, 1, str(tmp_path / "ref"), str(corpus), [], str(ref))
    expected = json.loads(ref.read_text())
    for layout in ("balanced", "auto"):
        out = tmp_path / f"{layout}.json"
        run_ranks(_train_rank, 2, str(tmp_path / layout), str(corpus),
                  ["parallel.cp=2", "parallel.cp_mode=ring", f"parallel.cp_layout={layout}"], str(out))
        assert json.loads(out.read_text()) == pytest.approx(expected, rel=FP32_TOL), layout

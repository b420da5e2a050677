"""Resume on another layout (issue 20): DCP reshards model and optimizer, the data keeps the run's layout
(trainer/data_layout.py), so the losses after the resume equal the uninterrupted run's (fp32, gloo)."""

import json
from pathlib import Path

import pytest

from longtrain.config import build_recipe
from longtrain.trainer.train import train

REPO = Path(__file__).resolve().parents[2]
SEQ = 144
RAW = {
    "name": "layouts",
    "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
    "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
    # Two sequences per step whatever the layout: the global batch is the same on every layout tried.
    "train": {"global_batch_tokens": 2 * SEQ, "optimizer": {"lr": 3.0e-3}},
    "logging": {"progress_bar": False, "plot": False},
    "stages": [{"name": "s", "seq_len": SEQ, "steps": 4}],
}
# fp32; another layout sums the same token losses and gradients in another order (ring / FSDP reductions).
REL = 1e-5


def torchrun(tmp_path: Path, run_dir: Path, *overrides: str) -> str:
    from tests.distributed.test_train_torchrun import torchrun as run_torchrun

    return run_torchrun(tmp_path, run_dir, *overrides, raw=RAW)


def in_process(run_dir: Path, *overrides: str):
    return train(build_recipe(RAW, [f"run_dir={run_dir}", *overrides]))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[int, float]:
    return in_process(tmp_path_factory.mktemp("ref") / "run").losses


def assert_continues(run_dir: Path, ref: dict[int, float]) -> None:
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]  # no step logged twice or missing
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=REL), step


@pytest.mark.distributed
def test_world_1_resumes_on_2_data_parallel_ranks(tmp_path, one_process):
    run = tmp_path / "run"
    in_process(run, "train.stop_after_steps=2")
    out = torchrun(tmp_path, run)
    assert "parallel layout: world 1 (dp 1, cp 1) -> world 2 (dp 2, cp 1)" in out
    assert_continues(run, one_process)


@pytest.mark.distributed
def test_cp_2_resumes_in_one_process(tmp_path, one_process):
    run = tmp_path / "run"
    torchrun(tmp_path, run, "parallel.cp=2", "parallel.cp_mode=ring", "train.stop_after_steps=2")
    res = in_process(run)
    assert sorted(res.losses) == [3, 4]
    assert_continues(run, one_process)  # cp=2 reads the data as one process does (dp 1)


@pytest.mark.distributed
def test_dp_2_resumes_as_cp_2(tmp_path):
    torchrun(tmp_path, tmp_path / "ref")  # uninterrupted, dp=2
    run = tmp_path / "run"
    torchrun(tmp_path, run, "train.stop_after_steps=2")
    out = torchrun(tmp_path, run, "parallel.cp=2")
    assert "world 2 (dp 2, cp 1) -> world 2 (dp 1, cp 2)" in out and "2 loader(s)" in out
    assert_continues(run, losses(tmp_path / "ref"))

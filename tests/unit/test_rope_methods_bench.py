"""benchmarks/rope_methods.py: end to end on a 2-method, few-step configuration, plus its config and method table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from longtrain.model.rope import ROPE_METHODS, compute_inv_freq, context_length

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "benchmarks" / "configs" / "rope_methods_smoke.yaml"


def _load():
    spec = importlib.util.spec_from_file_location("bench_rope_methods", ROOT / "benchmarks" / "rope_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


def test_end_to_end_two_methods(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--config", str(SMOKE), "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the config asks for one thread; leave the session as it was
    cfg = yaml.safe_load(SMOKE.read_text())
    L, steps = cfg["base"]["seq_len"], cfg["extension"]["steps"]
    (f,) = cfg["extension"]["factors"]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["steps"]) for r in rows] == [("base", 0), ("default", 0), ("yarn", 0),
                                                         ("default", steps), ("yarn", steps)]
    for r in rows:
        assert set(r["ppl"]) == set(r["passkey"]) == {"1", "2"}
        assert all(math.isfinite(p) and p > 1.0 for p in r["ppl"].values())
        assert all(0.0 <= a <= 1.0 for a in r["passkey"].values())
        # Exact match needs every answer token right, so it never exceeds the answer-token accuracy.
        assert all(r["passkey"][m] <= r["passkey_token"][m] <= 1.0 for m in r["passkey"])
    base, default0, yarn0 = rows[0], rows[1], rows[2]
    # Plain RoPE swapped in without training is the base model itself: the same numbers, not just close ones.
    assert default0["ppl"] == base["ppl"]
    # YaRN changes the frequencies (and the cos/sin scale), so the same model scores differently.
    assert yarn0["rope"]["rope_type"] == "yarn" and yarn0["ppl"]["1"] != base["ppl"]["1"]

    # The same budget for every method, through the trainer: seq f*L, the same step count and lr schedule.
    lrs = {}
    for method in ("default", "yarn"):
        run = tmp_path / "runs" / f"{method}-{f}x"
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        stage = recipe["stages"][0]
        assert stage["seq_len"] == f * L and stage["steps"] == steps
        assert stage["rope"]["rope_type"] == method
        assert stage["train"]["micro_batch"] * f * L == cfg["extension"]["tokens_per_step"]
        assert recipe["model"]["path"] == str(tmp_path / "base_hf")
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        lrs[method] = [m["lr"] for m in logged if "lr" in m]
        assert not (run / "checkpoints").exists()  # keep_checkpoints: false
    assert lrs["default"] == lrs["yarn"] and lrs["default"]

    report = (tmp_path / "report.md").read_text()
    assert "| yarn | 2x | yarn |" in report and "## Extension to 2x (272 tokens)" in report
    for name in ("perplexity.png", "passkey.png", "passkey_tokens.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["heldout"] == {"documents": 1, "tokens_each": 2 * L}
    assert meta["timings"]["process_cpu_s"] > 0 and meta["base_reused"] is False
    assert "report:" in capsys.readouterr().out
    # A finished base run with the same recipe is reused, not trained again.
    run_dir, loss, reused = bench.train_base(bench.load_config(SMOKE), tmp_path, tmp_path / "data" / f"train_{L}.jsonl",
                                     str(SMOKE))
    assert run_dir == tmp_path / "runs" / "base" and loss == base["train_loss"] and reused
    assert "reusing the finished base run" in capsys.readouterr().out
    # --report-only rebuilds the same report from the saved rows.
    (tmp_path / "report.md").unlink()
    assert bench.main(["--config", str(SMOKE), "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "report.md").read_text() == report


def test_every_registry_type_has_a_method(bench):
    cfg = bench.load_config(SMOKE)
    assert set(bench.METHOD_TYPES.values()) == set(ROPE_METHODS)
    L, f = cfg.base.seq_len, 4
    for method, rope_type in bench.METHOD_TYPES.items():
        lam = [1.0 + i for i in range(8)] if method == "longrope" else None
        rope, max_pos = bench.method_rope(cfg, method, f, 10000.0, lam)
        assert rope["rope_type"] == rope_type
        if rope_type != "default":  # every scaled method targets exactly f * L as transformers / vLLM read it
            assert context_length(rope, max_pos) == f * L
    abf, _ = bench.method_rope(cfg, "abf", f, 10000.0)
    assert abf["rope_theta"] == cfg.abf_theta


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_configs_compare_every_method(bench, name):
    cfg = bench.load_config(ROOT / "benchmarks" / "configs" / f"rope_methods_{name}.yaml")
    assert cfg.methods == list(bench.METHOD_TYPES) and cfg.extension.factors == [4, 8]
    assert cfg.eval.multiples == [1, 2, 4, 8]


def test_longrope_candidates(bench):
    cfg = bench.load_config(SMOKE)
    f, n = 4, 8
    cands = dict(bench.longrope_candidates(f, n, cfg.longrope_search))
    assert cands["p=0, m=1"] == [4.0] * n  # p = 0 is position interpolation
    for lam in cands.values():
        assert all(a <= b for a, b in zip(lam, lam[1:]))  # monotone: lower frequencies interpolate more
    # The candidate as a longrope block: long factors beyond L divide the default frequencies.
    rope, max_pos = bench.method_rope(cfg, "longrope", f, 10000.0, cands["p=1, m=1"])
    plain, _ = compute_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, 16, max_pos)
    inv, _ = compute_inv_freq(rope, 16, max_pos, seq_len=f * cfg.base.seq_len)
    torch.testing.assert_close(inv, plain / torch.tensor(cands["p=1, m=1"], dtype=torch.float64))


@pytest.mark.parametrize("change, message", [
    ({"extension": {"tokens_per_step": 500}}, "extension.tokens_per_step = 500 must be a multiple"),
    ({"methods": ["default", "alibi"]}, "methods has 'alibi'; valid: default, abf"),
    ({"eval": {"lenghts": [1]}}, "eval.lenghts is not a key; valid keys: multiples"),
    ({"base": {"seq_len": "160"}}, "base.seq_len = '160' must be of type int"),
    ({"method_options": {"ntk": {"factor": 2.0}}}, "method_options.ntk names a method not in methods"),
])
def test_bad_config(bench, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.load_config(SMOKE, change)


def test_bad_method_option_is_a_rope_error(bench):
    cfg = bench.load_config(SMOKE, {"method_options": {"yarn": {"beta_fast": 0.5}}})
    with pytest.raises(ValueError, match=r"method yarn.beta_fast"):
        bench.method_rope(cfg, "yarn", 4, 10000.0)

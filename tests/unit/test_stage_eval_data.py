"""The stage evaluation scores perplexity on the recipe's own data (eval.data, issue 20), capped in windows, and
the run's summary holds its table; `longtrain eval` defaults to the fast attention kernel on a GPU."""

import json
from pathlib import Path

import pytest

from longtrain.config import RecipeError, build_recipe
from longtrain.trainer.train import train


def recipe(tmp_path: Path, *overrides: str):
    raw = {
        "name": "ev",
        "run_dir": str(tmp_path / "run"),
        "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
        "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
        "logging": {"progress_bar": False, "plot": False},
        "eval": {"lengths": [32, 64], "tasks": ["perplexity"], "batch_size": 4},
        "stages": [{"name": "s", "seq_len": 144, "steps": 1}],
    }
    return build_recipe(raw, list(overrides))


def test_stage_eval_scores_perplexity_on_the_recipe_data(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    with open(corpus, "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 6})
                    + "\n")
    res = train(recipe(tmp_path, f"eval.data={corpus}", "eval.text_field=body", "eval.max_windows=3"))
    row = res.evals[0]
    assert row["perplexity_data"] == str(corpus)
    assert {L: r["windows"] for L, r in row["perplexity"].items()} == {"32": 3, "64": 3}
    summary = (tmp_path / "run" / "eval" / "summary.md").read_text()
    assert f"Perplexity ({corpus})" in summary and "| 32 |" in summary and "| 64 |" in summary


def test_eval_data_without_the_perplexity_task_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"eval.data holds the perplexity task's documents; add perplexity"):
        recipe(tmp_path, "eval.data=tiny", "eval.tasks=[passkey]")


def test_longtrain_eval_defaults_to_auto_attention_on_a_gpu():
    from longtrain.eval.command import default_attention

    assert default_attention(None, "cuda") == "auto" and default_attention(None, "cuda:1") == "auto"
    assert default_attention(None, "cpu") is None  # the model's own (the reference on CPU)
    assert default_attention("sdpa_flash", "cuda") == "sdpa_flash"

"""Every shipped recipe loads, validates, carries its header, and fits the layout it asks for."""

from pathlib import Path

import pytest

from longtrain.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "tiny-demo.yaml" in names and len(names) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages and all(s.steps > 0 for s in recipe.stages)
    head = path.read_text().split("\nname:")[0]
    for field in ("# Purpose:", "# Hardware:", "# Launch:"):
        assert field in head, f"{path.name}: header lacks {field!r}"
    lengths = [s.seq_len for s in recipe.stages]
    assert lengths == sorted(lengths), "stages extend the context in order"
    for st in recipe.stages:
        per_step = st.seq_len * st.train.micro_batch
        assert st.train.global_batch_tokens % per_step == 0


def test_demo_extends_4x_with_a_rope_method_and_evaluates_1x_2x_4x():
    recipe = load_recipe(next(p for p in RECIPES if p.name == "tiny-demo.yaml"))
    short, long = recipe.stages
    assert long.seq_len == 4 * short.seq_len and long.rope is not None
    assert recipe.model.flavor is not None and recipe.model.tokenizer == "builtin"
    assert all(s.path.startswith("synthetic:") for s in short.data.sources)  # no downloads, nothing to prepare
    ev = recipe.stages[0].eval
    assert ev is not None and ev.untrained_next_rope
    assert ev.lengths == [short.seq_len, 2 * short.seq_len, 4 * short.seq_len]
    # The extension rescales the base the model was trained with (issue 4: rope_theta 1e5), not another one,
    # and the eval asks the task the model was trained on.
    assert long.rope["rope_theta"] == recipe.model.model_args().rope["rope_theta"]
    train_opts = short.data.sources[0].options
    assert all(ev.task_options["passkey"][k] == train_opts[k] for k in ("digits", "filler", "template"))

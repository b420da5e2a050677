"""Recipe loading: YAML -> typed sections, overrides, stage inheritance, and one clear error per kind of mistake."""

from pathlib import Path

import pytest
import yaml

from longtrain.config import Recipe, RecipeError, build_recipe, load_recipe

BASE = {
    "name": "unit",
    "model": {"flavor": "debug"},
    "data": {"sources": [{"path": "synthetic:passkey"}]},
    "train": {"optimizer": {"lr": 1.0e-3}, "schedule": {"warmup_steps": 2}},
    "stages": [
        {"name": "short", "seq_len": 64, "steps": 4},
        {"name": "long", "seq_len": 256, "steps": 3,
         "rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
         "train": {"optimizer": {"lr": 5.0e-4}}},
    ],
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, data), overrides or [])
    msg = str(info.value)
    assert str(tmp_path / "recipe.yaml") in msg, "every error names the file"
    assert "\n" not in msg.strip(), "one paragraph"
    return msg


def test_sections_defaults_and_stage_inheritance(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert isinstance(r, Recipe) and r.run_dir == "runs/unit"
    assert r.parallel.cp == 1 and r.memory.activation_checkpoint == "none"  # defaults
    assert r.stages[0].train.optimizer.lr == 1.0e-3  # inherited
    assert r.stages[1].train.optimizer.lr == 5.0e-4  # overridden ...
    assert r.stages[1].train.schedule.warmup_steps == 2  # ... key by key: the rest is still inherited
    assert r.stages[1].data.sources[0].path == "synthetic:passkey"


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["stages.0.steps=9", "stages[1].train.optimizer.lr=1e-5",
                                            "train.grad_clip=0.5", "run_dir=/tmp/x/${name}-${model.flavor}"])
    assert r.stages[0].steps == 9
    assert r.stages[1].train.optimizer.lr == 1.0e-5  # YAML 1.1 reads 1e-5 as text; taken as the number
    assert r.stages[0].train.grad_clip == 0.5 and r.stages[1].train.grad_clip == 0.5  # top level reaches stages
    assert r.run_dir == "/tmp/x/unit-debug"


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["parallel.cp=2"])
    r.save(tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.to_dict() == r.to_dict()


def test_unknown_key_suggests_the_closest(tmp_path):
    msg = error(tmp_path, BASE, ["train.optimzer.lr=0.1"])
    assert "unknown key `train.optimzer`" in msg and "did you mean 'optimizer'" in msg
    msg = error(tmp_path, {**BASE, "parallell": {"cp": 2}})
    assert "`parallell`" in msg and "did you mean 'parallel'" in msg


def test_wrong_type_names_key_path_and_value(tmp_path):
    msg = error(tmp_path, BASE, ["stages.1.steps=many"])
    assert "`stages[1].steps` = 'many'" in msg and "expected int" in msg
    msg = error(tmp_path, BASE, ["train.optimizer.lr=fast"])
    assert "`train.optimizer.lr` = 'fast'" in msg and "expected float" in msg


def test_missing_required_value(tmp_path):
    data = {**BASE, "stages": [{"name": "short", "steps": 4}]}
    msg = error(tmp_path, data)
    assert "`stages[0]` is missing the required key `seq_len`" in msg
    msg = error(tmp_path, {k: v for k, v in BASE.items() if k != "stages"})
    assert "`stages`" in msg and "non-empty list" in msg
    msg = error(tmp_path, {**BASE, "model": {}})
    assert "model.path" in msg and "model.flavor" in msg


def test_bad_option_lists_valid_ones(tmp_path):
    msg = error(tmp_path, BASE, ["parallel.cp_mode=spiral"])
    assert "`parallel.cp_mode` = 'spiral'" in msg and "'ring'" in msg and "'ulysses'" in msg
    msg = error(tmp_path, BASE, ["model.flavor=debugg"])
    assert "did you mean 'debug'" in msg


def test_impossible_combinations(tmp_path):
    msg = error(tmp_path, BASE, ["parallel.cp=3", "parallel.cp_mode=allgather"])
    assert "`stages[0].seq_len` = 64" in msg and "multiple of 6" in msg
    # debug flavor: 4 query heads; Ulysses degree 8 cannot split them.
    msg = error(tmp_path, BASE, ["parallel.cp=8", "parallel.cp_mode=ulysses"])
    assert "`parallel.cp` = 8" in msg and "4 query heads" in msg
    msg = error(tmp_path, BASE, ["train.global_batch_tokens=100"])
    assert "global_batch_tokens` = 100" in msg and "multiple of seq_len * micro_batch = 64" in msg


def test_rope_block_is_validated_with_the_stage_path(tmp_path):
    msg = error(tmp_path, BASE, ["stages.1.rope.rope_type=banana"])
    assert "stages[1].rope.rope_type = 'banana'" in msg and "yarn" in msg
    msg = error(tmp_path, BASE, ["stages.1.rope.factr=2.0"])
    assert "stages[1].rope.factr" in msg and "factor" in msg


def test_override_errors(tmp_path):
    msg = error(tmp_path, BASE, ["stages.5.steps=1"])
    assert "index must be 0..1" in msg
    msg = error(tmp_path, BASE, ["parallel.cp"])
    assert "section.key=value" in msg


def test_build_recipe_without_file_names_placeholder():
    with pytest.raises(RecipeError, match="<recipe>"):
        build_recipe({**BASE, "name": 3})


def test_run_wide_train_keys_cannot_change_per_stage(tmp_path):
    msg = error(tmp_path, BASE, ["stages.1.train.resume=never"])
    assert "`stages[1].train.resume`" in msg and "whole run" in msg


def test_memory_cannot_change_per_stage(tmp_path):
    # Caught when the recipe loads, not when stage 1 starts after hours of stage 0.
    msg = error(tmp_path, BASE, ["stages.1.memory.activation_checkpoint=full"])
    assert "`stages[1].memory.activation_checkpoint` = 'full'" in msg and "whole run" in msg
    assert "stage 0 has 'none'" in msg and "top level" in msg
    assert load_recipe(write(tmp_path, BASE), ["memory.activation_checkpoint=full"]).stages[1].memory == \
        load_recipe(write(tmp_path, BASE), ["memory.activation_checkpoint=full"]).stages[0].memory


@pytest.mark.parametrize("seq_len, micro_batch, cp, tile", [
    (32768, 1, 1, 8192),   # 32K tokens through one GPU's MLP: tiled
    (16384, 2, 1, 8192),   # micro_batch counts: 32K tokens per micro-batch
    (65536, 1, 4, None),   # cp divides: 16K tokens per GPU
    (65536, 2, 4, 8192),
    (16384, 1, 1, None),
])
def test_tiled_mlp_auto_is_one_decision_for_trainer_and_planner(tmp_path, seq_len, micro_batch, cp, tile):
    """`tiled_mlp: auto` is read once (Recipe.mlp_tile) from the most tokens per GPU of any stage: the trainer
    installs it and the planner plans it, so the two cannot disagree (they did with cp > 1 or micro_batch > 1)."""
    over = [f"stages.1.seq_len={seq_len}", f"stages.1.train.micro_batch={micro_batch}", f"parallel.cp={cp}",
            "memory.tiled_mlp=auto"]
    recipe = load_recipe(write(tmp_path, BASE), over)
    assert recipe.mlp_tile() == tile
    assert load_recipe(write(tmp_path, BASE), over[:-1] + ["memory.tiled_mlp=false"]).mlp_tile() is None
    assert load_recipe(write(tmp_path, BASE), over[:-1] + ["memory.tiled_mlp=true"]).mlp_tile() == 8192


def test_fused_kernels_setting(tmp_path):
    import torch

    from longtrain.trainer.build import fused_kernels_setting

    msg = error(tmp_path, BASE, ["model.fused_kernels=sometimes"])
    assert "`model.fused_kernels` = 'sometimes'" in msg and "'auto'" in msg
    cpu = torch.device("cpu")
    assert fused_kernels_setting(load_recipe(write(tmp_path, BASE)), cpu) is False  # auto: no GPU here
    assert fused_kernels_setting(load_recipe(write(tmp_path, BASE), ["model.fused_kernels=false"]), cpu) is False
    from longtrain.kernels.rmsnorm import INTERPRET

    forced = load_recipe(write(tmp_path, BASE), ["model.fused_kernels=true"])
    if INTERPRET:  # the Triton interpreter runs them on CPU
        assert fused_kernels_setting(forced, cpu) is True
    else:
        with pytest.raises(RecipeError, match="model.fused_kernels = true.*use model.fused_kernels=auto"):
            fused_kernels_setting(forced, cpu)

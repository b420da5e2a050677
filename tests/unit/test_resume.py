"""Resume is never silent (issue 20): recipe changes are named or refused, finished stages take more steps,
metrics.jsonl has no duplicate steps, damaged checkpoints are detected and passed over. CPU fp32, debug model."""

import json
import shutil
from pathlib import Path

import pytest

from longtrain.config import build_recipe
from longtrain.checkpoint.store import CheckpointDamaged, checkpoint_problem, complete_checkpoints
from longtrain.trainer.export import export_checkpoint
from longtrain.trainer.resume import ResumeError
from longtrain.trainer.train import train

SEQ = 144  # the passkey task's fixed text is ~131 tokens with the builtin tokenizer


def recipe(tmp_path: Path, *overrides: str, steps: int = 4):
    raw = {
        "name": "r",
        "run_dir": str(tmp_path / "run"),
        "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
        "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
        "train": {"optimizer": {"lr": 3.0e-3}, "schedule": {"decay": "constant"}},
        "logging": {"progress_bar": False, "plot": False},
        "stages": [{"name": "s", "seq_len": SEQ, "steps": steps}],
    }
    return build_recipe(raw, list(overrides))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_changed_lr_applies_from_the_resume_step_and_is_named(tmp_path, capsys):
    train(recipe(tmp_path, "train.stop_after_steps=2"))
    capsys.readouterr()
    res = train(recipe(tmp_path, "train.optimizer.lr=1e-2"))
    out = capsys.readouterr().out
    assert sorted(res.losses) == [3, 4]
    assert ("recipe changed since the checkpoint, applied from step 3: train.optimizer.lr: 0.003 -> 0.01 (stage s)"
            in out), out
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "run")}
    assert lrs == {1: 3e-3, 2: 3e-3, 3: 1e-2, 4: 1e-2}
    assert "lr: 0.01" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_structural_change_is_one_paragraph_and_leaves_the_run_dir_recipe(tmp_path):
    train(recipe(tmp_path, "train.stop_after_steps=2"))
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(ResumeError) as e:
        train(recipe(tmp_path, f"stages.0.seq_len={2 * SEQ}", "model.overrides.n_layers=2"))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"`stages.0.seq_len` (stage 's', already trained) was {SEQ}, is now {2 * SEQ}" in msg, msg
    assert "`model.overrides.n_layers` was 1, is now 2" in msg
    assert "set the old value again" in msg and "train.resume=never" in msg
    assert (tmp_path / "run" / "recipe.yaml").read_text() == saved  # a refused run records nothing


def test_more_steps_on_a_finished_stage_are_trained(tmp_path):
    ref = train(recipe(tmp_path / "ref", steps=4))
    first = train(recipe(tmp_path, steps=2))
    assert first.status == "done" and first.step == 2
    more = train(recipe(tmp_path, steps=4))
    assert more.status == "done" and sorted(more.losses) == [3, 4]
    assert more.losses == {s: ref.losses[s] for s in (3, 4)}  # constant lr: the same steps as one run
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]
    with pytest.raises(ResumeError, match=r"only more steps can be added to a finished stage"):
        train(recipe(tmp_path, steps=3))


def test_metrics_have_no_duplicate_steps_after_a_resume(tmp_path):
    train(recipe(tmp_path, "train.stop_after_steps=2"))
    path = tmp_path / "run" / "metrics.jsonl"
    ghost = rows(tmp_path / "run")[-1] | {"step": 3}  # logged by a run killed after its last checkpoint
    with open(path, "a") as f:
        f.write(json.dumps(ghost) + "\n" + '{"step": 4, "lo')  # and a line cut mid-write
    train(recipe(tmp_path))
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["shard", "rank", "meta"])
def test_damaged_latest_checkpoint_is_named_and_passed_over(tmp_path, capsys, damage):
    ref = train(recipe(tmp_path / "ref", steps=3))
    train(recipe(tmp_path, "checkpoint.every_steps=1", "train.stop_after_steps=2"))
    root = tmp_path / "run" / "checkpoints"
    latest = complete_checkpoints(root)[-1]
    assert latest.name == "step-2"
    target = {"shard": next((latest / "dcp").glob("*.distcp")), "rank": latest / "rank-00000.pt",
              "meta": latest / "meta.json"}[damage]
    _truncate(target)
    problem = checkpoint_problem(latest)
    assert problem is not None and str(target) in problem, problem
    with pytest.raises(CheckpointDamaged, match=f"checkpoint {latest} is damaged: .*{target.name}.*newest intact "
                                                f"checkpoint there is {root / 'step-1'}"):
        export_checkpoint(root / "latest", tmp_path / "hf")
    from longtrain.eval.load import load_for_eval

    with pytest.raises(ValueError, match=f"checkpoint {latest} is damaged: .*{target.name}"):
        load_for_eval(tmp_path / "run")  # `longtrain eval RUN_DIR` says the same
    capsys.readouterr()
    res = train(recipe(tmp_path, steps=3))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {latest} is damaged and is skipped: {problem}" in out
    assert f"warning: resuming from {root / 'step-1'}, the newest intact checkpoint" in out
    assert res.losses == {s: ref.losses[s] for s in (2, 3)}
    if damage == "meta":  # with every checkpoint damaged, starting over (and overwriting them) is the user's call
        for ckpt in complete_checkpoints(root):
            (ckpt / "meta.json").write_text('{"step": ')
        with pytest.raises(CheckpointDamaged, match=f"every checkpoint in {root} is damaged: .* set "
                                                    f"train.resume=never"):
            train(recipe(tmp_path, steps=3))


def test_another_world_size_must_keep_the_global_batch(tmp_path):
    from longtrain.checkpoint.store import read_meta
    from longtrain.trainer.resume import plan_resume, read_saved_recipe

    train(recipe(tmp_path, "train.stop_after_steps=1"))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    old = read_saved_recipe(ckpt)
    # global_batch_tokens=0 is one micro-batch per dp rank: on 2 ranks a step would hold twice the sequences.
    with pytest.raises(ResumeError, match=r"a step of stage 's' held 1 sequence\(s\) on the checkpoint's layout and "
                                          r"would hold 2 on this one .* set train.global_batch_tokens=144 to keep"):
        plan_resume(old, recipe(tmp_path), read_meta(ckpt), ckpt, world_size=2)
    plan = plan_resume(old, recipe(tmp_path, f"train.global_batch_tokens={SEQ}"), read_meta(ckpt), ckpt, world_size=2)
    assert plan.relayout and plan.data_dp == 1
    assert plan.changes[-1].startswith("parallel layout: world 1 (dp 1, cp 1) -> world 2 (dp 2, cp 1): model and "
                                       "optimizer are resharded")


def test_a_copy_of_a_checkpoint_is_intact(tmp_path):
    train(recipe(tmp_path, steps=1))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert checkpoint_problem(ckpt) is None
    copy = tmp_path / "copy" / "step-1"
    shutil.copytree(ckpt, copy)
    (copy / "dcp" / ".metadata").write_bytes(b"")
    assert "cannot be read" in checkpoint_problem(copy)


def test_tokenizer_larger_than_the_model_vocabulary_fails_before_tokenizing(tmp_path):
    with pytest.raises(ValueError, match=r"the tokenizer builtin has 512 ids but the model's embedding has 300 rows "
                                         r"\(vocab_size\), so ids 300..511 would index past it\. .*"
                                         r"model.overrides.vocab_size to at least 512"):
        train(recipe(tmp_path, "model.overrides.vocab_size=300"))
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_another_model_against_a_checkpoint_is_one_sentence(tmp_path):
    import torch

    from longtrain.model.args import model_flavor
    from longtrain.model.decoder import Transformer
    from longtrain.checkpoint.store import CheckpointMismatch, load_model_weights

    train(recipe(tmp_path, steps=1))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    other = Transformer(model_flavor("debug", n_layers=2, dim=32, head_dim=8))
    with pytest.raises(CheckpointMismatch) as e:
        load_model_weights(ckpt, other)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {ckpt} holds another model than the one built: ")
    assert "of the model's tensors are not in it (layers.1." in msg
    assert "differ in shape (" in msg and "embed_tokens.weight (checkpoint (512, 64), model (512, 32))" in msg
    assert torch.isfinite(other.embed_tokens.weight).all()  # nothing was loaded half-way


def test_oversubscription_warning_names_the_setting():
    from longtrain.trainer.checks import oversubscription_warning

    assert oversubscription_warning(1, 2, 2, load=0.0) is None
    assert oversubscription_warning(2, 1, 2, load=1.0) is None  # one thread each: nothing to set
    msg = oversubscription_warning(2, 4, 4)
    assert msg == ("warning: 2 process(es) x 4 torch threads = 8 threads on 4 CPU core(s): oversubscribed cores "
                   "can make training many times slower. Set OMP_NUM_THREADS=2 (torchrun sets 1 when it starts "
                   "several processes and it is unset).")
    assert "while other work keeps 1.0 of them busy" in oversubscription_warning(1, 2, 2, load=1.0)


def test_cli_prints_a_refused_resume_as_one_paragraph_and_exits_2(tmp_path, capsys):
    import yaml

    from longtrain.cli import main

    train(recipe(tmp_path, "train.stop_after_steps=1"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())))
    assert main(["train", str(path), f"stages.0.seq_len={2 * SEQ}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the recipe no longer matches the checkpoint it resumes") and err.count("\n") == 1

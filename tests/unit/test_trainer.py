"""Trainer on the debug model, CPU fp32: exact resume, NaN skipping, gradient accumulation, LoRA, export."""

import json
from pathlib import Path

import pytest
import torch

from longtrain.config import build_recipe
from longtrain.checkpoint.store import complete_checkpoints, load_model_weights
from longtrain.checkpoint.model import load_checkpoint_model
from longtrain.trainer.export import export_checkpoint
from longtrain.trainer.train import TrainingError, train

SEQ = 144  # the passkey task's fixed text is ~131 tokens with the builtin tokenizer


def recipe(tmp_path: Path, *overrides: str, stages=None):
    raw = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "model": {"flavor": "debug", "overrides": {"n_layers": 1}},
        "data": {"sources": [{"path": "synthetic:passkey", "options": {"digits": 3}}]},
        "train": {"optimizer": {"lr": 3.0e-3}, "schedule": {"warmup_steps": 1}},
        "logging": {"progress_bar": False, "plot": False},
        "stages": stages or [
            {"name": "short", "seq_len": SEQ, "steps": 3},
            {"name": "long", "seq_len": 2 * SEQ, "steps": 2,
             "rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
        ],
    }
    return build_recipe(raw, list(overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_exact_resume_across_a_stage_boundary(tmp_path):
    full = train(recipe(tmp_path / "a"))
    assert full.status == "done" and sorted(full.losses) == [1, 2, 3, 4, 5]
    # Stop at the stage boundary (mid-stage resume is in test_checkpoint.py): the next stage starts fresh
    # data and schedule, while model, optimizer state, RNGs and step come from the checkpoint.
    first = train(recipe(tmp_path / "b", "train.stop_after_steps=3"))
    assert first.status == "stopped" and first.step == 3
    second = train(recipe(tmp_path / "b"))  # resume: auto picks step-3
    assert sorted(second.losses) == [4, 5]
    for step in (4, 5):  # CPU fp32, same ops in the same order: bitwise equal
        assert second.losses[step] == full.losses[step], step
    # Weights at the end are bitwise equal too.
    a = load_checkpoint_model(tmp_path / "a" / "run" / "checkpoints" / "latest")[0]
    b = load_checkpoint_model(tmp_path / "b" / "run" / "checkpoints" / "latest")[0]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert b.args.rope["rope_type"] == "linear"  # the last stage's rope travels with the checkpoint


def test_nan_step_is_skipped_and_counted(tmp_path):
    one = [{"name": "s", "seq_len": SEQ, "steps": 1}]
    two = [{"name": "s", "seq_len": SEQ, "steps": 2}]
    ref = train(recipe(tmp_path / "ref", "train.schedule.decay=constant", stages=one))
    res = train(recipe(tmp_path / "nan", "train.schedule.decay=constant", "train.debug_nan_steps=[2]",
                       "train.max_bad_steps=1", stages=two))
    assert res.bad_steps == 1 and res.status == "done"
    rows = metrics(tmp_path / "nan" / "run")
    assert [r["skipped"] for r in rows] == [False, True] and rows[1]["loss"] != rows[1]["loss"]  # NaN logged
    # No optimizer update on the NaN step: the weights equal those after step 1.
    w_ref = load_checkpoint_model(tmp_path / "ref" / "run" / "checkpoints" / "latest")[0].state_dict()
    w_nan = load_checkpoint_model(tmp_path / "nan" / "run" / "checkpoints" / "latest")[0].state_dict()
    for name in w_ref:
        assert torch.equal(w_ref[name], w_nan[name]), name
    assert ref.losses[1] == res.losses[1]


def test_too_many_nan_steps_stop_the_run(tmp_path):
    with pytest.raises(TrainingError, match=r"2 steps had a NaN/inf loss.*max_bad_steps=1"):
        train(recipe(tmp_path, "train.debug_nan_steps=[1, 2]", "train.max_bad_steps=1"))


def test_grad_accumulation_equals_a_larger_micro_batch(tmp_path):
    stage = [{"name": "s", "seq_len": SEQ, "steps": 3}]
    # loss_on=answer: few valid labels per row, so a per-micro-batch mean would differ from the global one.
    opts = "data.sources=[{path: 'synthetic:passkey', options: {digits: 3, loss_on: answer}}]"
    accum = train(recipe(tmp_path / "acc", opts, "train.micro_batch=1", f"train.global_batch_tokens={2 * SEQ}",
                         stages=stage))
    wide = train(recipe(tmp_path / "mb", opts, "train.micro_batch=2", stages=stage))
    # fp32: the two sum the same terms in a different order; 1e-5 relative covers that reordering.
    for step in (1, 2, 3):
        assert accum.losses[step] == pytest.approx(wide.losses[step], rel=1e-5), step
    assert metrics(tmp_path / "acc" / "run")[0]["valid_tokens"] == metrics(tmp_path / "mb" / "run")[0]["valid_tokens"]


def test_lora_trains_adapters_embeddings_norms_and_exports_merged(tmp_path):
    stage = [{"name": "s", "seq_len": SEQ, "steps": 2}]
    res = train(recipe(tmp_path, "model.lora={rank: 4, alpha: 8.0}", stages=stage))
    assert res.status == "done"
    out = export_checkpoint(tmp_path / "run" / "checkpoints" / "latest", tmp_path / "hf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    merged = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "latest")[0]
    x = torch.randint(0, merged.args.vocab_size, (1, 50))
    # Same fp32 weights, two implementations: 1e-4 absolute on logits of size ~1.
    torch.testing.assert_close(hf(x).logits, merged(x), atol=1e-4, rtol=0)
    assert not any("lora" in k for k in hf.state_dict())
    # `longtrain eval` reads the run directory through the same reader: the merged model, named as such.
    from longtrain.eval.load import load_for_eval

    scored, _, what = load_for_eval(tmp_path / "run")
    assert "LoRA adapters merged" in what
    torch.testing.assert_close(scored(x), merged(x), atol=0, rtol=0)


def test_export_loads_in_transformers_with_the_last_stage_rope(tmp_path):
    train(recipe(tmp_path))
    out = export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "hf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 2.0
    model = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "latest")[0]
    x = torch.randint(0, model.args.vocab_size, (1, 2 * SEQ))
    torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)  # fp32, two implementations
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("pass key 123")["input_ids"], skip_special_tokens=True).strip() == "pass key 123"


def test_checkpoints_keep_last_and_latest_link(tmp_path):
    stage = [{"name": "s", "seq_len": SEQ, "steps": 4}]
    train(recipe(tmp_path, "checkpoint.every_steps=1", "checkpoint.keep_last=2", stages=stage))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-3", "step-4"]
    assert (root / "latest").resolve().name == "step-4"
    assert (tmp_path / "run" / "recipe.yaml").is_file() and len(metrics(tmp_path / "run")) == 4


def test_wandb_block_logs_offline_or_names_the_missing_package(tmp_path):
    stage = [{"name": "s", "seq_len": SEQ, "steps": 1}]
    r = recipe(tmp_path, "logging.wandb={project: t, mode: offline}", stages=stage)
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"logging.wandb block needs the wandb package.*longtrain\[wandb\]"):
            train(r)
        return
    res = train(r)  # offline mode: no network needed, files under run_dir/wandb
    assert res.status == "done" and (tmp_path / "run" / "wandb").is_dir()


def test_cli_reports_recipe_errors_in_one_paragraph(tmp_path, capsys):
    from longtrain.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {flavor: debug}\nstages: [{name: s, seq_len: 64, stepz: 3}]\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key `stages[0].stepz` (did you mean 'steps'?)" in err and str(path) in err


def test_train_from_a_hugging_face_directory(tmp_path):
    from longtrain.data.tokenizer import load_tokenizer
    from longtrain.model.args import model_flavor
    from longtrain.model.decoder import Transformer
    from longtrain.model.hf import save_hf

    base = Transformer(model_flavor("debug", n_layers=1))
    base.init_weights(seed=3)
    tok_dir = tmp_path / "tok"
    load_tokenizer("builtin").save(tok_dir)
    save_hf(base, tmp_path / "base", tokenizer_dir=tok_dir)
    raw_stage = [{"name": "s", "seq_len": SEQ, "steps": 1}]
    r = recipe(tmp_path, f"model={{path: {tmp_path / 'base'}}}", stages=raw_stage)
    assert r.model.tokenizer == str(tmp_path / "base")  # the directory's own tokenizer by default
    res = train(r)
    assert res.status == "done"
    trained = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "latest")[0]
    # Step 1 starts from the loaded weights: its loss is the base model's loss on the same batch.
    from longtrain.kernels.linear_cross_entropy import linear_cross_entropy
    from longtrain.trainer.data import build_batch_source

    source = build_batch_source(r.stages[0].data, load_tokenizer(r.model.tokenizer), SEQ, 1, 0, 1)
    b = source.next_batch()
    source.close()
    with torch.no_grad():
        expected = linear_cross_entropy(base.hidden_states(b.input_ids, b.position_ids, b.doc_ids),
                                        base.output_weight, b.labels) / b.num_valid_tokens
    assert res.losses[1] == pytest.approx(float(expected), rel=1e-6)  # fp32, same model and batch
    assert not torch.equal(trained.embed_tokens.weight, base.embed_tokens.weight)
    assert trained.args.rope == base.args.rope
    # docs/export.md: generation_config.json of the starting directory travels with the export.
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.6}
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(gen))
    out = export_checkpoint(tmp_path / "run" / "checkpoints" / "latest", tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text()) == gen


def test_schedule_warmup_then_decay_to_min_ratio():
    from longtrain.config import ScheduleConfig
    from longtrain.trainer.optim import lr_factor

    cos = ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 14, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, cos) == 1.0 and lr_factor(9, 14, cos) == pytest.approx(0.55)
    assert lr_factor(14, 14, cos) == pytest.approx(0.1)
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_factor(5, 10, lin) == pytest.approx(0.5)
    assert lr_factor(3, 10, ScheduleConfig(decay="constant")) == 1.0

"""Evaluation at the end of a stage (the recipe's `eval` block), through longtrain.eval.

After stage i the model is scored as trained; when `eval.untrained_next_rope` is set and a later stage changes
the rope, it is also scored with that next rope before any training on it — the "just swap the rope" baseline
that the extension stage must beat. At the end of the run the rows of every stage form one table per task
(rows: model states, columns: context lengths), printed and written to `<run_dir>/eval/summary.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

from longtrain.config import Recipe
from longtrain.trainer.build import stage_max_positions
from longtrain.trainer.distributed import DistInfo, barrier


def _results_file(recipe: Recipe) -> Path:
    return Path(recipe.run_dir) / "eval" / "results.jsonl"


def evaluate_stage(model, recipe: Recipe, si: int, tokenizer, info: DistInfo, logger, sharded: bool,
                   full_state) -> list[dict]:
    """Score the model after stage `si` (and with the next stage's rope, untrained); rank 0 evaluates.

    A sharded (FSDP2) model is first gathered into a plain copy on rank 0 (full weights in host memory:
    fine for the models one evaluates during training on CPU/GPU; for 8B+ run `longtrain eval` on the export).

    `full_state`: a collective callable returning the full (unsharded) state dict on rank 0 (the step engine's
    `full_state_dict`, for FSDP2 and DeepSpeed alike).

    Returns:
        The results dicts of longtrain.eval.evaluate (empty on other ranks).
    """
    from longtrain.eval.evaluate import evaluate

    stage, cfg = recipe.stages[si], recipe.stages[si].eval
    if sharded:
        model = _gathered_copy(model, recipe, info, full_state)  # collective; a plain model on rank 0, else None
    out: list[dict] = []
    if info.is_main:
        variants = [(stage.name, None)]
        later = next((s for s in recipe.stages[si + 1:] if s.rope is not None), None)
        if cfg.untrained_next_rope and later is not None and later.rope != model.args.rope:
            variants.append((f"{stage.name} + {later.name} rope, untrained", later))
        for name, nxt in variants:
            old_rope, old_max = dict(model.args.rope), model.args.max_position_embeddings
            if nxt is not None:
                model.set_rope(nxt.rope, stage_max_positions(nxt, old_max, old_max))
            try:
                res = evaluate(model, tokenizer, cfg.lengths, tasks=cfg.tasks, depths=cfg.depths,
                               samples=cfg.samples, out_dir=None, name=name, batch_size=cfg.batch_size,
                               task_options=cfg.task_options, seed=cfg.seed, data=cfg.data,
                               text_field=cfg.text_field, max_windows=cfg.max_windows,
                               model_desc=f"{recipe.name} after stage {stage.name!r}")
            finally:
                if nxt is not None:
                    model.set_rope(old_rope, old_max)
            res["stage"] = si
            out.append(res)
            path = _results_file(recipe)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(res) + "\n")
            logger.write(f"eval after stage {stage.name!r} ({name}): {_brief(res)}")
        if si == len(recipe.stages) - 1:
            logger.write(write_summary(recipe))
    barrier()
    return out


def _gathered_copy(model, recipe: Recipe, info: DistInfo, full_state):
    """All ranks gather the full state dict; rank 0 loads it into an unsharded twin on its device."""
    import copy
    import dataclasses

    import torch

    from longtrain.model.decoder import Transformer
    from longtrain.model.lora import apply_lora

    full = full_state()
    if not info.is_main:
        return None
    with torch.device("meta"):
        twin = Transformer(copy.deepcopy(model.args))
    twin.to_empty(device="cpu")
    if recipe.model.lora is not None:
        apply_lora(twin, **dataclasses.asdict(recipe.model.lora))
    twin.load_state_dict(full)
    return twin.to(info.device)


def _brief(res: dict) -> str:
    parts = []
    for task, grid in res.get("retrieval", {}).items():
        parts.append(f"{task} " + ", ".join(f"{L}: {100 * a:.0f}%" for L, a in zip(grid["lengths"], grid["by_length"])))
    for L, r in res.get("perplexity", {}).items():
        parts.append(f"ppl@{L} {r.get('ppl', float('nan')):.2f}")
    return "; ".join(parts)


def write_summary(recipe: Recipe) -> str:
    """The before/after tables of the whole run (each model state's latest result), written to eval/summary.md
    with the full report (eval/report.md, plots) beside it.

    Returns:
        The Markdown text.
    """
    from longtrain.eval.report import summary_table, write_report

    rows: dict[str, dict] = {}
    for line in _results_file(recipe).read_text().splitlines():
        res = json.loads(line)
        rows.pop(res["name"], None)  # a resumed run may score a state again: keep the newest, in run order
        rows[res["name"]] = res
    results = list(rows.values())
    tasks = sorted({t for r in results for t in r.get("retrieval", {})})
    text = [f"# {recipe.name}: evaluation by stage", ""]
    for task in tasks:
        text += [summary_table(results, task), ""]
    if any(r.get("perplexity") for r in results):  # the summary holds a table for every task scored
        from longtrain.eval.report import perplexity_table

        data = next((r["perplexity_data"] for r in results if r.get("perplexity_data")), "")
        text += [f"Perplexity ({data})", "", perplexity_table([r for r in results if r.get("perplexity")]), ""]
    out_dir = Path(recipe.run_dir) / "eval"
    write_report(results, out_dir, title=f"{recipe.name}: evaluation by stage")
    (out_dir / "summary.md").write_text("\n".join(text))
    return "\n".join(text)

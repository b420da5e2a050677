"""`evaluate`: every eval task on one model, results as a JSON-able dict, optionally with a written report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from longtrain.data.tokenizer import Tokenizer
from longtrain.eval.data import load_documents, tokenize_documents
from longtrain.eval.perplexity import perplexity_by_length
from longtrain.eval.report import write_report
from longtrain.eval.retrieval import RETRIEVAL_TASKS, retrieval_grid
from longtrain.eval.scoring import set_eval_attention
from longtrain.model.decoder import Transformer

EVAL_TASKS = ("perplexity", *RETRIEVAL_TASKS)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SYNTHETIC_PASSKEY = "synthetic:passkey"  # perplexity data: passkey sequences (task_options["passkey"] apply)
SYNTHETIC_DOCS = 8


def evaluate(model: Transformer, tokenizer: Tokenizer | None, lengths: Sequence[int],
             tasks: Sequence[str] = ("passkey",), depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 20,
             out_dir: str | Path | None = None, name: str = "model", data: str | Sequence[str] | None = None,
             text_field: str = "text", stride: int | None = None, packing: str = "document",
             max_windows: int | None = None, batch_size: int = 8, attention: str | None = None,
             task_options: dict[str, dict] | None = None, seed: int = 0, model_desc: str = "") -> dict:
    """Evaluate `model` on each task at each length; the trainer calls this at the end of a stage.

    The model is put in eval mode for the call and restored (training mode, attention backends) afterwards.

    Args:
        model: the model (on the device to evaluate on).
        tokenizer: its tokenizer (needed by retrieval tasks and by text `data`; None only for token-id data).
        lengths: context lengths in tokens.
        tasks: any of perplexity, passkey, needle, needle_mv, needle_mq.
        depths: needle depths in [0, 1] (retrieval tasks).
        samples: sequences per (length, depth) cell (retrieval tasks).
        out_dir: where to write report.md, results.json and the PNGs; None writes nothing.
        name: the model's name in reports (e.g. "before", "after").
        data: perplexity documents: a path or built-in source for `load_documents`, "synthetic:passkey"
            (8 passkey sequences of the longest length), a list of texts or of token-id lists, or None for the
            bundled tiny corpus joined into one stream (packing forced to "concat").
        text_field: the text column of `data` files.
        stride: perplexity window stride (default: each length, disjoint windows).
        packing: perplexity packing, "document" or "concat" (see perplexity.py).
        max_windows: perplexity windows per length at most (None: all).
        batch_size: sequences per forward pass.
        attention: attention backend name to evaluate with (None: the model's current one).
        task_options: per-task sample options, e.g. {"passkey": {"digits": 5, "filler": "repeat"}}.
        seed: seed of the synthetic samples (the same seed gives two models identical inputs).
        model_desc: what was loaded (for the report).

    Returns:
        {"name", "model", "rope", "max_position_embeddings", "attention", "seconds",
         "perplexity": {str(length): PerplexityResult.to_dict()}, "retrieval": {task: RetrievalGrid.to_dict()}}

    Raises:
        ValueError: unknown task, empty lengths, a missing tokenizer, empty eval data, or a length the attention
            backend cannot run.
    """
    task_options = task_options or {}
    _check_eval_args(lengths, tasks, task_options, tokenizer, data)
    was_training = model.training
    old_fns = [layer.self_attn.attn_fn for layer in model.layers]
    t0 = time.time()
    try:
        model.eval()
        backend = set_eval_attention(model, attention)
        results: dict = {"name": name, "model": model_desc, "rope": dict(model.args.rope),
                         "max_position_embeddings": model.args.max_position_embeddings, "attention": backend,
                         "perplexity": {}, "retrieval": {}}
        with torch.no_grad():
            if "perplexity" in tasks:
                docs, data_desc, packing = _perplexity_docs(tokenizer, data, text_field, packing, max(lengths),
                                                            task_options.get("passkey", {}), seed)
                res = perplexity_by_length(model, docs, lengths, stride=stride, batch_size=batch_size,
                                           max_windows=max_windows, packing=packing,
                                           eos_id=tokenizer.eos_id if tokenizer else None, backend=backend)
                results["perplexity"] = {str(L): r.to_dict() for L, r in res.items()}
                results["perplexity_data"] = data_desc
            for task in tasks:
                if task == "perplexity":
                    continue
                grid = retrieval_grid(model, tokenizer, task, [int(L) for L in lengths], list(depths), samples,
                                      seed=seed, batch_size=batch_size, backend=backend,
                                      **task_options.get(task, {}))
                results["retrieval"][task] = grid.to_dict()
    finally:
        for layer, fn in zip(model.layers, old_fns):
            layer.self_attn.attn_fn = fn
        model.train(was_training)
    results["seconds"] = time.time() - t0
    if out_dir is not None:
        write_report([results], out_dir)
    return results


def _check_eval_args(lengths: Sequence[int], tasks: Sequence[str], task_options: dict[str, dict],
                     tokenizer: Tokenizer | None, data: str | Sequence | None) -> None:
    """evaluate's argument checks (see its Raises)."""
    if not lengths:
        raise ValueError("eval: no lengths given; pass at least one context length, e.g. --lengths 1024,4096")
    for L in lengths:
        if int(L) < 2:
            raise ValueError(f"eval: length {L} is too short; lengths are token counts >= 2")
    for t in tasks:
        if t not in EVAL_TASKS:
            raise ValueError(f"eval: unknown task {t!r}; valid: {', '.join(EVAL_TASKS)}")
    if not tasks:
        raise ValueError(f"eval: no tasks given; valid: {', '.join(EVAL_TASKS)}")
    unknown = set(task_options) - set(EVAL_TASKS)
    if unknown:
        raise ValueError(f"eval: task_options for unknown tasks {sorted(unknown)}; valid: {', '.join(EVAL_TASKS)}")
    needs_tok = any(t != "perplexity" for t in tasks) or (
        "perplexity" in tasks and (data is None or isinstance(data, str) or
                                   (len(data) > 0 and isinstance(data[0], str))))
    if needs_tok and tokenizer is None:
        raise ValueError(f"eval: tasks {list(tasks)} need a tokenizer and the model came without one; pass "
                         "--tokenizer (builtin or a directory)")


def _perplexity_docs(tok: Tokenizer | None, data: str | Sequence[str] | Sequence[Sequence[int]] | None,
                     text_field: str, packing: str, max_len: int, passkey_options: dict,
                     seed: int) -> tuple[list[list[int]], str, str]:
    """Tokenized perplexity documents, a description of them, and the packing to use."""
    if data == SYNTHETIC_PASSKEY:
        # Passkey sequences as documents: filler the model has learned, so the loss by position isolates what
        # positions beyond the trained length do to it (a second signal beside retrieval accuracy).
        import random

        from longtrain.data.synthetic import passkey_sample

        rng = random.Random(f"{seed}-perplexity")
        docs = [passkey_sample(tok, max_len, (i + 0.5) / SYNTHETIC_DOCS, rng, **passkey_options).input_ids
                for i in range(SYNTHETIC_DOCS)]
        return docs, f"{SYNTHETIC_DOCS} synthetic passkey sequences of {max_len} tokens", packing
    if data is None:
        # The bundled corpus has short documents only: one stream is the only way to reach long windows.
        return tokenize_documents(tok, load_documents("tiny")), "bundled tiny corpus, concatenated", "concat"
    if isinstance(data, (str, Path)):
        return tokenize_documents(tok, load_documents(str(data), text_field)), str(data), packing
    data = list(data)
    if not data:
        raise ValueError("eval: the perplexity data is an empty list of documents")
    if isinstance(data[0], str):
        return tokenize_documents(tok, data), f"{len(data)} given texts", packing
    return [list(map(int, d)) for d in data], f"{len(data)} given token lists", packing


def load_results(path: str | Path) -> list[dict]:
    """Results saved by `evaluate` / `write_report` (results.json, or the folder holding it), as a list."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"no eval results at {str(path)!r} (expected results.json)")
    r = json.loads(p.read_text())
    return r if isinstance(r, list) else [r]

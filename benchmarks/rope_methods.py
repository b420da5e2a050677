"""Which RoPE method extends best? One base model, every method of the rope registry, the same budget (issue 11).

    python benchmarks/rope_methods.py --config benchmarks/configs/rope_methods_cpu.yaml --out DIR

1. A base model is trained at a short context L through the trainer (`longtrain.trainer.train.train` on a recipe
   generated here), on real text (Python standard-library sources, a training split) mixed with passkey samples,
   then exported once as a Hugging Face directory.
2. For every method and every extension factor f (4 and 8), the base model is (a) evaluated with the method's rope
   swapped in and no training (the training-free row), and (b) fine-tuned at length f * L through the trainer from
   the exported base, with the same data, steps, tokens per step and learning-rate schedule for every method,
   then evaluated.
3. Every model is evaluated with `longtrain.eval.evaluate` (what `longtrain eval` runs) at 1x, 2x, 4x and 8x L:
   sliding-window perplexity on held-out standard-library documents (never trained on; each cut to 8L tokens, so
   every length scores the same tokens) and passkey accuracy over depths.
4. DIR receives results.jsonl (one row per evaluated model), report.md (tables) and PNG plots.

Methods (benchmark name -> rope registry type): default (plain RoPE, no scaling), abf (default with a larger
rope_theta, Xiong et al. 2023), linear (PI, Chen et al. 2023), dynamic (dynamic NTK), ntk (static NTK-aware),
yarn (Peng et al. 2023), llama3 (Llama 3.1), longrope (Ding et al. 2024; factors searched here, see
`search_longrope`), resonance (Wang et al. 2024).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts, not a package

from rope_methods_config import METHOD_TYPES, BenchConfig, LongropeSearch, load_config  # noqa: E402
from rope_methods_report import write_report  # noqa: E402
from longtrain.model.rope import hf_max_position_embeddings, rotary_dim, validate_rope  # noqa: E402



# ---------------------------------------------------------------------------------------------------------------
# Methods: the recommended hyper-parameters of each paper at extension factor f from original length L


def method_rope(cfg: BenchConfig, method: str, f: int, theta: float, long_factor: list[float] | None = None
                ) -> tuple[dict, int]:
    """The rope block of `method` for extending L to f * L, and the config.json max_position_embeddings.

    Raises:
        ValueError: an unknown method, a longrope without searched factors, or an invalid block.
    """
    L = cfg.base.seq_len
    match method:
        case "default":  # no scaling: fine-tuning alone must teach the new positions
            rope = {"rope_type": "default", "rope_theta": theta}
        case "abf":  # adjusted base frequency: one larger base for any factor (Xiong et al. 2023, arXiv:2309.16039)
            rope = {"rope_type": "default", "rope_theta": cfg.abf_theta}
        case "linear":  # position interpolation: every frequency / f (Chen et al. 2023, arXiv:2306.15595)
            rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(f)}
        case "dynamic":  # dynamic NTK as transformers computes it: the base grows with the current length
            rope = {"rope_type": "dynamic", "rope_theta": theta, "factor": float(f)}
        case "ntk":  # static NTK-aware: base * f^(d/(d-2)) (bloc97 2023)
            rope = {"rope_type": "ntk", "rope_theta": theta, "factor": float(f)}
        case "yarn":  # the paper's defaults: beta_fast 32, beta_slow 1, temperature 0.1 ln f + 1 (arXiv:2309.00071)
            rope = {"rope_type": "yarn", "rope_theta": theta, "factor": float(f), "beta_fast": 32.0,
                    "beta_slow": 1.0, "original_max_position_embeddings": L}
        case "llama3":  # Llama 3.1's band edges: low_freq_factor 1, high_freq_factor 4
            rope = {"rope_type": "llama3", "rope_theta": theta, "factor": float(f), "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": L}
        case "longrope":  # searched long factors; short factors 1 (plain RoPE up to L) (arXiv:2402.13753)
            if long_factor is None:
                raise ValueError("longrope needs its searched long_factor (search_longrope)")
            rope = {"rope_type": "longrope", "rope_theta": theta, "short_factor": [1.0] * len(long_factor),
                    "long_factor": list(long_factor), "factor": float(f), "original_max_position_embeddings": L}
        case "resonance":  # Resonance over YaRN (the paper's strongest pairing, arXiv:2403.00071)
            rope = {"rope_type": "resonance", "rope_theta": theta, "factor": float(f),
                    "original_max_position_embeddings": L, "base_type": "yarn"}
        case other:
            raise ValueError(f"unknown method {other!r}; valid: {', '.join(METHOD_TYPES)}")
    rope = validate_rope(rope | cfg.method_options.get(method, {}), f"method {method}")
    return rope, hf_max_position_embeddings(rope, f * L)


def longrope_candidates(f: int, n: int, search: LongropeSearch) -> list[tuple[str, list[float]]]:
    """Monotone per-frequency factors 1 + (f*m - 1) * (i / (n - 1)) ** p for i < n (highest frequency first).

    LongRoPE's search finds that high frequencies need little interpolation and low ones up to or beyond f
    (arXiv:2402.13753, sec. 3); this family spans that shape (p = 0 with m = 1 is PI, large p keeps more dims).
    """
    out = []
    for p in search.exponents:
        for m in search.overshoot:
            lam = [1.0 + (f * m - 1.0) * ((i / (n - 1)) ** p if p > 0 else 1.0) for i in range(n)]
            out.append((f"p={p:g}, m={m:g}", lam))
    return out


def search_longrope(model, cfg: BenchConfig, f: int, docs: list[list[int]], theta: float
                    ) -> tuple[list[float], list[dict]]:
    """LongRoPE factors for f: the candidate with the lowest training-free perplexity of the base model at f * L.

    LongRoPE searches per-frequency factors by the base model's perplexity at the target length (evolutionary
    search, arXiv:2402.13753); on a CPU budget this is a grid over `longrope_candidates`, scored on
    training-split documents (never the held-out evaluation documents).

    Returns:
        (the chosen long_factor, one row per candidate: name, perplexity).
    """
    from longtrain.eval.perplexity import perplexity_at_length

    L = cfg.base.seq_len
    n = rotary_dim(model.args.head_dim, model.args.rope) // 2
    old = (dict(model.args.rope), model.args.max_position_embeddings)
    rows, best = [], None
    try:
        for name, lam in longrope_candidates(f, n, cfg.longrope_search):
            rope, max_pos = method_rope(cfg, "longrope", f, theta, lam)
            model.set_rope(rope, max_pos)
            with torch.no_grad():
                r = perplexity_at_length(model, docs, f * L, batch_size=cfg.eval.batch_size,
                                         max_windows=cfg.longrope_search.windows, backend=cfg.eval.attention)
            rows.append({"candidate": name, "ppl": r.ppl, "long_factor": lam})
            if best is None or r.ppl < best[0]:
                best = (r.ppl, lam)
    finally:
        model.set_rope(*old)
    return best[1], rows


# ---------------------------------------------------------------------------------------------------------------
# Data, training, evaluation


def prepare_data(cfg: BenchConfig, out: Path, tok) -> tuple[dict[int, Path], list[list[int]], list[list[int]]]:
    """Split the standard-library documents into training files, held-out eval token lists and search lists.

    Training text is cut into pieces of one sequence (a file per stage length: L and every f * L), so each row
    of a batch is one stretch of real text or one passkey sample. Whole files (thousands of tokens) would fill
    dozens of consecutive rows and make whole batches text-only or passkey-only: a tiny model trained on such
    alternating batches did not learn the text (held-out perplexity above the vocabulary size in our first run).

    Returns:
        ({sequence length: training .jsonl}, held-out documents cut to the longest eval length, training-split
        documents for the LongRoPE search).

    Raises:
        ValueError: too few documents are long enough.
    """
    from longtrain.data.corpus import stdlib_documents

    d = cfg.data
    docs = sorted(stdlib_documents(min_chars=d.min_chars))
    held = [text for i, (_, text) in enumerate(docs) if i % d.heldout_every == 0]
    train = [text for i, (_, text) in enumerate(docs) if i % d.heldout_every != 0]
    train = train[:d.train_docs] if d.train_docs else train
    train_ids = tok.encode_batch(train)
    special = 1 + int(tok.add_bos)  # the loader adds EOS (and BOS) to every document
    files = {}
    for n in [cfg.base.seq_len] + [f * cfg.base.seq_len for f in cfg.extension.factors]:
        path = out / "data" / f"train_{n}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        pieces = [ids[i:i + n - special] for ids in train_ids for i in range(0, len(ids) - n + special + 1,
                                                                             n - special)]
        content = "".join(json.dumps({"text": t}) + "\n" for t in (tok.decode(p) for p in pieces))
        if not path.is_file() or path.read_text(encoding="utf-8") != content:  # unchanged: keep the token cache
            path.write_text(content, encoding="utf-8")
        files[n] = path
    longest = max(cfg.eval.multiples) * cfg.base.seq_len
    heldout = [ids[:longest] for ids in tok.encode_batch(held) if len(ids) >= longest][:d.heldout_docs]
    if len(heldout) < d.heldout_docs:
        raise ValueError(f"data: only {len(heldout)} held-out documents have {longest} tokens, "
                         f"data.heldout_docs = {d.heldout_docs}; lower it or data.min_chars / base.seq_len")
    search_len = max(cfg.extension.factors) * cfg.base.seq_len
    search = [ids for ids in train_ids if len(ids) >= search_len]
    return files, heldout, search[:cfg.longrope_search.docs]


def _recipe(cfg: BenchConfig, name: str, run_dir: Path, model: dict, stage: dict, train: dict, data_path: Path,
            source: str):
    from longtrain.config import build_recipe

    d = cfg.data
    raw = {"name": name, "run_dir": str(run_dir), "model": model,
           "data": {"sources": [{"path": str(data_path), "weight": d.text_weight},
                                {"path": "synthetic:passkey", "weight": d.passkey_weight,
                                 "options": {"digits": d.passkey_digits, "filler": "repeat"}}],
                    "packing": "continuous", "seed": d.seed},
           "train": {"optimizer": {"name": "adamw", "lr": train["lr"], "betas": [0.9, 0.95], "weight_decay": 0.0},
                     "schedule": {"warmup_steps": train["warmup_steps"], "decay": "cosine",
                                  "min_lr_ratio": train["min_lr_ratio"]},
                     "micro_batch": train["micro_batch"], "grad_clip": 1.0, "resume": "never", "seed": 0},
           "checkpoint": {"every_steps": 0, "keep_last": 1},
           "logging": {"every_steps": 10, "progress_bar": False, "plot": False},
           "stages": [stage]}
    return build_recipe(raw, file=source)


def train_base(cfg: BenchConfig, out: Path, data_path: Path, source: str) -> tuple[Path, float, bool]:
    """Train the base model at L through the trainer; returns its run directory, last loss and whether reused.

    A finished base run already in `out` whose saved recipe equals the one generated now (same model, data,
    steps, schedule) is reused instead of trained again, so a comparison can be re-run with other extension
    settings from the same base.
    """
    from longtrain.checkpoint.store import complete_checkpoints
    from longtrain.trainer.train import train

    b = cfg.base
    model = {"flavor": cfg.model.flavor, "overrides": {**cfg.model.overrides, "max_position_embeddings": b.seq_len},
             "tokenizer": cfg.model.tokenizer, "dtype": cfg.dtype, "attention": cfg.attention,
             "init_seed": cfg.model.init_seed}
    recipe = _recipe(cfg, "base", out / "runs" / "base", model, {"name": "base", "seq_len": b.seq_len,
                                                                  "steps": b.steps},
                     {"lr": b.lr, "warmup_steps": b.warmup_steps, "min_lr_ratio": b.min_lr_ratio,
                      "micro_batch": b.micro_batch}, data_path, f"{source} (generated base recipe)")
    run_dir = Path(recipe.run_dir)
    saved = run_dir / "recipe.yaml"
    if saved.is_file() and complete_checkpoints(run_dir / "checkpoints") and \
            yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False)):
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if line.startswith("{")]
        last = [m for m in logged if m.get("step") == b.steps and "loss" in m]
        if last:
            print(f"base: reusing the finished base run in {run_dir} (same recipe)", flush=True)
            return run_dir, last[-1]["loss"], True
    res = train(recipe)
    return run_dir, res.losses[max(res.losses)], False


def train_extension(cfg: BenchConfig, out: Path, base_hf: Path, method: str, f: int, rope: dict, max_pos: int,
                    data_path: Path, source: str) -> tuple[Path, float]:
    """Fine-tune the exported base at f * L with `rope`; the same budget for every method."""
    from longtrain.trainer.train import train

    e, L = cfg.extension, cfg.base.seq_len
    model = {"path": str(base_hf), "tokenizer": cfg.model.tokenizer, "dtype": cfg.dtype, "attention": cfg.attention}
    stage = {"name": f"{method}-{f}x", "seq_len": f * L, "steps": e.steps, "rope": rope,
             "max_position_embeddings": max_pos}
    recipe = _recipe(cfg, f"{method}-{f}x", out / "runs" / f"{method}-{f}x", model, stage,
                     {"lr": e.lr, "warmup_steps": e.warmup_steps, "min_lr_ratio": e.min_lr_ratio,
                      "micro_batch": e.tokens_per_step // (f * L)}, data_path,
                     f"{source} (generated {method} {f}x recipe)")
    res = train(recipe)
    return Path(recipe.run_dir), res.losses[max(res.losses)]


def prepare_eval_model(model, cfg: BenchConfig, device: str):
    """The model on `device` in the eval dtype with the eval attention backend installed (rotary stays fp32)."""
    from longtrain.eval.scoring import set_eval_attention

    model = model.to(device=device, dtype=torch.bfloat16 if cfg.eval.dtype == "bfloat16" else torch.float32)
    set_eval_attention(model, cfg.eval.attention)
    return model


def evaluate_model(model, tok, cfg: BenchConfig, heldout: list[list[int]], name: str) -> dict:
    """Perplexity on the held-out documents and passkey accuracy at every eval length (longtrain.eval)."""
    from longtrain.eval.evaluate import evaluate

    L = cfg.base.seq_len
    lengths = [m * L for m in cfg.eval.multiples]
    res = evaluate(model, tok, lengths, tasks=["perplexity", "passkey"], depths=cfg.eval.depths,
                   samples=cfg.eval.samples, name=name, data=heldout, packing="document",
                   batch_size=cfg.eval.batch_size, attention=cfg.eval.attention,
                   task_options={"passkey": {"digits": cfg.data.passkey_digits, "filler": "repeat"}})
    grid = res["retrieval"]["passkey"]
    # Answer-token accuracy beside exact match: a smoother signal where a small model gets some digits right.
    token = [sum(row) / len(row) for row in grid["token_accuracy"]]
    return {"ppl": {str(m): res["perplexity"][str(m * L)]["ppl"] for m in cfg.eval.multiples},
            "passkey": {str(m): a for m, a in zip(cfg.eval.multiples, grid["by_length"])},
            "passkey_token": {str(m): a for m, a in zip(cfg.eval.multiples, token)},
            "passkey_grid": grid["accuracy"], "eval_seconds": res["seconds"]}


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def run(cfg: BenchConfig, out: Path, source: str) -> list[dict]:
    """The whole benchmark; writes results.jsonl, report.md and the plots into `out`.

    Returns:
        The result rows (base, then per factor and method: training-free and fine-tuned).
    """
    from longtrain.data.tokenizer import load_tokenizer
    from longtrain.eval.load import load_for_eval
    from longtrain.model.hf import save_hf

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    meta = {"config": asdict(cfg), "config_file": source, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "load_before": os.getloadavg(), "timings": {}}
    t0 = time.time()
    tok = load_tokenizer(cfg.model.tokenizer)
    data_files, heldout, search_docs = prepare_data(cfg, out, tok)
    meta["heldout"] = {"documents": len(heldout), "tokens_each": len(heldout[0])}

    t = time.time()
    base_run, base_loss, meta["base_reused"] = train_base(cfg, out, data_files[cfg.base.seq_len], source)
    meta["timings"]["base_train_s"] = time.time() - t
    model, _, _ = load_for_eval(base_run, device="cpu")
    base_hf = save_hf(model, out / "base_hf", overwrite=True)
    model = prepare_eval_model(model, cfg, device)
    theta = float(model.args.rope["rope_theta"])
    meta["model"] = {"params": sum(p.numel() for p in model.parameters()), "args": asdict(model.args)}
    base_row = {"method": "base", "factor": 1, "steps": 0, "rope": dict(model.args.rope),
                "max_position_embeddings": model.args.max_position_embeddings, "train_loss": base_loss,
                **evaluate_model(model, tok, cfg, heldout, "base")}
    _append(results, base_row)
    rows = [base_row]
    print(f"base: loss {base_loss:.3f}, ppl {base_row['ppl']}, passkey {base_row['passkey']}", flush=True)

    ropes: dict[tuple[str, int], tuple[dict, int]] = {}
    meta["longrope_search"] = {}
    for f in cfg.extension.factors:
        for method in cfg.methods:
            lam = None
            if method == "longrope":
                t = time.time()
                lam, table = search_longrope(model, cfg, f, search_docs, theta)
                meta["longrope_search"][str(f)] = {"candidates": table, "seconds": time.time() - t}
            ropes[method, f] = method_rope(cfg, method, f, theta, lam)

    t = time.time()
    cache: dict[str, dict] = {}  # identical (rope, max_pos) pairs (default, abf at 4x and 8x) are scored once
    for (method, f), (rope, max_pos) in ropes.items():
        key = json.dumps([rope, max_pos], sort_keys=True)
        if key not in cache:
            model.set_rope(rope, max_pos)
            cache[key] = evaluate_model(model, tok, cfg, heldout, f"{method} {f}x training-free")
        row = {"method": method, "factor": f, "steps": 0, "rope": rope, "max_position_embeddings": max_pos,
               "train_loss": None, **cache[key]}
        _append(results, row)
        rows.append(row)
        print(f"{method} {f}x training-free: ppl {row['ppl']}, passkey {row['passkey']}", flush=True)
    meta["timings"]["training_free_eval_s"] = time.time() - t
    del model
    write_report(rows, meta, out, plots=False)  # partial tables, in case a time limit stops the run

    t_train = t_eval = 0.0
    for (method, f), (rope, max_pos) in ropes.items():
        t = time.time()
        run_dir, loss = train_extension(cfg, out, base_hf, method, f, rope, max_pos,
                                        data_files[f * cfg.base.seq_len], source)
        t_train += time.time() - t
        t = time.time()
        tuned = prepare_eval_model(load_for_eval(run_dir, device=device)[0], cfg, device)
        row = {"method": method, "factor": f, "steps": cfg.extension.steps, "rope": rope,
               "max_position_embeddings": max_pos, "train_loss": loss,
               **evaluate_model(tuned, tok, cfg, heldout, f"{method} {f}x fine-tuned")}
        t_eval += time.time() - t
        del tuned
        if not cfg.keep_checkpoints:
            import shutil

            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        _append(results, row)
        rows.append(row)
        print(f"{method} {f}x fine-tuned: loss {loss:.3f}, ppl {row['ppl']}, passkey {row['passkey']}", flush=True)
        write_report(rows, meta, out, plots=False)
    meta["timings"] |= {"extension_train_s": t_train, "extension_eval_s": t_eval, "total_s": time.time() - t0}
    meta["load_after"] = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: what the run costs on an idle machine
    meta["timings"]["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    write_report(rows, meta, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="benchmarks/configs/rope_methods_{cpu,gpu}.yaml")
    p.add_argument("--out", required=True, help="output folder: results.jsonl, meta.json, report.md, PNGs")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite report.md and the plots from OUT/results.jsonl and OUT/meta.json")
    args = p.parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        if not (out / "meta.json").is_file() or not (out / "results.jsonl").is_file():
            raise ValueError(f"--report-only: {out} holds no finished run (meta.json and results.jsonl)")
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        print(f"report: {write_report(rows, json.loads((out / 'meta.json').read_text()), out)}")
        return 0
    cfg = load_config(args.config)
    run(cfg, Path(args.out), args.config)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

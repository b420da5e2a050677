"""Data pipeline throughput: tokenization + packing of ~100 MB of text on this machine (CPU).

Writes a JSONL corpus of real text (the Python standard library's sources, plus generated documents until the
size is reached), then measures with the real pipeline (`build_loader`):
  1. tokenization into the `datasets` Arrow cache (cold), tokens/s and MB/s;
  2. loader build on a warm cache (what every later run pays);
  3. packing: batches of (micro_batch, seq_len) for one full pass over the tokens, tokens/s;
  4. starvation: with a background prefetch worker and a simulated step time, how long `next()` waits.

Usage:
    python benchmarks/data_throughput.py --mb 100 --seq-len 8192 --micro-batch 1 --step-ms 50
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from longtrain.data.corpus import stdlib_documents, tiny_corpus_documents
from longtrain.data.loader import build_loader
from longtrain.data.sources import SourceSpec
from longtrain.data.tokenizer import load_tokenizer


def write_corpus(path: Path, mb: float) -> tuple[int, int]:
    """A JSONL file of about `mb` megabytes: stdlib sources first, then generated documents. (bytes, docs)"""
    target = int(mb * 1e6)
    size = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        for _, text in stdlib_documents(min_chars=1):
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size, docs = size + len(text.encode()), docs + 1
            if size >= target:
                return size, docs
        seed = 0
        while size < target:
            for text in tiny_corpus_documents(n_docs=2000, seed=seed):
                f.write(json.dumps({"text": text}) + "\n")
                size, docs = size + len(text.encode()), docs + 1
            seed += 1
    return size, docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="megabytes of text")
    ap.add_argument("--tokenizer", default="builtin", help="'builtin' or a local HF tokenizer directory")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--packing", default="continuous")
    ap.add_argument("--step-ms", type=float, default=50.0, help="simulated training step for the starvation test")
    ap.add_argument("--steps", type=int, default=200, help="steps of the starvation test")
    args = ap.parse_args()

    tok = load_tokenizer(args.tokenizer)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
                 platform.machine(), "threads": torch.get_num_threads(), "tokenizer": tok.name, **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        out["bytes"], out["documents"] = write_corpus(corpus, args.mb)
        out["write_s"] = round(time.perf_counter() - t0, 1)
        spec = [SourceSpec(str(corpus))]
        kw = dict(packing=args.packing, cache_dir=str(Path(tmp) / "cache"))

        # Wall time and this process's CPU time (the machine may be shared; CPU time says what the work costs).
        t0, c0 = time.perf_counter(), time.process_time()
        loader = build_loader(spec, tok, args.seq_len, args.micro_batch, prefetch=0, **kw)
        cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = loader.stats[0].tokens
        out |= {"tokens": tokens, "tokenize_cold_s": round(cold, 1), "tokenize_cpu_s": round(cold_cpu, 1),
                "tokenize_tokens_per_s": round(tokens / cold), "tokenize_tokens_per_cpu_s": round(tokens / cold_cpu),
                "tokenize_mb_per_s": round(out["bytes"] / 1e6 / cold, 2)}

        t0 = time.perf_counter()
        loader = build_loader(spec, tok, args.seq_len, args.micro_batch, prefetch=0, **kw)
        out["build_warm_s"] = round(time.perf_counter() - t0, 2)

        per_batch = args.seq_len * args.micro_batch
        n_batches = max(1, tokens // per_batch)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(loader)
        pack, pack_cpu = time.perf_counter() - t0, time.process_time() - c0
        out |= {"pack_batches": n_batches, "pack_s": round(pack, 2), "pack_cpu_s": round(pack_cpu, 2),
                "pack_tokens_per_s": round(n_batches * per_batch / pack),
                "batch_ms": round(1000 * pack / n_batches, 3)}

        loader = build_loader(spec, tok, args.seq_len, args.micro_batch, prefetch=4, **kw)
        next(loader)  # start the worker
        waits = []
        for _ in range(args.steps):
            time.sleep(args.step_ms / 1000)  # the GPU step
            t0 = time.perf_counter()
            next(loader)
            waits.append(time.perf_counter() - t0)
        loader.close()
        waits.sort()
        out |= {"prefetch_wait_ms_median": round(1000 * waits[len(waits) // 2], 3),
                "prefetch_wait_ms_max": round(1000 * waits[-1], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

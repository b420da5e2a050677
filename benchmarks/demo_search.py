"""Search for the CPU demo's settings: a tiny Llama trained on passkey retrieval at a short context, then
extended to 4x that context with a RoPE method, with passkey accuracy at 1x/2x/4x before and after.

A minimal training loop over `longtrain.Transformer` (the trainer is being written beside this); each trial
prints its accuracies, wall time and the machine load so that timings taken on a shared CPU can be judged.

    python benchmarks/demo_search.py --trial base          # one named trial, see TRIALS
    python benchmarks/demo_search.py --trial base steps=300 lr=3e-3

Tasks come from `longtrain.data.synthetic.passkey_sample` with the builtin tokenizer, as in the demo recipe.
Accuracy is teacher-forced exact match of all answer tokens (argmax at every answer position == greedy decoding).

Findings, 2026-11-26, 2 shared CPU cores (load 6-19 from other jobs; `cpu_s` = this process's CPU seconds),
builtin tokenizer (the passkey's fixed text is 131 tokens, so the base length is 256), repeat filler, full loss
unless noted. "No copying" = the per-token loss stays above the floor of unpredictable digits, i.e. neither
the answer nor the needle's second copy of the key is predicted.
  - 4 layers x 128, lr 3e-3, batch 8 (the first recipe draft), 3 digits: loss plateau 0.093 from step 100 to
    200, no copying.
  - 2 x 128, lr 3e-3, batch 16, loss on the answer only, 3 digits: answer loss 1.64 at step 100 (chance 1.73).
  - 2 x 128, lr 1e-2, batch 8, 400 steps, 3 digits: 0 / 0 / 0 % at 256 / 512 / 1024 (122 cpu s).
  - same, 2 digits: loss 0.074 at step 200, no copying; 2 digits with text filler: loss 0.38 at step 300.
  - same, 1 digit (chance 11 %), 300 steps: 23 / 20 / 13 %; PI x4 untrained 0 / 20 / 0 %; PI + 40 steps at
    1024: 0 / 17 / 0 %. Perplexity on passkey sequences shows the extension plainly (docs/eval-example):
    base 1.52 / 1.59 / 1.90, after PI 1.61 / 1.22 / 1.09 at 256 / 512 / 1024.
  - 2 x 64 at 144 tokens, batch 16, 2 digits at a fixed depth: 0 % at 250 steps (full or answer-only loss);
    1 digit at a fixed depth: 31 % at 350 steps, 6 % at 400; 2 digits, random depth, lr 5e-3: 0 % at 500.
  - 2 x 64 at 144 tokens, batch 16, 2 digits, random depth, lr 5e-3 (warmup 50, then constant), longer:
    accuracy 0 / 8 / 29 / 62 / 71 / 75 % after 500 / 750 / 1000 / 1250 / 1500 / 1750 steps (1061 cpu s at 2
    threads, 24 samples per point). Retrieval forms after ~1000 steps x 16 sequences: every short trial above
    stopped before that.
The demo's budget on an idle machine (2 x 128 at 256 x 16 tokens: 0.19 s/step measured idle, 1024 x 4: 0.96
s/step) allows ~1500 steps at 256 plus ~80 at 1024 in about 7 minutes, which is what recipes/tiny-demo.yaml now
asks for (2 digits, lr 5e-3). Unverified end to end at 256 tokens with the trainer (not run: no idle CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

from longtrain import ModelArgs, Transformer


@dataclass
class Trial:
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 32
    mlp: int = 384
    rope_theta: float = 10000.0
    base_len: int = 256
    curriculum: str = ""  # e.g. "64:100" = first 100 steps at length 64
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    answer_weight: float = 1.0  # weight of answer tokens relative to filler tokens (0 filler weight if < 0)
    filler_weight: float = 1.0
    digits: int = 3
    filler: str = "repeat"  # repeat | random | text | echo (longtrain.data.synthetic)
    template: str = "classic"  # classic | compact (longtrain.data.synthetic.PASSKEY_TEMPLATES)
    ext_method: str = "linear"  # linear | yarn | abf | none
    ext_factor: float = 4.0
    ext_steps: int = 60
    ext_lr: float = 1e-3
    ext_batch: int = 8
    eval_samples: int = 100
    seed: int = 0
    device: str = "cpu"  # cuda: a search runs many trials at once on one GPU (same fp32 math, ~20x faster)
    curve_every: int = 0  # evaluate 1x and 4x every this many base steps (0: only at the end)
    curve_samples: int = 40
    ext_variants: str = ""  # extra extensions from the same base, "method:steps:lr,..." (e.g. "yarn:300:2e-3")
    save: str = ""  # a folder: write the model after each phase as HF dirs base/ and after/ (bf16)


# ---------------------------------------------------------------------------------------------- task
_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        from longtrain.data.tokenizer import load_tokenizer

        _TOK = load_tokenizer("builtin")
    return _TOK


def sample(t: Trial, seq_len: int, depth: float, rng: random.Random) -> tuple[list[int], int, list[int]]:
    """(ids, answer_start, answer_ids) of one passkey sequence from longtrain.data.synthetic."""
    from longtrain.data.synthetic import passkey_sample

    s = passkey_sample(tokenizer(), seq_len, depth, rng, digits=t.digits, filler=t.filler, template=t.template)
    return s.input_ids, s.answer_start, s.answer_ids


def make_batch(t: Trial, seq_len: int, bs: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, weights), labels shifted; weights up-weight the answer tokens."""
    ids, lab, wts = [], [], []
    for _ in range(bs):
        x, start, ans = sample(t, seq_len, rng.random(), rng)
        x = torch.tensor(x)
        y = torch.cat([x[1:], torch.tensor([-100])])
        w = torch.full((len(x),), t.filler_weight)
        w[start - 1:start - 1 + len(ans)] = t.answer_weight
        ids.append(x), lab.append(y), wts.append(w)
    return torch.stack(ids), torch.stack(lab), torch.stack(wts)


@torch.no_grad()
def passkey_accuracy(model: Transformer, t: Trial, seq_len: int, n: int, seed: int) -> float:
    """Teacher-forced exact match of the answer (argmax at every answer position == greedy decoding)."""
    rng = random.Random(seed)
    model.eval()
    correct = 0
    bs = max(1, 4096 // seq_len)
    for i in range(0, n, bs):
        items = [sample(t, seq_len, (i + j) / max(1, n - 1), rng) for j in range(min(bs, n - i))]
        x = torch.tensor([it[0] for it in items], device=t.device)
        logits = model(x)
        for row, (ids, start, ans) in enumerate(items):
            pred = logits[row, start - 1:start - 1 + len(ans)].argmax(-1).tolist()
            correct += pred == ans
    model.train()
    return correct / n


def train(model: Transformer, t: Trial, seq_len_at, steps: int, bs: int, lr: float, rng: random.Random,
          on_step=None) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = min(t.warmup, steps // 5)
    loss_v = float("nan")
    for step in range(steps):
        f = (step + 1) / warm if step < warm else t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        L = seq_len_at(step)
        x, y, w = make_batch(t, L, max(1, bs * t.base_len // L) if L < t.base_len else bs, rng)
        x, y, w = x.to(t.device), y.to(t.device), w.to(t.device)
        logits = model(x)
        tok = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100)
        w = w.flatten() * (y.flatten() != -100)
        loss = (tok * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())
        if on_step is not None:
            on_step(step + 1)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} len {L} loss {loss_v:.4f} lr {lr * f:.2e} load {os.getloadavg()[0]:.1f}", flush=True)
    return loss_v


def run_trial(t: Trial) -> dict:
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    args = ModelArgs(vocab_size=tokenizer().vocab_size, dim=t.dim, n_layers=t.n_layers, n_heads=t.n_heads, n_kv_heads=t.n_heads,
                     head_dim=t.head_dim, intermediate_size=t.mlp, max_position_embeddings=t.base_len,
                     rope={"rope_type": "default", "rope_theta": t.rope_theta}, bos_token_id=tokenizer().bos_id, eos_token_id=tokenizer().eos_id)
    model = Transformer(args)
    model.init_weights(t.seed)
    model.to(t.device)
    lens = [t.base_len, 2 * t.base_len, 4 * t.base_len]
    cur = [(int(a), int(b)) for a, b in (c.split(":") for c in t.curriculum.split(",") if c)]

    def len_at(step: int) -> int:
        done = 0
        for L, n in cur:
            done += n
            if step < done:
                return L
        return t.base_len

    c0 = time.process_time()
    t0 = time.time()
    load0 = os.getloadavg()[0]
    curve = []

    def on_step(step: int) -> None:
        if t.curve_every and step % t.curve_every == 0 and step < t.steps:
            accs = [passkey_accuracy(model, t, L, t.curve_samples, 99) for L in (lens[0], lens[2])]
            curve.append([step, *accs])
            print(f"curve step {step} acc 1x/4x {accs}", flush=True)

    loss1 = train(model, t, len_at, t.steps, t.batch, t.lr, rng, on_step)
    t1 = time.time()
    before = [passkey_accuracy(model, t, L, t.eval_samples, 1234) for L in lens]
    print(f"base: loss {loss1:.4f} acc {before} in {t1 - t0:.0f} s (cpu {time.process_time() - c0:.0f} s), "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    _save(model, t, "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    variants = {}
    for spec in [v for v in t.ext_variants.split(",") if v]:
        method, steps, lr = spec.split(":")
        model.load_state_dict(base_state)
        model.set_rope({"rope_type": "default", "rope_theta": t.rope_theta}, t.base_len)
        variants[spec] = _extend(model, replace(t, ext_method=method, ext_steps=int(steps), ext_lr=float(lr)), lens, rng)
        print(f"variant {spec}: {variants[spec]}", flush=True)
    model.load_state_dict(base_state)
    model.set_rope({"rope_type": "default", "rope_theta": t.rope_theta}, t.base_len)
    t2 = time.time()
    _set_ext_rope(model, t)
    no_train = [passkey_accuracy(model, t, L, t.eval_samples, 1234) for L in lens]
    t3 = time.time()
    loss2 = train(model, replace(t, base_len=4 * t.base_len, warmup=min(t.warmup, 10)), lambda s: 4 * t.base_len,
                  t.ext_steps, t.ext_batch, t.ext_lr, rng) if t.ext_steps else float("nan")
    t4 = time.time()
    after = [passkey_accuracy(model, t, L, t.eval_samples, 1234) for L in lens]
    t5 = time.time()
    _save(model, t, "after")
    res = {"trial": asdict(t), "lens": lens, "loss_base": round(loss1, 4), "loss_ext": round(loss2, 4),
           "before": before, "ext_no_train": no_train, "after": after, "curve": curve, "variants": variants,
           "s_base": round(t1 - t0, 1), "s_eval": round(t2 - t1 + t3 - t2 + t5 - t4, 1), "s_ext": round(t4 - t3, 1),
           "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
           # CPU seconds of this process: close to the unloaded wall time with THREADS=1, what a shared machine hides
           "cpu_s": round(time.process_time() - c0, 1)}
    return res


def _extend(model: Transformer, t: Trial, lens: list[int], rng: random.Random) -> dict:
    """Set the extension's rope, train t.ext_steps at 4x, return accuracies untrained and after."""
    _set_ext_rope(model, t)
    no_train = [passkey_accuracy(model, t, L, t.eval_samples, 1234) for L in lens]
    train(model, replace(t, base_len=4 * t.base_len, warmup=min(t.warmup, 10)), lambda s: 4 * t.base_len,
          t.ext_steps, t.ext_batch, t.ext_lr, rng)
    return {"no_train": no_train, "after": [passkey_accuracy(model, t, L, t.eval_samples, 1234) for L in lens]}


def _set_ext_rope(model: Transformer, t: Trial) -> None:
    match t.ext_method:
        case "linear":
            model.set_rope({"rope_type": "linear", "rope_theta": t.rope_theta, "factor": t.ext_factor}, 4 * t.base_len)
        case "yarn":
            model.set_rope({"rope_type": "yarn", "rope_theta": t.rope_theta, "factor": t.ext_factor,
                            "original_max_position_embeddings": t.base_len}, 4 * t.base_len)
        case "abf":
            model.set_rope({"rope_type": "default", "rope_theta": t.rope_theta * t.ext_factor ** 2}, 4 * t.base_len)
        case "none":
            pass
        case _:
            raise ValueError(t.ext_method)


def _save(model: Transformer, t: Trial, name: str) -> None:
    if not t.save:
        return
    import tempfile

    from longtrain import save_hf

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer().save(tok_dir)
        save_hf(model, os.path.join(t.save, name), dtype=torch.bfloat16, tokenizer_dir=tok_dir, overwrite=True)


TRIALS: dict[str, dict] = {
    "base": {},
}

# Grids: lists of override strings, run as parallel processes (`--grid NAME --jobs N`).
_G1_COMMON = ("base_len=128 steps=4000 batch=16 lr=5e-3 warmup=50 digits=2 template=compact ext_method=yarn "
              "ext_steps=150 ext_lr=1e-3 ext_batch=4 eval_samples=100 curve_every=1000 "
              "ext_variants=linear:150:1e-3,yarn:400:2e-3")
GRIDS: dict[str, list[str]] = {
    "g1": [_G1_COMMON + " " + extra for extra in (
        "filler=repeat answer_weight=1 filler_weight=0",            # the recipe of 2026-11-26 (answer-only loss)
        "filler=echo",                                              # copyable filler, loss on every token
        "filler=echo lr=1e-2",
        "filler=echo dim=64 head_dim=16 mlp=192",
        "filler=repeat",
        "filler=random answer_weight=1 filler_weight=0",
        "filler=echo digits=3",
        "filler=echo answer_weight=5",
        "filler=echo rope_theta=1000",
        "filler=echo rope_theta=100000",
        "filler=echo n_layers=3",
        "filler=repeat lr=1e-2 answer_weight=1 filler_weight=0",
    )],
}


def run_grid(name: str, jobs: int, log: str, device: str) -> None:
    """Run a grid's trials as `jobs` parallel processes of one thread each; each appends its JSON to `log`."""
    import subprocess

    todo = [(i, o) for i, o in enumerate(GRIDS[name])]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "THREADS": "1", "PYTHONUNBUFFERED": "1"}
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    while todo or running:
        while todo and len(running) < jobs:
            i, o = todo.pop(0)
            out = open(f"{log}.{name}-{i}.txt", "w")
            cmd = [sys.executable, __file__, "--trial", "base", "--log", log, f"device={device}", *o.split()]
            running.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trial", default="base")
    p.add_argument("--log", default="benchmarks/demo_search.jsonl")
    p.add_argument("--grid", default="", help="run a grid of trials (GRIDS) in parallel processes")
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--device", default="cpu", help="device of the grid's trials")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.grid:
        return run_grid(a.grid, a.jobs, a.log, a.device)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    t = replace(Trial(), **TRIALS[a.trial])
    types = {f.name: f.type for f in fields(Trial)}
    for o in a.overrides:
        k, v = o.split("=", 1)
        conv = {"int": int, "float": float, "str": str}[types[k]]
        t = replace(t, **{k: conv(v)})
    res = run_trial(t)
    res["name"] = a.trial + (" " + " ".join(a.overrides) if a.overrides else "")
    print(json.dumps(res))
    with open(a.log, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

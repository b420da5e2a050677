"""Tables and plots of the RoPE method comparison (benchmarks/rope_methods.py): report.md and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# Keys of a rope block not worth a table column (they follow from the others or are the defaults).
_HIDDEN_KEYS = ("rope_type", "short_factor", "long_factor")


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def _fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def hyper_table(rows: list[dict]) -> str:
    """One row per (method, factor): the registry type, its keys, and max_position_embeddings."""
    lines = ["| method | factor | rope_type | hyper-parameters | max_position_embeddings |", "|---|---|---|---|---|"]
    for r in rows:
        if r["steps"] or r["method"] == "base":
            continue
        keys = {k: v for k, v in r["rope"].items() if k not in _HIDDEN_KEYS}
        if "long_factor" in r["rope"]:
            keys["long_factor"] = "[" + ", ".join(f"{v:.2f}" for v in r["rope"]["long_factor"]) + "]"
        text = ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in keys.items())
        lines.append(f"| {r['method']} | {r['factor']}x | {r['rope']['rope_type']} | {text} | "
                     f"{r['max_position_embeddings']} |")
    return "\n".join(lines)


def results_table(rows: list[dict], factor: int, multiples: list[int], L: int) -> str:
    """Perplexity and passkey accuracy at each eval length for the methods extended by `factor`."""
    head = (["method", "steps"] + [f"ppl {m}x ({m * L})" for m in multiples]
            + [f"passkey {m}x (tokens)" for m in multiples] + ["last train loss"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["factor"] not in (1, factor):
            continue
        cells = [r["method"] if r["method"] != "base" else "base (L, no extension)", str(r["steps"])]
        cells += [_fmt_ppl(r["ppl"].get(str(m))) for m in multiples]
        tok = r.get("passkey_token", {})
        cells += [f"{_fmt_acc(r['passkey'].get(str(m)))} ({_fmt_acc(tok.get(str(m)))})" for m in multiples]
        cells.append("-" if r["train_loss"] is None else f"{r['train_loss']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking(rows: list[dict], factor: int, steps: int) -> list[tuple[str, float]]:
    """Methods of `factor` with `steps` extension steps, by perplexity at the target length (best first)."""
    sel = [(r["method"], r["ppl"].get(str(factor), math.inf)) for r in rows
           if r["factor"] == factor and r["steps"] == steps]
    return sorted(sel, key=lambda x: x[1] if math.isfinite(x[1]) else math.inf)


def plot_perplexity(rows: list[dict], factors: list[int], steps: list[int], L: int, path: Path) -> None:
    """Perplexity vs eval length, one panel per (factor, steps), one line per method (log scale)."""
    fig, axes = plt.subplots(len(steps), len(factors), figsize=(5.5 * len(factors), 4.0 * len(steps)),
                             squeeze=False)
    base = next(r for r in rows if r["method"] == "base")
    for i, s in enumerate(steps):
        for j, f in enumerate(factors):
            ax = axes[i][j]
            for k, r in enumerate([base] + [r for r in rows if r["factor"] == f and r["steps"] == s]):
                ms = sorted(int(m) for m in r["ppl"])
                style = dict(color="black", ls="--") if r is base else dict(color=f"C{k % 10}", ls="-")
                ax.plot([m * L for m in ms], [min(r["ppl"][str(m)], 1e4) for m in ms], marker="o", ms=3,
                        label=r["method"], **style)
            ax.axvline(L, color="grey", ls=":", lw=1)
            ax.axvline(f * L, color="grey", ls="-.", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 15, 20 rather than 1.5 x 10^1
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xlabel("eval length (tokens)")
            ax.set_ylabel("perplexity (held-out, capped at 1e4)")
            ax.set_title(f"extended {f}x, {'training-free' if s == 0 else f'{s} steps'}", fontsize=10)
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_passkey(rows: list[dict], factors: list[int], steps: list[int], multiples: list[int], path: Path,
                 key: str = "passkey") -> None:
    """Passkey heat maps (methods x eval lengths, mean over depths), one per (factor, steps).

    `key` "passkey" plots exact match, "passkey_token" the fraction of answer tokens predicted right.
    """
    fig, axes = plt.subplots(len(steps), len(factors), figsize=(2.5 + 1.9 * len(factors) + 0.6 * len(multiples)
                                                                 * len(factors), 0.6 + 3.6 * len(steps)),
                             squeeze=False, layout="constrained")
    im = None
    for i, s in enumerate(steps):
        for j, f in enumerate(factors):
            ax = axes[i][j]
            sel = [r for r in rows if r["method"] == "base"] + [r for r in rows if r["factor"] == f and r["steps"] == s]
            grid = [[r.get(key, {}).get(str(m), math.nan) for m in multiples] for r in sel]
            im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(multiples)), [f"{m}x" for m in multiples])
            ax.set_yticks(range(len(sel)), [r["method"] for r in sel])
            ax.set_title(f"{f}x, {'training-free' if s == 0 else f'{s} steps'}", fontsize=10)
            for a, row in enumerate(grid):
                for b, v in enumerate(row):
                    ax.text(b, a, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    label = "passkey exact match" if key == "passkey" else "passkey answer-token accuracy"
    fig.colorbar(im, ax=axes.ravel().tolist(), label=label, shrink=0.7)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(rows: list[dict], meta: dict, out: Path, plots: bool = True) -> Path:
    """report.md with the tables (and, with `plots`, perplexity.png and passkey.png) into `out`.

    Raises:
        ValueError: no base row.
    """
    if not any(r["method"] == "base" for r in rows):
        raise ValueError("write_report: the rows hold no base model result")
    cfg = meta["config"]
    L, factors, multiples = cfg["base"]["seq_len"], cfg["extension"]["factors"], cfg["eval"]["multiples"]
    steps = [0, cfg["extension"]["steps"]]
    if plots:
        plot_perplexity(rows, factors, steps, L, out / "perplexity.png")
        plot_passkey(rows, factors, steps, multiples, out / "passkey.png")
        if all("passkey_token" in r for r in rows):
            plot_passkey(rows, factors, steps, multiples, out / "passkey_tokens.png", key="passkey_token")
    t = meta["timings"]
    lines = [f"# RoPE methods: {cfg['name']}", "",
             f"- command: `{meta['command']}`; config `{meta['config_file']}`",
             f"- started {meta['started']}, finished {meta.get('finished', '?')}; device {meta['device']}, "
             f"{meta['cpu_count']} CPUs ({meta['cpu']}), torch {meta['torch']}, {meta['torch_threads']} threads; "
             f"load average before {meta['load_before'][0]:.1f}, after {meta.get('load_after', [math.nan])[0]:.1f}",
             f"- model: {meta['model']['params']:,} parameters; base trained {cfg['base']['steps']} steps at "
             f"L = {L}{' (reused from an earlier invocation with the same recipe)' if meta.get('base_reused') else ''}"
             f"; extensions {cfg['extension']['steps']} steps of {cfg['extension']['tokens_per_step']} "
             f"tokens at f x L, lr {cfg['extension']['lr']:g} cosine, warmup {cfg['extension']['warmup_steps']}",
             f"- eval: perplexity on {meta['heldout']['documents']} held-out documents x "
             f"{meta['heldout']['tokens_each']} tokens (the same tokens at every length); passkey "
             f"{cfg['data']['passkey_digits']} digits, depths {cfg['eval']['depths']}, {cfg['eval']['samples']} "
             f"samples per cell",
             "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()), "",
             "## Hyper-parameters", "", hyper_table(rows), ""]
    for f, search in meta.get("longrope_search", {}).items():
        best = min(search["candidates"], key=lambda c: c["ppl"])
        lines += [f"LongRoPE {f}x search (base model perplexity at {int(f) * L} tokens, training split): " +
                  ", ".join(f"{c['candidate']}: {_fmt_ppl(c['ppl'])}" for c in search["candidates"]) +
                  f"; chosen {best['candidate']}.", ""]
    for f in factors:
        lines += [f"## Extension to {f}x ({f * L} tokens)", "", results_table(rows, f, multiples, L), ""]
        for s in steps:
            order = ranking(rows, f, s)
            lines.append(f"- ranking by perplexity at {f * L} tokens, {'training-free' if s == 0 else f'{s} steps'}: "
                         + " < ".join(f"{m} ({_fmt_ppl(p)})" for m, p in order))
        lines.append("")
    lines += ["Passkey cells: exact match (answer-token accuracy). With a d-digit key after a space token, guessing "
              "scores about (1 + d / 10) / (d + 1) of the answer tokens.", "",
              "![perplexity by length](perplexity.png)", "", "![passkey](passkey.png)", ""]
    if (out / "passkey_tokens.png").is_file():
        lines += ["![passkey answer tokens](passkey_tokens.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return path

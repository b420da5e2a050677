"""Reports: a Markdown file plus PNG plots for one model, or several side by side (e.g. before/after extension).

Input is the results dict of `longtrain.eval.evaluate` (also written as results.json), so a report can be
re-made from saved results: {"name", "perplexity": {length: PerplexityResult.to_dict()}, "retrieval":
{task: RetrievalGrid.to_dict()}, "max_position_embeddings", "rope", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def _names(results: Sequence[dict]) -> list[str]:
    names = [r.get("name") or f"model {i}" for i, r in enumerate(results)]
    if len(set(names)) != len(names):  # same names would make the tables ambiguous
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    return names


def _lengths(results: Sequence[dict], key: str, task: str | None = None) -> list[int]:
    out: set[int] = set()
    for r in results:
        if key == "perplexity":
            out |= {int(L) for L in r.get("perplexity", {})}
        elif task in r.get("retrieval", {}):
            out |= set(r["retrieval"][task]["lengths"])
    return sorted(out)


def _fmt(x: float | None, pct: bool) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def summary_table(results: Sequence[dict], task: str = "passkey") -> str:
    """A Markdown table: mean accuracy over depths at each length (rows: models, columns: lengths).

    With two models a third row gives the change (second minus first), in percentage points.

    Raises:
        ValueError: no result holds `task`.
    """
    lengths = _lengths(results, "retrieval", task)
    if not lengths:
        raise ValueError(f"no result holds the {task!r} task; tasks present: "
                         f"{sorted({t for r in results for t in r.get('retrieval', {})})}")
    rows = []
    vals: list[list[float | None]] = []
    for name, r in zip(_names(results), results):
        grid = r.get("retrieval", {}).get(task)
        by_len = dict(zip(grid["lengths"], grid["by_length"])) if grid else {}
        v = [by_len.get(L) for L in lengths]
        vals.append(v)
        rows.append(f"| {name} | " + " | ".join(_fmt(x, True) for x in v) + " |")
    if len(results) == 2:
        d = [None if a is None or b is None else b - a for a, b in zip(*vals)]
        rows.append("| change | " + " | ".join("-" if x is None else f"{100 * x:+.0f} pt" for x in d) + " |")
    head = f"| {task} accuracy | " + " | ".join(str(L) for L in lengths) + " |"
    return "\n".join([head, "|" + "---|" * (len(lengths) + 1), *rows])


def perplexity_table(results: Sequence[dict]) -> str:
    """A Markdown table of perplexity per length (rows: lengths, columns: models)."""
    lengths = _lengths(results, "perplexity")
    names = _names(results)
    head = "| length | " + " | ".join(f"{n} ppl" for n in names) + " |"
    rows = []
    for L in lengths:
        cells = []
        for r in results:
            p = r.get("perplexity", {}).get(str(L)) or r.get("perplexity", {}).get(L)
            cells.append(f"{p['ppl']:.3f}" if p else "-")
        rows.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join([head, "|" + "---|" * (len(names) + 1), *rows])


def plot_heatmaps(results: Sequence[dict], task: str, path: Path) -> None:
    """One length x depth accuracy heatmap per model, side by side, annotated with the percentages."""
    have = [(n, r["retrieval"][task]) for n, r in zip(_names(results), results) if task in r.get("retrieval", {})]
    width = 1.6 + 0.9 * max(3, len(have[0][1]["depths"]))
    fig, axes = plt.subplots(1, len(have), figsize=(width * len(have) + 1.0, 1.6 + 0.5 * len(have[0][1]["lengths"])),
                             squeeze=False)
    for k, (ax, (name, g)) in enumerate(zip(axes[0], have)):
        im = ax.imshow(g["accuracy"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(g["depths"])), [f"{d:.2f}" for d in g["depths"]])
        ax.set_yticks(range(len(g["lengths"])), [str(L) for L in g["lengths"]])
        ax.set_xlabel("needle depth")
        if k == 0:
            ax.set_ylabel("context length (tokens)")
        ax.set_title(f"{name}\n{task}, {g['samples']} samples/cell", fontsize=9)
        for i, row in enumerate(g["accuracy"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="exact-match accuracy", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_perplexity(results: Sequence[dict], path: Path) -> None:
    """Perplexity vs length per model (left) and loss by position at each length (right).

    A dotted vertical line marks each model's `max_position_embeddings` (its trained or configured length).
    """
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, r) in enumerate(zip(_names(results), results)):
        ppl = {int(L): v for L, v in r.get("perplexity", {}).items()}
        if not ppl:
            continue
        color = f"C{k}"
        Ls = sorted(ppl)
        ax.plot(Ls, [ppl[L]["ppl"] for L in Ls], "o-", color=color, label=name)
        if r.get("max_position_embeddings"):
            ax.axvline(r["max_position_embeddings"], color=color, ls=":", lw=1)
            ax2.axvline(r["max_position_embeddings"], color=color, ls=":", lw=1)
        for j, L in enumerate(Ls):
            e = ppl[L]["bucket_edges"]
            mids = [(a + b - 1) / 2 for a, b in zip(e[:-1], e[1:])]
            ax2.plot(mids, ppl[L]["bucket_loss"], ".-", color=color, alpha=0.35 + 0.65 * (j + 1) / len(Ls),
                     label=f"{name} @ {L}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity by context length")
    ax.legend(fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("position in window (context size, tokens)")
    ax2.set_ylabel("mean loss (nats)")
    ax2.set_title("loss by position")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Sequence[dict], out_dir: str | Path, title: str | None = None) -> Path:
    """Write report.md, results.json and the plots of one or several models into `out_dir`.

    Args:
        results: results dicts of `evaluate` (one model, or several shown side by side in this order).
        out_dir: the folder (created).
        title: the report's heading (default: the model names).

    Returns:
        The path of report.md.

    Raises:
        ValueError: no results.
    """
    if not results:
        raise ValueError("write_report: no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _names(results)
    (out / "results.json").write_text(json.dumps(list(results) if len(results) > 1 else results[0], indent=1) + "\n")
    lines = [f"# {title or ' vs '.join(names)}", ""]
    for name, r in zip(names, results):
        lines.append(f"- **{name}**: {r.get('model', '?')}; rope `{json.dumps(r.get('rope'))}`, "
                     f"max_position_embeddings {r.get('max_position_embeddings')}, attention "
                     f"`{r.get('attention')}`, eval took {r.get('seconds', 0):.0f} s")
    lines.append("")
    tasks = sorted({t for r in results for t in r.get("retrieval", {})})
    for task in tasks:
        g0 = next(r["retrieval"][task] for r in results if task in r.get("retrieval", {}))
        lines += [f"## {task}", "",
                  f"Exact-match accuracy (teacher-forced argmax of every answer token, equal to greedy decoding), "
                  f"mean over depths {g0['depths']}, {g0['samples']} samples per cell; options "
                  f"`{json.dumps(g0['options'])}`.", "", summary_table(results, task), ""]
        plot_heatmaps(results, task, out / f"{task}_heatmap.png")
        lines += [f"![{task} heatmap]({task}_heatmap.png)", ""]
        for name, r in zip(names, results):
            g = r.get("retrieval", {}).get(task)
            if g and g["examples"]:
                ex = g["examples"][-1]
                lines.append(f"- {name}, length {ex['length']}: answer `{ex['answer']!s}`, predicted "
                             f"`{ex['predicted']!s}` ({'correct' if ex['correct'] else 'wrong'})")
        lines.append("")
    if any(r.get("perplexity") for r in results):
        p0 = next(iter(next(r for r in results if r.get("perplexity"))["perplexity"].values()))
        lines += ["## perplexity", "",
                  f"Sliding windows of each length (stride {'= length - 1' if p0['stride'] == p0['length'] - 1 else p0['stride']}"
                  f"), each token scored once; data: {results[0].get('perplexity_data', '?')}; right plot: mean loss at each position of the windows (dotted "
                  f"lines: max_position_embeddings).", "", perplexity_table(results), ""]
        plot_perplexity(results, out / "perplexity.png")
        lines += ["![perplexity](perplexity.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

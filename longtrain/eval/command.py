"""`longtrain eval MODEL_DIR --lengths 4096,16384 --tasks passkey,perplexity [--compare OTHER] [--out DIR]`.

cli.py wires `add_parser` and `run`. With --compare both models are scored on identical inputs (same seed) and
the report puts them side by side, MODEL first: `longtrain eval BASE --compare EXTENDED` shows the change
row as EXTENDED minus BASE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longtrain.eval.evaluate import EVAL_TASKS, evaluate
from longtrain.eval.load import load_for_eval
from longtrain.eval.report import summary_table, write_report


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one length")
    return out


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to `longtrain`'s subparsers and return its parser."""
    p = subparsers.add_parser("eval", help="perplexity by length and passkey/needle grids of a model; report + plots",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face directory, longtrain checkpoint (step-N, latest) or run directory")
    p.add_argument("--lengths", type=_int_list, required=True, help="context lengths, e.g. 4096,16384")
    p.add_argument("--tasks", type=_str_list, default=["passkey"], help=f"comma-separated: {', '.join(EVAL_TASKS)}")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=20, help="sequences per (length, depth) cell")
    p.add_argument("--compare", default=None, help="a second model, scored on the same inputs and shown beside")
    p.add_argument("--out", default=None, help="report folder (default: MODEL/eval, or ./eval for checkpoints)")
    p.add_argument("--data", default=None,
                   help="perplexity documents: .jsonl/.json/.parquet/.csv/.txt, a saved datasets dir, 'tiny', "
                        "'stdlib' or 'synthetic:passkey' (default: the bundled tiny corpus, concatenated)")
    p.add_argument("--text-field", default="text", help="text column of --data")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride, 1..length-1 (default: length-1)")
    p.add_argument("--packing", default="document", help="perplexity: document (each alone) | concat")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows per length at most")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--attention", default=None, help="attention backend (default: auto, the fastest that takes each "
                                                     "call, on a GPU; the model's own, the reference, on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="builtin | builtin:N | DIR (default: found with the model)")
    p.add_argument("--rope", default=None, help='JSON rope block replacing the model\'s, e.g. '
                                                '\'{"rope_type": "linear", "rope_theta": 10000, "factor": 4}\'')
    p.add_argument("--digits", type=int, default=5, help="passkey digits")
    p.add_argument("--filler", default="repeat", help="passkey/needle filler (longtrain.data.synthetic.FILLERS)")
    p.add_argument("--template", default="classic", help="passkey wording (longtrain.data.synthetic "
                                                           "PASSKEY_TEMPLATES): classic | compact | tight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="the model's name in the report (default: its folder name)")
    p.add_argument("--compare-name", default=None)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `longtrain eval` (see run_eval); bad input prints `error: <message>` and returns 2."""
    import sys

    try:
        return run_eval(args)
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def default_attention(attention: str | None, device: str) -> str | None:
    """--attention as given, else `auto` on a GPU: the reference backend a loaded model starts with materialises
    the (s, s) scores and fails at 16K on a GPU (issue 20); on CPU the model's own backend (the reference)."""
    import torch

    if attention is not None or torch.device(device).type == "cpu":
        return attention
    return "auto"


def run_eval(args: argparse.Namespace) -> int:
    """Run `longtrain eval`; prints the summary tables and the report path. Returns the exit code (0).

    Raises:
        ValueError: bad arguments (unknown task, missing model directory, bad rope JSON, empty data, a length the
            attention backend cannot run); the CLI shows the message.
    """
    rope = None
    if args.rope is not None:
        try:
            rope = json.loads(args.rope)
        except json.JSONDecodeError as e:
            raise ValueError(f"--rope is not valid JSON ({e}): {args.rope!r}") from None
        if not isinstance(rope, dict):
            raise ValueError(f"--rope must be a JSON object (a rope block), got {args.rope!r}")
    for t in args.tasks:
        if t not in EVAL_TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; valid: {', '.join(EVAL_TASKS)}")
    models = [(args.model, args.name)] + ([(args.compare, args.compare_name)] if args.compare else [])
    # Load both before the (long) evaluation, so a wrong second path fails at once.
    loaded = [(load_for_eval(path, rope=rope, device=args.device, tokenizer=args.tokenizer), path, name)
              for path, name in models]
    options = {"passkey": {"digits": args.digits, "filler": args.filler, "template": args.template}}
    options |= {t: {"filler": args.filler} for t in ("needle", "needle_mv", "needle_mq")}
    results = []
    for (model, tok, desc), path, name in loaded:
        results.append(evaluate(
            model, tok, args.lengths, tasks=args.tasks, depths=args.depths, samples=args.samples,
            name=name or Path(path).resolve().name, data=args.data, text_field=args.text_field, stride=args.stride,
            packing=args.packing, max_windows=args.max_windows, batch_size=args.batch_size,
            attention=default_attention(args.attention, args.device),
            task_options={t: o for t, o in options.items() if t in args.tasks},
            seed=args.seed, model_desc=desc))
    out = Path(args.out) if args.out else (Path(args.model) / "eval" if (Path(args.model) / "config.json").is_file()
                                           else Path("eval"))
    report = write_report(results, out)
    for task in results[0]["retrieval"]:
        print(summary_table(results, task))
    if results[0]["perplexity"]:
        from longtrain.eval.report import perplexity_table

        print(perplexity_table(results))
    print(f"report: {report}")
    return 0

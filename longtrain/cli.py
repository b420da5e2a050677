"""`longtrain` command line: train | export | eval | check-parallel | plan."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

# Commands implemented elsewhere, each a module with `add_parser(subparsers)` and `run(args) -> int`.
PLUGGED = {"eval": "longtrain.eval.command", "check-parallel": "longtrain.trainer.check_parallel",
           "plan": "longtrain.plan"}


def _train(args: argparse.Namespace) -> int:
    from longtrain.config import RecipeError, load_recipe
    from longtrain.trainer.train import TrainingError, train

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        return _fail(e, 2)
    try:
        result = train(recipe)
    except TrainingError as e:
        return _fail(e, 1)
    except Exception as e:
        if isinstance(e, (ValueError, NotImplementedError, ImportError)) and _raised_by_longtrain(e):
            return _fail(e, 2)
        _hold_back()  # a bug: the traceback stays, once (rank 0's, when rank 0 fails too)
        raise
    # Only after a run that ended normally: on an error, peers may still sit in a collective that a NCCL
    # shutdown would wait for.
    _close_process_group()
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.status == "done":
        print(f"done: {result.step} steps, run directory {result.run_dir}")
    else:
        print(f"{result.status} at step {result.step}; resume with the same command (train.resume=auto)")
    return 0


def _raised_by_longtrain(e: BaseException) -> bool:
    """A user error is a ValueError / NotImplementedError / ImportError that longtrain raised on purpose, with a
    message (STYLE.md "Errors"); one raised inside torch or another library is a bug and keeps its traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here + os.sep)


def _fail(e: BaseException, code: int) -> int:
    """One paragraph for a user error, on rank 0 (issue 20: not once per rank, not under gloo's noise).

    Every rank raises the same error for a recipe, resume or layout problem. Other ranks wait a moment before
    printing: when rank 0 failed too, the launcher has stopped them by then; when only this rank failed (its own
    file, its own data shard), its message still reaches the user.
    """
    _hold_back()
    rank = os.environ.get("RANK", "0")
    print(f"error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr, flush=True)
    return code


_QUIET_S = 10.0  # how long ranks other than 0 hold back their message (see _fail)


def _hold_back() -> None:
    if os.environ.get("RANK", "0") not in ("", "0"):
        import time

        time.sleep(_QUIET_S)


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _export(args: argparse.Namespace) -> int:
    import torch

    from longtrain.trainer.export import export_checkpoint

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=dtype, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _plugged(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(PLUGGED[name])
    except ModuleNotFoundError as e:
        if e.name is not None and PLUGGED[name].startswith(e.name):
            return None  # that command's module is not part of this build
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a recipe: longtrain train RECIPE.yaml [section.key=value ...]")
    p.add_argument("recipe", help="the YAML recipe")
    p.add_argument("overrides", nargs="*", help="overrides such as parallel.cp=4 stages.0.steps=100")
    p.set_defaults(run=_train)
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face directory")
    p.add_argument("checkpoint", help="runs/NAME/checkpoints/latest, a step-N folder, or a checkpoints folder")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(run=_export)
    for name in PLUGGED:
        module = _plugged(name)
        if module is not None:
            module.add_parser(sub)
            sub.choices[name].set_defaults(run=module.run)
        else:
            missing = sub.add_parser(name, help=f"(not available: {PLUGGED[name]} is not installed)")
            missing.set_defaults(run=lambda a, n=name: _missing(n))
    return parser


def _missing(name: str) -> int:
    raise NotImplementedError(f"`longtrain {name}` needs {PLUGGED[name]}, which this checkout does not have yet")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`longtrain` command line: train | export | eval | check-parallel | plan."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="run a recipe: longtrain train RECIPE.yaml [section.key=value ...]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise NotImplementedError(f"command {args.command!r} is not implemented yet")


if __name__ == "__main__":
    sys.exit(main())

"""The docs agree with the code (issue 20): every `longtrain` command shown in README.md, docs/*.md and the recipe
headers parses with the real command line (train commands with a shipped recipe also load it with their
overrides), every recipe key the docs name exists in the schema, and every schema key is documented in
docs/recipes.md. A renamed key or flag now fails here instead of misleading a user."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from longtrain.config import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RECIPE_HEADERS = sorted((REPO / "recipes").glob("*.yaml"))
SECTIONS = ("model", "data", "parallel", "memory", "train", "checkpoint", "logging", "eval", "stages")
COMMANDS = ("train", "export", "eval", "check-parallel", "plan")
# Dotted names in backticks that start like a recipe section but are Python objects, not recipe keys.
NOT_KEYS = {"parallel.apply", "model.args", "model.args.rope", "model.model"}
FILE_SUFFIXES = {"json", "safetensors", "py", "md", "yaml", "jsonl", "png", "txt", "pt", "jinja"}
# Docs about other programs' measurements (peers' code, their attribute names): not recipe documentation.
SKIP_KEYS_IN = {"benchmarks.md"}


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of what a reader would copy: fenced and indented code lines, backtick spans, recipe
    header comments."""
    out, fenced = [], False
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        while line.rstrip().endswith("\\") and n < len(lines):  # a shell command continued on the next line
            line = line.rstrip()[:-1] + " " + lines[n].lstrip("# ")
            lines[n] = ""
            n += 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if path.suffix == ".yaml":
            if line.startswith("#"):
                out.append((n, line.lstrip("# ")))
        elif fenced or line.startswith("    "):
            out.append((n, line))
        else:
            out += [(n, m) for m in re.findall(r"`([^`]+)`", line)]
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    pattern = re.compile(r"(?:^|[\s(`:])(?:-m\s+)?longtrain\s+(" + "|".join(COMMANDS) + r")\b([^#`]*)")
    for path in DOCS + RECIPE_HEADERS:
        for n, text in code_spans(path):
            for m in pattern.finditer(text):
                rest = re.sub(r"\([^)]*\)\s*$", "", m.group(2)).strip()  # a trailing "(data parallel)" remark
                if "[" in rest or "..." in rest:  # a usage line with placeholders, not a command
                    continue
                found.append((f"{path.relative_to(REPO)}:{n}", [m.group(1), *shlex.split(rest)]))
    return found


def field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def unwrap(t):
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return args[0]
    return t


def is_key(path: str) -> bool:
    """Whether `a.b.c` names a recipe key (list indices as numbers or N/i; dict-valued keys take anything)."""
    t = Recipe
    for part in path.split("."):
        t = unwrap(t)
        if typing.get_origin(t) is list:
            if not (part.isdigit() or part in ("N", "i")):
                return False
            t = typing.get_args(t)[0]
            continue
        if t is dict or typing.get_origin(t) is dict or t is typing.Any:
            return True
        if not dataclasses.is_dataclass(t):
            return False
        names = {f.name for f in dataclasses.fields(t)} - {"source"}
        if part not in names:
            return False
        t = field_type(t, part)
    return True


@pytest.mark.parametrize("where,argv", documented_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_documented_command_parses(where, argv):
    from longtrain.cli import build_parser

    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        # Prose names a command with only the flag it is about (`longtrain eval --data`): missing positionals
        # are fine there; an unknown flag or a bad value is not.
        assert "the following arguments are required" in err.getvalue(), f"{where}: {argv}\n{err.getvalue()}"
        return
    if argv[0] == "train" and (REPO / args.recipe).is_file():
        load_recipe(REPO / args.recipe, args.overrides)  # RecipeError on an unknown key or a bad value


def test_there_are_documented_commands():
    assert len(documented_commands()) >= 15


def test_every_recipe_key_named_in_the_docs_exists():
    bad = []
    pattern = re.compile(r"^((?:" + "|".join(SECTIONS) + r")(?:\.[A-Za-z0-9_]+)+)(?:=\S*)?$")
    for path in DOCS:
        if path.name in SKIP_KEYS_IN:
            continue
        for n, text in code_spans(path):
            for word in text.split():
                m = pattern.match(word.strip("`,;:()"))
                if not m or m.group(1) in NOT_KEYS or m.group(1).rsplit(".", 1)[1] in FILE_SUFFIXES:
                    continue
                if "unknown key" not in text and not is_key(m.group(1)):  # error examples show a wrong key
                    bad.append(f"{path.relative_to(REPO)}:{n}: `{m.group(1)}`")
    assert not bad, "documented keys that the recipe schema does not have:\n" + "\n".join(bad)


def test_the_recipe_reference_tables_name_real_keys():
    from longtrain.config import EvalConfig, ModelConfig, TrainConfig

    text = (REPO / "docs" / "recipes.md").read_text()
    for heading, cls in (("### Top level", Recipe), ("### `model`", ModelConfig), ("### `train`", TrainConfig)):
        table = text.split(heading, 1)[1].split("###", 1)[0]
        keys = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
        assert keys, heading
        assert set(keys) <= {f.name for f in dataclasses.fields(cls)}, (heading, keys)
    assert EvalConfig  # the eval section is prose; the next test covers its keys


def test_every_recipe_key_is_documented_in_the_reference():
    from longtrain.config import (CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, MemoryConfig,
                                  ModelConfig, ParallelConfig, StageConfig, TrainConfig)
    from longtrain.data.sources import SourceSpec

    text = (REPO / "docs" / "recipes.md").read_text()
    missing = [f"{cls.__name__}.{f.name}" for cls in (Recipe, ModelConfig, DataConfig, SourceSpec, ParallelConfig,
                                                       MemoryConfig, TrainConfig, CheckpointConfig, LoggingConfig,
                                                       EvalConfig, StageConfig)
               for f in dataclasses.fields(cls) if f.name != "source" and f"`{f.name}`" not in text]
    assert not missing, f"recipe keys without a word in docs/recipes.md: {missing}"

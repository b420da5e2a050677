"""YAML data -> typed dataclasses, with errors that name the file, the key path, the value and what is allowed.

The generic half of the recipe loader (config.py holds the schema): type checks against the dataclass hints,
unknown keys with a difflib suggestion, required keys, `a.b.c=value` overrides, deep merge, `${key}` values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml


class FieldError(ValueError):
    """A bad value found inside a section's `__post_init__`; the loader adds the file and the key path."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class RecipeError(ValueError):
    """A recipe problem, reported as one paragraph: file, key path, value, what is allowed."""


def suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_dataclass(tp: Any, value: Any, path: str, file: str) -> Any:
    """Turn YAML data into `tp` (a dataclass, list[...], X | None, scalar), checking types and keys."""
    def fail(allowed: str) -> RecipeError:
        return RecipeError(f"{file}: `{path}` = {value!r} is invalid: {allowed}.")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:  # the first type that accepts the value wins (bool before str in `bool | str`)
            try:
                return build_dataclass(a, value, path, file)
            except RecipeError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise fail(f"expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
        names = [f.name for f in dataclasses.fields(tp) if f.name != "source"]
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for k, v in value.items():
            if k not in names:
                raise RecipeError(f"{file}: unknown key `{path + '.' if path else ''}{k}`{suggest(str(k), names)}; "
                                  f"valid keys here are {', '.join(names)}.")
            kwargs[k] = build_dataclass(hints[k], v, f"{path}.{k}" if path else k, file)
        required = [f.name for f in dataclasses.fields(tp) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
        if required:
            where = f"`{path}`" if path else "the top level"
            raise RecipeError(f"{file}: {where} is missing the required key `{required[0]}` "
                              f"({_type_name(hints[required[0]])}); add it to the YAML or pass "
                              f"{path + '.' if path else ''}{required[0]}=VALUE on the command line.")
        try:
            return tp(**kwargs)
        except FieldError as e:
            key = f"{path}.{e.key}" if path else e.key
            raise RecipeError(f"{file}: `{key}` = {e.value!r} is invalid: {e.allowed}.") from None
        except (ValueError, NotImplementedError) as e:  # checks of classes from other modules (SourceSpec)
            raise RecipeError(f"{file}: `{path}` is invalid: {e}.") from None
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"expected a list of {_type_name(args[0])}")
        return [build_dataclass(args[0], v, f"{path}[{i}]", file) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise fail("expected a mapping")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-5 as text; the user meant the number
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            hint = " (a number such as 2.0e-5 is expected)" \
                if tp is float and isinstance(value, str) else ""
            raise fail(f"expected {tp.__name__}, got {type(value).__name__}{hint}")
        return value
    raise AssertionError(f"unhandled type {tp} at {path}")


def merge(base: Any, over: Any) -> Any:
    """Deep merge of YAML data: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(over)


def apply_override(raw: dict, override: str, file: str) -> None:
    """Apply one `a.b.c=value` (or `stages[1].steps=value`) to the raw YAML data; the value is parsed as YAML."""
    if "=" not in override:
        raise RecipeError(f"{file}: command-line override {override!r} is not of the form section.key=value "
                          f"(e.g. parallel.cp=4 or stages.0.steps=100).")
    dotted, text = override.split("=", 1)
    keys = [k for k in re.split(r"[.\[\]]+", dotted.strip()) if k]
    node: Any = raw
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"{file}: override {override!r}: `{'.'.join(keys[:i])}` has {len(node)} "
                                  f"entries, so the index must be 0..{len(node) - 1}, not {k!r}.")
            k = int(k)
        elif not isinstance(node, dict):
            raise RecipeError(f"{file}: override {override!r}: `{'.'.join(keys[:i])}` is not a section.")
        if last:
            node[k] = yaml.safe_load(text) if text.strip() else None
        else:
            if isinstance(node, dict) and node.get(k) is None:
                node[k] = {}
            node = node[k]


def interpolate(raw: dict, value: str, file: str) -> str:
    def lookup(m: re.Match) -> str:
        node: Any = raw
        for k in m.group(1).split("."):
            if not isinstance(node, dict) or k not in node:
                raise RecipeError(f"{file}: `run_dir` refers to ${{{m.group(1)}}}, which the recipe does not set.")
            node = node[k]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", lookup, value)



"""Rotary position embeddings: validation and Hugging Face export of rope blocks, and the module.

A rope block uses Hugging Face's `rope_parameters` vocabulary (transformers 5), e.g.
`{"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 8192}`.
The methods live in rope_methods.py, keyed by `rope_type` in `ROPE_METHODS`: each entry carries its frequency
function, its Hugging Face export rule and its max_position_embeddings rule. Hugging Face types: default (also
ABF, a new `rope_theta`), linear (PI), dynamic (dynamic NTK), yarn, llama3, longrope. Toolkit types, exported as a
Hugging Face type by `export_rope`: ntk (static NTK-aware) -> default with the scaled base; resonance -> longrope.

`max_position_embeddings` has its config.json meaning, which depends on the rope type (see `export_rope`).

Precision (PITFALLS.md): `inv_freq` is computed in fp64 and kept in fp32 (never cast with the model);
angles `pos * inv_freq` are fp32, or fp64 when positions reach 2**18, where fp32 loses ~0.06 rad.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any

import torch
from torch import Tensor, nn

from longtrain.kernels.rope_reference import apply_rotary
from longtrain.model.rope_methods import (RESONANCE_BASE_TYPES, ROPE_METHODS, YARN_ONLY_KEYS, RopeMethod,
                                          rope_args, rope_method)

__all__ = ["ROPE_METHODS", "RopeMethod", "FP64_ANGLES_FROM", "validate_rope", "export_rope", "rotary_dim",
           "compute_inv_freq", "depends_on_length", "context_length", "hf_max_position_embeddings",
           "RotaryEmbedding", "apply_rotary"]

FP64_ANGLES_FROM = 2**18  # positions at or beyond this use fp64 angles


# ---------------------------------------------------------------------------------------------------------------
# Validation and Hugging Face export

_FLOAT_KEYS = ("rope_theta", "factor", "partial_rotary_factor", "beta_fast", "beta_slow", "attention_factor",
               "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor")
_COMMON_KEYS = ("rope_type", "partial_rotary_factor")  # valid for every type (transformers 5 accepts both)


def _as_float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = (" (YAML 1.1 reads 1e6 as a string: write 1.0e6 or 1000000.0)" if isinstance(value, str) else "")
        raise ValueError(f"{path} = {value!r} must be a number{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{path} = {value!r} must be a finite number")
    return float(value)


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{path} = {value!r} is invalid: {allowed}")


def validate_rope(rope: dict, where: str = "rope", *, head_dim: int | None = None) -> dict:
    """Check a rope block and return it normalised: floats as floats, defaults filled, `rope_type` first.

    Args:
        rope: the block in transformers-5 `rope_parameters` form (the legacy key `type` is read as `rope_type`).
        where: the key path used in error messages, e.g. `stages[1].rope` or `config.json:rope_parameters`.
        head_dim: when given, also checks what depends on it (rotary dim even, longrope list lengths).

    Returns:
        A new dict; the input is not modified.

    Raises:
        ValueError: naming `where.key`, the bad value and what is allowed, for an unknown `rope_type`, a missing
            required key, an unknown key, a factor <= 1 where it must be > 1 (or < 1 anywhere), a non-numeric or
            out-of-range value, or longrope factor lists whose length is not rotary_dim / 2.
    """
    if not isinstance(rope, dict):
        raise ValueError(f"{where} must be a mapping like {{rope_type: default, rope_theta: 10000.0}}, got {rope!r}")
    r = dict(rope)
    if "type" in r:  # transformers 4 `rope_scaling` spelling
        legacy = r.pop("type")
        _check(r.setdefault("rope_type", legacy) == legacy, f"{where}.type", legacy,
               f"conflicts with {where}.rope_type = {r['rope_type']!r}; give one of them")
    rope_type = r.setdefault("rope_type", "default")
    rope_method(rope_type, where)  # an unknown type raises here, naming the valid ones
    _check_keys(r, where)
    _check_values(r, where)
    if head_dim is not None:
        _check_head_dim(r, where, head_dim)
    head = {"rope_type": rope_type, "rope_theta": r.pop("rope_theta")}
    del r["rope_type"]
    return head | r


def _check_keys(r: dict, where: str) -> None:
    """Unknown and missing keys; fills defaults in place."""
    rope_type = r["rope_type"]
    method = ROPE_METHODS[rope_type]
    arg_fields = {f.name: f for f in fields(method.args_type)}
    allowed = [*_COMMON_KEYS, *arg_fields]
    for key in r:
        if key not in allowed:
            kind = "Hugging Face rope_type" if method.standard else "toolkit rope_type"
            raise ValueError(f"{where}.{key} is not a key of the {kind} {rope_type!r}; allowed: {', '.join(allowed)}")
    for key in [k for k, v in r.items() if v is None and k in arg_fields and arg_fields[k].default is not MISSING]:
        del r[key]  # `attention_factor: null` and the like mean "not set": write nothing
    for name, f in arg_fields.items():
        if r.get(name) is None and f.default is MISSING:
            raise ValueError(f"{where}.{name} is missing: rope_type {rope_type!r} requires "
                             f"{', '.join(n for n, g in arg_fields.items() if g.default is MISSING)}")
    if rope_type == "resonance":
        base_type = r.setdefault("base_type", "yarn")
        _check(base_type in RESONANCE_BASE_TYPES, f"{where}.base_type", base_type,
               f"valid: {', '.join(RESONANCE_BASE_TYPES)}")
        for key in YARN_ONLY_KEYS:
            _check(base_type == "yarn" or key not in r, f"{where}.{key}", r.get(key),
                   f"only for base_type yarn (base_type is {base_type!r})")
    else:  # fill the defaults that transformers would assume, so the written block says what was trained
        for name, f in arg_fields.items():
            if name not in r and f.default is not None and f.default is not MISSING:
                r[name] = f.default


def _check_values(r: dict, where: str) -> None:
    """Types and ranges; converts numbers in place (floats as floats, the original length as int)."""
    rope_type, method = r["rope_type"], ROPE_METHODS[r["rope_type"]]
    for key in _FLOAT_KEYS:
        if r.get(key) is not None:
            r[key] = _as_float(r[key], f"{where}.{key}")
    p = f"{where}."
    _check(r["rope_theta"] > 1.0, p + "rope_theta", r["rope_theta"], "the RoPE base must be > 1 (e.g. 10000.0)")
    if r.get("factor") is not None:
        if method.factor_above_one:
            _check(r["factor"] > 1.0, p + "factor", r["factor"],
                   f"{rope_type} needs factor > 1 (factor 1 is no scaling: use rope_type default)")
        else:
            _check(r["factor"] >= 1.0, p + "factor", r["factor"], "must be >= 1")
    prf = r.get("partial_rotary_factor", 1.0)
    _check(0.0 < prf <= 1.0, p + "partial_rotary_factor", prf, "must be in (0, 1]")
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "low_freq_factor"):
        if r.get(key) is not None:
            _check(r[key] > 0, p + key, r[key], "must be > 0")
    if r.get("beta_fast") is not None and r.get("beta_slow") is not None:
        _check(r["beta_fast"] > r["beta_slow"], p + "beta_fast", r["beta_fast"],
               f"must be > beta_slow ({r['beta_slow']})")
    if "high_freq_factor" in r:
        _check(r["high_freq_factor"] > r["low_freq_factor"], p + "high_freq_factor", r["high_freq_factor"],
               f"must be > low_freq_factor ({r['low_freq_factor']})")
    if r.get("truncate") is not None:
        _check(isinstance(r["truncate"], bool), p + "truncate", r["truncate"], "must be true or false")
    if "original_max_position_embeddings" in r:
        orig = r["original_max_position_embeddings"]
        ok = (type(orig) is int or (isinstance(orig, float) and orig.is_integer())) and orig > 0
        _check(ok, p + "original_max_position_embeddings", orig, "must be a positive integer (the pretraining length)")
        r["original_max_position_embeddings"] = int(orig)
    for key in ("short_factor", "long_factor"):
        if key in r:
            values = r[key]
            _check(isinstance(values, (list, tuple)) and len(values) > 0, p + key, values,
                   "must be a non-empty list of numbers, one per rotary frequency")
            r[key] = [_as_float(v, f"{p}{key}[{i}]") for i, v in enumerate(values)]
            _check(all(v > 0 for v in r[key]), p + key, values, "every entry must be > 0")
    if rope_type == "longrope":
        _check(len(r["short_factor"]) == len(r["long_factor"]), p + "long_factor", f"{len(r['long_factor'])} entries",
               f"must have as many entries as short_factor ({len(r['short_factor'])})")


def _check_head_dim(r: dict, where: str, head_dim: int) -> None:
    """What depends on the head dim: an even rotary dim, longrope list lengths, NTK's d / (d - 2)."""
    dim = rotary_dim(head_dim, r, where)
    if r["rope_type"] == "longrope":
        _check(len(r["short_factor"]) == dim // 2, f"{where}.short_factor", f"{len(r['short_factor'])} entries",
               f"needs rotary_dim / 2 = {dim // 2} entries (head_dim {head_dim})")
    if r["rope_type"] in ("dynamic", "ntk") or r.get("base_type") == "ntk":
        _check(dim > 2, f"{where}.rope_type", r["rope_type"], f"needs a rotary dim > 2 (got {dim})")


def rotary_dim(head_dim: int, rope: dict, where: str = "rope") -> int:
    """Channels that rotate: partial rotary (e.g. 0.5) rotates the first `int(head_dim * factor)` of each head.

    Raises:
        ValueError: if that is not a positive even number (transformers would round it differently).
    """
    prf = rope.get("partial_rotary_factor", 1.0)
    dim = int(head_dim * prf)  # int() truncates as transformers does
    if dim <= 0 or dim % 2:
        raise ValueError(f"{where}.partial_rotary_factor = {prf!r} with head_dim {head_dim} rotates {dim} channels; "
                         f"the rotary dim must be a positive even number")
    return dim


def export_rope(rope: dict, max_position_embeddings: int, *, head_dim: int | None = None) -> tuple[dict, int]:
    """The Hugging Face `rope_parameters` to write for any rope type, and the `max_position_embeddings` to write.

    Each type's rule is its `ROPE_METHODS` entry's `export` (rope_methods.py).
    Toolkit types become standard ones that transformers computes identically: `ntk` -> `default` with
    `rope_theta * factor ** (d / (d - 2))`; `resonance` -> `longrope` with short_factor = long_factor = the
    per-frequency ratio default_inv_freq / resonance_inv_freq and an explicit attention_factor. Standard types
    are written cleaned (validated; yarn `beta_fast`/`beta_slow` as floats; longrope always with `factor`;
    yarn/longrope/llama3 always carry `original_max_position_embeddings`), never with unknown keys.

    `max_position_embeddings` rules, so that transformers and vLLM (which derives the servable length as
    max_position_embeddings * factor for linear/dynamic, original_max_position_embeddings * factor for yarn,
    and max_position_embeddings for llama3/longrope/default) agree on the context length:
      - linear, dynamic: keep the original (pretraining) length; dynamic NTK starts scaling beyond it.
      - yarn: original_max_position_embeddings * factor (floored to an int).
      - default (incl. ABF and ntk), llama3, longrope (incl. resonance): the extended context length.
    The input value has the same per-type meaning (config.json's), so only yarn can change it.

    vLLM differs from transformers beyond the length (checked against vLLM's rotary_embedding sources): its
    `yarn` ignores `attention_factor` and `mscale`/`mscale_all_dim` (it uses 0.1 ln(factor) + 1), and its
    `longrope` ignores `factor`/`attention_factor` (it scales cos/sin by sqrt(1 + ln(s) / ln(original)),
    s = max_position_embeddings / original) and uses the long factors at every length once its max model length
    exceeds the original. So a resonance export (explicit attention_factor) matches transformers exactly but
    gets vLLM's longrope scale; blocks without those keys agree in both.

    Args:
        rope: a rope block (validated here).
        max_position_embeddings: the model's value in the config.json meaning of `rope`'s type.
        head_dim: the attention head dim; required for ntk and resonance (their export depends on it).

    Returns:
        (rope_parameters, max_position_embeddings_to_write); write the same dict as transformers 4's
        `rope_scaling` (+ top-level `rope_theta`).

    Raises:
        ValueError: for an invalid block, a non-positive max_position_embeddings, or ntk/resonance without head_dim.
    """
    r = validate_rope(rope, head_dim=head_dim)
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
            or max_position_embeddings <= 0:
        raise ValueError(f"max_position_embeddings = {max_position_embeddings!r} must be a positive integer")
    dim = rotary_dim(head_dim, r) if head_dim is not None else None
    return rope_method(r["rope_type"]).export(r, max_position_embeddings, dim)


def context_length(rope: dict, max_position_embeddings: int) -> int:
    """The longest sequence the rope targets, from config.json's max_position_embeddings (vLLM's derivation).

    linear/dynamic: max_position_embeddings * factor; yarn: original * factor; others: max_position_embeddings.
    """
    r = validate_rope(rope)
    return rope_method(r["rope_type"]).length.context(r, max_position_embeddings)


def hf_max_position_embeddings(rope: dict, context: int, pretraining: int | None = None) -> int:
    """The config.json max_position_embeddings for a target context length (inverse of `context_length`).

    Args:
        rope: a rope block (validated here).
        context: the target context length.
        pretraining: the length the model was pretrained at, where known: linear / dynamic write it as is;
            None derives it as context / factor.
    """
    r = validate_rope(rope)
    return rope_method(r["rope_type"]).length.max_positions(r, context, pretraining)


# ---------------------------------------------------------------------------------------------------------------
# The module


def compute_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int,
                     seq_len: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies (fp64, CPU, rotary_dim / 2 entries) and the attention scaling applied to cos/sin.

    Args:
        rope: a rope block (validated here).
        head_dim: attention head dim (the rotary dim follows from partial_rotary_factor).
        max_position_embeddings: config.json's value (its meaning depends on the rope type, see `export_rope`).
        seq_len: the current length; matters only for methods that depend on it (dynamic, longrope).

    Returns:
        (inv_freq, attention_scaling).

    Raises:
        ValueError: for an invalid rope block.
    """
    r = validate_rope(rope, head_dim=head_dim)
    dim = rotary_dim(head_dim, r)
    return ROPE_METHODS[r["rope_type"]].compute(rope_args(r), dim, max_position_embeddings, seq_len)


def depends_on_length(rope: dict) -> bool:
    """True for rope types whose frequencies change with the current length (dynamic, longrope)."""
    return ROPE_METHODS[validate_rope(rope)["rope_type"]].depends_on_length


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for int64 position ids. Holds no parameters; `inv_freq` stays fp32 under `.to(dtype)`."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = validate_rope(rope, head_dim=head_dim)
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rotary_dim = rotary_dim(head_dim, self.rope)
        self._method = ROPE_METHODS[self.rope["rope_type"]]
        self._args = rope_args(self.rope)
        inv_freq, self.attention_scaling = self._compute(None)
        self._inv_freq64 = inv_freq  # master copy, fp64 on CPU, outside the module's buffers
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _compute(self, seq_len: int | None) -> tuple[Tensor, float]:
        return self._method.compute(self._args, self.rotary_dim, self.max_position_embeddings, seq_len)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast inv_freq to bf16 (PITFALLS.md): let the move happen, then
        # restore fp32 from the fp64 master on whatever device the buffer landed on.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq64.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, position_ids: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin for the given positions, attention scaling applied.

        Args:
            position_ids: (bs, s) int64, global positions (also after context-parallel sharding).
            seq_len: the length that selects length-dependent frequencies (dynamic, longrope); default
                max(position_ids) + 1 as transformers does. Under context parallelism pass the global length:
                a shard's own maximum differs between ranks.

        Returns:
            cos, sin: (bs, s, rotary_dim) fp32.

        Raises:
            ValueError: if position_ids is not int64.
        """
        if position_ids.dtype != torch.int64:
            raise ValueError(f"position_ids must be int64 (fp32 cannot hold positions exactly), "
                             f"got {position_ids.dtype}")
        max_pos = int(position_ids.max()) if position_ids.numel() else 0
        inv64, inv32, scaling = self._inv_freq64, self.inv_freq, self.attention_scaling
        if self._method.depends_on_length:
            inv64, scaling = self._compute(max_pos + 1 if seq_len is None else seq_len)
            inv32 = inv64.to(device=position_ids.device, dtype=torch.float32)
        if max_pos >= FP64_ANGLES_FROM:  # fp32 angles lose ~0.06 rad at 1M (PITFALLS.md)
            angles = position_ids[..., None].double() * inv64.to(position_ids.device)  # (bs, s, rotary_dim / 2)
        else:
            angles = position_ids[..., None].float() * inv32  # (bs, s, rotary_dim / 2)
        emb = torch.cat((angles, angles), dim=-1)  # (bs, s, rotary_dim)
        return (emb.cos() * scaling).float(), (emb.sin() * scaling).float()

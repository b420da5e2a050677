"""RoPE scaling methods: one small args dataclass and one pure function per `rope_type` (see rope.py).

Each function maps (args, rotary dim, max_position_embeddings, current length) to (inv_freq fp64 CPU,
attention scaling applied to cos/sin). Field names of the args dataclasses are the rope block's keys (Hugging
Face `rope_parameters` vocabulary); fields without a default are required. Everything is computed in fp64:
the module keeps an fp64 master and an fp32 buffer (PITFALLS.md: RoPE in bf16 is wrong at long context).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# Args dataclasses: field names are the rope block's keys; fields without a default are required keys.


@dataclass(frozen=True)
class DefaultArgs:
    rope_theta: float  # base of the geometric frequencies; ABF (Xiong et al. 2023) is just a larger one


@dataclass(frozen=True)
class LinearArgs:
    rope_theta: float
    factor: float  # position interpolation (Chen et al. 2023, arXiv:2306.15595): every frequency / factor


@dataclass(frozen=True)
class DynamicArgs:
    rope_theta: float
    factor: float  # dynamic NTK: base grows with the current length beyond max_position_embeddings


@dataclass(frozen=True)
class YarnArgs:  # YaRN, Peng et al. 2023 (arXiv:2309.00071)
    rope_theta: float
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0  # dims rotating more than beta_fast times in the original length: extrapolate
    beta_slow: float = 1.0  # dims rotating fewer than beta_slow times: interpolate (divide by factor)
    attention_factor: float | None = None  # cos/sin scale; None: 0.1 ln(factor) + 1 (or the mscale ratio)
    mscale: float | None = None  # DeepSeek-style: attention_factor = mscale(factor, mscale) / mscale(.., all_dim)
    mscale_all_dim: float | None = None
    truncate: bool | None = None  # None means True: round the ramp bounds to whole dims


@dataclass(frozen=True)
class Llama3Args:  # Llama 3.1 frequency-band scaling
    rope_theta: float
    factor: float
    low_freq_factor: float  # wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float  # wavelengths below original / high_freq_factor are kept; in between: smooth
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LongRopeArgs:  # LongRoPE, Ding et al. 2024 (arXiv:2402.13753), as in Phi-3
    rope_theta: float
    short_factor: tuple[float, ...]  # per-frequency divisors up to original_max_position_embeddings
    long_factor: tuple[float, ...]  # ... and beyond it (chosen by the current length)
    original_max_position_embeddings: int
    factor: float | None = None  # only sets the default attention_factor; None: max_pos / original
    attention_factor: float | None = None  # None: sqrt(1 + ln(factor) / ln(original))


@dataclass(frozen=True)
class NtkArgs:  # static NTK-aware scaling (bloc97, 2023): base * factor ** (dim / (dim - 2))
    rope_theta: float
    factor: float


@dataclass(frozen=True)
class ResonanceArgs:  # Resonance RoPE, Wang et al. 2024 (arXiv:2403.00071)
    rope_theta: float
    factor: float
    original_max_position_embeddings: int
    base_type: str = "yarn"  # the scaling the rounded wavelengths start from: linear, yarn or ntk
    beta_fast: float | None = None  # yarn-only keys (base_type yarn), defaults as in YarnArgs
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None


RESONANCE_BASE_TYPES = ("linear", "yarn", "ntk")
YARN_ONLY_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: (args, rotary dim, max_position_embeddings, current length) -> (inv_freq fp64, attention scaling)


def default_inv_freq(theta: float, dim: int) -> Tensor:
    """theta ** (-2i / dim) for i < dim / 2, fp64 (Su et al. 2021, RoFormer)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _default(args: DefaultArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    return default_inv_freq(args.rope_theta, dim), 1.0


def _linear(args: LinearArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    # Dividing positions by factor == dividing frequencies by factor.
    return default_inv_freq(args.rope_theta, dim) / args.factor, 1.0


def _dynamic(args: DynamicArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    # Here max_pos is the original length: up to it, plain RoPE; beyond, the base grows so that the lowest
    # frequency interpolates by factor * length / max_pos - (factor - 1) (Hugging Face's dynamic NTK).
    length = max_pos if seq_len is None else max(seq_len, max_pos)
    base = args.rope_theta * (args.factor * length / max_pos - (args.factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(base, dim), 1.0


def _ntk(args: NtkArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    # The base that makes the lowest frequency interpolate by exactly `factor` while the highest is kept.
    return default_inv_freq(ntk_theta(args.rope_theta, args.factor, dim), dim), 1.0


def ntk_theta(rope_theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: rope_theta * factor ** (dim / (dim - 2)), dim = rotary dim."""
    return rope_theta * factor ** (dim / (dim - 2))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (paper eq. 22).
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(args: YarnArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    orig, base = args.original_max_position_embeddings, args.rope_theta

    def dim_of_rotations(rotations: float) -> float:
        # The (fractional) dim index whose wavelength fits `rotations` times into the original length.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of_rotations(args.beta_fast), dim_of_rotations(args.beta_slow)
    if args.truncate is None or args.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as the reference implementation does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: scale
    extrapolated = default_inv_freq(base, dim)
    inv_freq = extrapolated / args.factor * ramp + extrapolated * (1 - ramp)
    if args.attention_factor is not None:
        scaling = args.attention_factor
    elif args.mscale and args.mscale_all_dim:
        scaling = _yarn_mscale(args.factor, args.mscale) / _yarn_mscale(args.factor, args.mscale_all_dim)
    else:
        scaling = _yarn_mscale(args.factor)
    return inv_freq, float(scaling)


def _llama3(args: Llama3Args, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    orig = args.original_max_position_embeddings
    inv_freq = default_inv_freq(args.rope_theta, dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = orig / args.low_freq_factor, orig / args.high_freq_factor
    smooth = (orig / wavelen - args.low_freq_factor) / (args.high_freq_factor - args.low_freq_factor)
    blended = (1 - smooth) * inv_freq / args.factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / args.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out), 1.0


def _longrope(args: LongRopeArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    orig = args.original_max_position_embeddings
    factor = args.factor if args.factor is not None else max_pos / orig
    scaling = args.attention_factor
    if scaling is None:
        scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    long = seq_len is not None and seq_len > orig  # the long factors only beyond the pretraining length
    ext = torch.tensor(args.long_factor if long else args.short_factor, dtype=torch.float64)
    return default_inv_freq(args.rope_theta, dim) / ext, float(scaling)


def _resonance(args: ResonanceArgs, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    match args.base_type:
        case "linear":
            inv_freq, scaling = _linear(LinearArgs(args.rope_theta, args.factor), dim, max_pos, seq_len)
        case "ntk":
            inv_freq, scaling = _ntk(NtkArgs(args.rope_theta, args.factor), dim, max_pos, seq_len)
        case "yarn":
            yarn_keys = {k: getattr(args, k) for k in YARN_ONLY_KEYS if getattr(args, k) is not None}
            yarn = YarnArgs(args.rope_theta, args.factor, args.original_max_position_embeddings, **yarn_keys)
            inv_freq, scaling = _yarn(yarn, dim, max_pos, seq_len)
        case other:
            raise ValueError(f"resonance base_type {other!r} unknown; valid: {', '.join(RESONANCE_BASE_TYPES)}")
    # Round every wavelength to a whole number of positions so each feature repeats exactly on the
    # integer grid: no feature sees unseen phases beyond the training length (paper, Algorithm 1).
    wavelen = (2 * math.pi / inv_freq).round().clamp(min=1.0)
    return 2 * math.pi / wavelen, scaling


# ---------------------------------------------------------------------------------------------------------------
# What config.json's max_position_embeddings means, per type. vLLM derives the servable length from it as
# max_position_embeddings * factor for linear/dynamic, original_max_position_embeddings * factor for yarn, and
# max_position_embeddings for the others; transformers and vLLM agree on the context length only if it is written
# in that meaning (model/rope.py `export_rope`).


@dataclass(frozen=True)
class LengthRule:
    """One meaning of max_position_embeddings: `context` reads a length from it, `max_positions` writes one."""

    context: Callable[[dict, int], int]  # (rope, max_position_embeddings) -> the longest sequence the rope targets
    # (rope, context, pretraining length or None) -> max_position_embeddings for that context
    max_positions: Callable[[dict, int, int | None], int]


# linear, dynamic: the pretraining length (dynamic NTK starts scaling beyond it); the context is it x factor.
PRETRAINING_LENGTH = LengthRule(
    context=lambda r, max_pos: int(max_pos * r["factor"]),
    max_positions=lambda r, context, pretraining: int(context / r["factor"]) if pretraining is None else pretraining)
# yarn: original_max_position_embeddings x factor, whatever the trained length.
ORIGINAL_TIMES_FACTOR = LengthRule(
    context=lambda r, max_pos: int(r["original_max_position_embeddings"] * r["factor"]),
    max_positions=lambda r, context, pretraining: int(r["original_max_position_embeddings"] * r["factor"]))
# default (ABF, ntk), llama3, longrope (resonance): the extended context length itself.
CONTEXT_LENGTH = LengthRule(context=lambda r, max_pos: max_pos, max_positions=lambda r, context, pretraining: context)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face export: (validated block, config.json max_position_embeddings, rotary dim or None) ->
# (rope_parameters, max_position_embeddings to write). The input max_position_embeddings has the type's meaning
# already, so only yarn can change it. Toolkit types become standard ones that transformers computes identically.


def _export_as_is(r: dict, max_pos: int, dim: int | None) -> tuple[dict, int]:
    return r, max_pos


def _export_yarn(r: dict, max_pos: int, dim: int | None) -> tuple[dict, int]:
    return r, ORIGINAL_TIMES_FACTOR.context(r, max_pos)


def _export_longrope(r: dict, max_pos: int, dim: int | None) -> tuple[dict, int]:
    if r.get("factor") is None:  # transformers 4.57 fails on a longrope block without it (PITFALLS.md)
        r["factor"] = max_pos / r["original_max_position_embeddings"]
    return r, max_pos


def _rotary_dim_for_export(r: dict, dim: int | None) -> int:
    if dim is None:
        raise ValueError(f"export_rope of rope_type {r['rope_type']!r} needs head_dim (its export depends on it)")
    return dim


def _partial(r: dict) -> dict:
    return {"partial_rotary_factor": r["partial_rotary_factor"]} if "partial_rotary_factor" in r else {}


def _export_ntk(r: dict, max_pos: int, dim: int | None) -> tuple[dict, int]:
    # `default` with the scaled base: rope_theta * factor ** (d / (d - 2)).
    theta = ntk_theta(r["rope_theta"], r["factor"], _rotary_dim_for_export(r, dim))
    return {"rope_type": "default", "rope_theta": theta} | _partial(r), max_pos


def _export_resonance(r: dict, max_pos: int, dim: int | None) -> tuple[dict, int]:
    # `longrope` with short_factor = long_factor = the per-frequency ratio default / resonance inverse frequency
    # and an explicit attention_factor.
    dim = _rotary_dim_for_export(r, dim)
    inv_freq, scaling = _resonance(rope_args(r), dim, max_pos, None)
    ratio = (default_inv_freq(r["rope_theta"], dim) / inv_freq).tolist()
    return {"rope_type": "longrope", "rope_theta": r["rope_theta"], "short_factor": ratio,
            "long_factor": list(ratio), "factor": r["factor"], "attention_factor": scaling,
            "original_max_position_embeddings": r["original_max_position_embeddings"]} | _partial(r), max_pos


# ---------------------------------------------------------------------------------------------------------------
# The registry: adding a rope type is one entry here (its args, frequencies, export and length rules).


@dataclass(frozen=True)
class RopeMethod:
    args_type: type
    compute: Callable[[Any, int, int, int | None], tuple[Tensor, float]]
    standard: bool  # a Hugging Face rope_type (written as is); else exported as one
    factor_above_one: bool  # factor must be > 1 (factor < 1 is invalid for every type)
    depends_on_length: bool  # frequencies change with the current length
    export: Callable[[dict, int, int | None], tuple[dict, int]]  # the Hugging Face block and length to write
    length: LengthRule  # what config.json's max_position_embeddings means for this type


ROPE_METHODS: dict[str, RopeMethod] = {
    "default": RopeMethod(DefaultArgs, _default, True, False, False, _export_as_is, CONTEXT_LENGTH),
    "linear": RopeMethod(LinearArgs, _linear, True, True, False, _export_as_is, PRETRAINING_LENGTH),
    "dynamic": RopeMethod(DynamicArgs, _dynamic, True, True, True, _export_as_is, PRETRAINING_LENGTH),
    "yarn": RopeMethod(YarnArgs, _yarn, True, True, False, _export_yarn, ORIGINAL_TIMES_FACTOR),
    "llama3": RopeMethod(Llama3Args, _llama3, True, True, False, _export_as_is, CONTEXT_LENGTH),
    "longrope": RopeMethod(LongRopeArgs, _longrope, True, False, True, _export_longrope, CONTEXT_LENGTH),
    "ntk": RopeMethod(NtkArgs, _ntk, False, True, False, _export_ntk, CONTEXT_LENGTH),
    "resonance": RopeMethod(ResonanceArgs, _resonance, False, True, False, _export_resonance, CONTEXT_LENGTH),
}


def rope_method(rope_type: Any, where: str = "rope") -> RopeMethod:
    """The registry entry of `rope_type`; an unknown type raises, naming the valid ones."""
    if not isinstance(rope_type, str) or rope_type not in ROPE_METHODS:
        raise ValueError(f"{where}.rope_type = {rope_type!r} is unknown; valid: {', '.join(ROPE_METHODS)}")
    return ROPE_METHODS[rope_type]


def takes_original_length(rope_type: Any) -> bool:
    """A Hugging Face type whose block carries original_max_position_embeddings (llama3, yarn, longrope):
    transformers fills it from config.json when the block lacks it (standardize_rope_params)."""
    method = ROPE_METHODS.get(rope_type) if isinstance(rope_type, str) else None  # unknown: validation refuses it
    return method is not None and method.standard and any(
        f.name == "original_max_position_embeddings" for f in fields(method.args_type))


def rope_args(rope: dict) -> Any:
    """A validated block as its method's args dataclass (lists become tuples)."""
    method = rope_method(rope["rope_type"])
    names = {f.name for f in fields(method.args_type)}
    return method.args_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in rope.items() if k in names})

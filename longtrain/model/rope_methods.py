"""RoPE scaling methods: one small args dataclass and one pure function per `rope_type` (see rope.py).

Each function maps (args, rotary dim, max_position_embeddings, current length) to (inv_freq fp64 CPU,
attention scaling applied to cos/sin). Field names of the args dataclasses are the rope block's keys (Hugging
Face `rope_parameters` vocabulary); fields without a default are required. Everything is computed in fp64:
the module keeps an fp64 master and an fp32 buffer (PITFALLS.md: RoPE in bf16 is wrong at long context).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RopeMethod:
    args_type: type
    compute: Callable[[Any, int, int, int | None], tuple[Tensor, float]]
    standard: bool  # a Hugging Face rope_type (written as is); else exported as one
    factor_above_one: bool  # factor must be > 1 (factor < 1 is invalid for every type)
    depends_on_length: bool  # frequencies change with the current length


ROPE_METHODS: dict[str, RopeMethod] = {
    "default": RopeMethod(DefaultArgs, _default, True, False, False),
    "linear": RopeMethod(LinearArgs, _linear, True, True, False),
    "dynamic": RopeMethod(DynamicArgs, _dynamic, True, True, True),
    "yarn": RopeMethod(YarnArgs, _yarn, True, True, False),
    "llama3": RopeMethod(Llama3Args, _llama3, True, True, False),
    "longrope": RopeMethod(LongRopeArgs, _longrope, True, False, True),
    "ntk": RopeMethod(NtkArgs, _ntk, False, True, False),
    "resonance": RopeMethod(ResonanceArgs, _resonance, False, True, False),
}

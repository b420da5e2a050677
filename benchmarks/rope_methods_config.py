"""Configuration of the RoPE method comparison (benchmarks/rope_methods.py): typed sections, checked on load."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from longtrain.model.rope import ROPE_METHODS

# Benchmark method -> the registry rope_type it exercises. Every registry type must appear (checked below).
METHOD_TYPES: dict[str, str] = {"default": "default", "abf": "default", "linear": "linear", "dynamic": "dynamic",
                                "ntk": "ntk", "yarn": "yarn", "llama3": "llama3", "longrope": "longrope",
                                "resonance": "resonance"}
assert set(METHOD_TYPES.values()) == set(ROPE_METHODS), "a rope registry type has no benchmark method"


@dataclass
class ModelSection:
    flavor: str = "debug"  # a longtrain MODEL_FLAVORS name, randomly initialised
    overrides: dict = field(default_factory=dict)  # ModelArgs changes (max_position_embeddings is set to L)
    tokenizer: str = "builtin"  # builtin | builtin:N | a tokenizer directory
    init_seed: int = 0


@dataclass
class BaseSection:
    seq_len: int  # L, the short context the base model is trained at
    steps: int
    micro_batch: int = 8
    lr: float = 3.0e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class ExtensionSection:
    factors: list[int] = field(default_factory=lambda: [4, 8])  # target lengths f * L
    steps: int = 20  # the same for every method
    tokens_per_step: int = 4096  # the same for every method and factor; a multiple of f * L
    lr: float = 1.0e-3
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1


@dataclass
class DataSection:
    text_weight: float = 0.5  # token shares of the training mix
    passkey_weight: float = 0.5
    passkey_digits: int = 3
    min_chars: int = 20000  # standard-library files at least this long are documents
    heldout_every: int = 8  # every k-th document (sorted path order) is held out for evaluation
    heldout_docs: int = 8  # held-out documents evaluated, each cut to the longest eval length
    train_docs: int = 0  # training documents used at most (0: all of the training split)
    seed: int = 1234


@dataclass
class EvalSection:
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # eval lengths in units of L
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    samples: int = 4  # passkey sequences per (length, depth)
    batch_size: int = 4
    attention: str = "reference"  # the eval attention backend (auto on GPU)
    dtype: str = "float32"  # evaluated weights: float32 | bfloat16 (GPU: fused attention kernels need bf16)


@dataclass
class LongropeSearch:
    """LongRoPE's per-frequency factors, searched on the base model (see `search_longrope`)."""

    exponents: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    overshoot: list[float] = field(default_factory=lambda: [1.0, 1.25])  # lowest frequency's factor / f
    docs: int = 2  # training-split documents scored per candidate
    windows: int = 4  # windows of f * L tokens scored per candidate


@dataclass
class BenchConfig:
    name: str
    base: BaseSection
    model: ModelSection = field(default_factory=ModelSection)
    extension: ExtensionSection = field(default_factory=ExtensionSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    longrope_search: LongropeSearch = field(default_factory=LongropeSearch)
    methods: list[str] = field(default_factory=lambda: list(METHOD_TYPES))
    method_options: dict = field(default_factory=dict)  # per method: rope keys overriding the recommended ones
    abf_theta: float = 500000.0  # Xiong et al. 2023 raise the base from 10,000 to 500,000
    dtype: str = "auto"  # model dtype in training (auto: bf16 on GPU, fp32 on CPU)
    attention: str = "auto"  # training attention backend
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    keep_checkpoints: bool = False  # keep each fine-tuned run's checkpoint after its evaluation


def _build(tp, value, where: str):
    """YAML data -> dataclass `tp`, refusing unknown and missing keys (the message names the key and file)."""
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping with keys {', '.join(f.name for f in fields(tp))}, "
                             f"got {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in fields(tp)]
        for k in value:
            if k not in names:
                raise ValueError(f"{where}.{k} is not a key; valid keys: {', '.join(names)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:  # a required key is missing
            raise ValueError(f"{where}: {e}; required keys: "
                             f"{', '.join(f.name for f in fields(tp) if f.default is f.default_factory)}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} = {value!r} must be a list")
        return [_build(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    check = origin or tp
    if not isinstance(value, check) or (check is int and isinstance(value, bool)):
        raise ValueError(f"{where} = {value!r} must be of type {getattr(tp, '__name__', tp)}")
    return value


def load_config(path: str | Path, overrides: dict | None = None) -> BenchConfig:
    """Read and check a benchmark config (YAML or JSON).

    Args:
        path: the file.
        overrides: top-level sections deep-merged over the file's (used by tests).

    Returns:
        The checked BenchConfig.

    Raises:
        ValueError: a missing file, an unknown or missing key, a bad value (naming file, key, value and what is
            allowed).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: benchmark config not found")
    raw = yaml.safe_load(p.read_text())
    for k, v in (overrides or {}).items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    cfg = _build(BenchConfig, raw, str(p))
    _check(cfg, str(p))
    return cfg


def _check(cfg: BenchConfig, where: str) -> None:
    for m in cfg.methods:
        if m not in METHOD_TYPES:
            raise ValueError(f"{where}: methods has {m!r}; valid: {', '.join(METHOD_TYPES)}")
    for m in cfg.method_options:
        if m not in cfg.methods:
            raise ValueError(f"{where}: method_options.{m} names a method not in methods ({', '.join(cfg.methods)})")
    L, ext = cfg.base.seq_len, cfg.extension
    for f in ext.factors:
        if f < 2:
            raise ValueError(f"{where}: extension.factors has {f}; factors are integers >= 2")
        if ext.tokens_per_step % (f * L):
            raise ValueError(f"{where}: extension.tokens_per_step = {ext.tokens_per_step} must be a multiple of "
                             f"factor x base.seq_len = {f} x {L} = {f * L} (same tokens per step for every factor)")
    if ext.steps < 1 or cfg.base.steps < 1:
        raise ValueError(f"{where}: base.steps and extension.steps must be >= 1")
    if not cfg.eval.multiples or min(cfg.eval.multiples) < 1:
        raise ValueError(f"{where}: eval.multiples = {cfg.eval.multiples} must be non-empty integers >= 1")
    match cfg.eval.dtype:
        case "float32" | "bfloat16":
            pass
        case other:
            raise ValueError(f"{where}: eval.dtype = {other!r}; valid: float32, bfloat16")
    if cfg.data.heldout_every < 2 or cfg.data.heldout_docs < 1:
        raise ValueError(f"{where}: data.heldout_every must be >= 2 and data.heldout_docs >= 1")

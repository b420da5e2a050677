"""Hugging Face import/export: config.json <-> ModelArgs, safetensors <-> Transformer state dict.

One adapter (torchtitan's `state_dict_adapter` idea): `hf_key` names, for every parameter of our model,
its Hugging Face key; the model built on meta gives the expected shapes. Loading checks every tensor of
the checkpoint against that map (missing, unexpected, shape) before any data is read.

RoPE in config.json. transformers 5 writes only `rope_parameters`; transformers 4.x reads top-level
`rope_theta` + `rope_scaling` and, finding neither, silently uses the default RoPE (PITFALLS.md). We read
either form (as transformers 5 does, `rope_scaling` wins when both are present) and write both with the
same content: `rope_parameters == {**rope_scaling, "rope_theta": rope_theta}` (`rope_scaling` is null for a
plain default rope). `max_position_embeddings` is written by rope.export_rope's rules.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longtrain.model.args import ARCHITECTURES, ModelArgs
from longtrain.model.decoder import Transformer
from longtrain.model.rope import compute_inv_freq, context_length, export_rope, validate_rope
from longtrain.model.rope_methods import takes_original_length

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's historical default shard size (5GB)
# Files copied next to the weights (tokenizer, chat template, generation defaults) when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# Non-persistent buffers that old conversions saved; they hold no learned state, we recompute them.
IGNORED_KEY_SUFFIXES = (".rotary_emb.inv_freq",)

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# transformers 5 config-class defaults for the keys we read, used when config.json omits them.
_ARCH_DEFAULTS = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "MistralForCausalLM": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2,
                           "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
                         "sliding_window": 4096, "max_window_layers": 28},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
                         "sliding_window": 4096, "max_window_layers": 28},
}
# config.json keys that ModelArgs interprets, or that save_hf always rewrites; the rest is kept in hf_extra.
_INTERPRETED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "original_max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "layer_types", "initializer_range", "bos_token_id", "eos_token_id",
    "torch_dtype", "dtype", "transformers_version", "_name_or_path",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# The adapter: our parameter names <-> Hugging Face keys


def hf_key(name: str) -> str:
    """Hugging Face key of our parameter `name`: the decoder lives under `model.`, the head does not.

    embed_tokens.weight -> model.embed_tokens.weight, layers.{i}.self_attn.q_proj.weight ->
    model.layers.{i}.self_attn.q_proj.weight, norm.weight -> model.norm.weight, lm_head.weight -> lm_head.weight.
    """
    return name if name == "lm_head.weight" else f"model.{name}"


# ----------------------------------------------------------------------------------------------------
# config.json -> ModelArgs


def _read_rope(cfg: dict, where: str) -> dict:
    """The rope block of a transformers 5 or 4.x config.json, in `rope_parameters` form (not yet validated)."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    if params and any(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError(f"{where}: rope_parameters nested per layer type are not supported")
    legacy = dict(scaling or {})
    if "type" in legacy:  # transformers < 4.45 spelled it `type`
        legacy.setdefault("rope_type", legacy.pop("type"))
    legacy.setdefault("rope_type", "default")
    theta = cfg.get("rope_theta")
    if theta is not None:
        legacy.setdefault("rope_theta", theta)
    if "partial_rotary_factor" in cfg:  # 4.x keeps it at the top level
        legacy.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    if not params:
        rope = legacy
    else:
        rope = dict(params)
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        if theta is not None:
            rope.setdefault("rope_theta", theta)
        # Both forms present: transformers 4.x reads only the legacy keys, 5 lets `rope_scaling` win. If
        # they disagree some reader runs the wrong RoPE (PITFALLS.md): refuse rather than guess.
        legacy.setdefault("rope_theta", rope.get("rope_theta"))
        if (scaling and legacy != rope) or (theta is not None and rope.get("rope_theta") != theta):
            raise ValueError(f"{where}: legacy rope_scaling={scaling} / rope_theta={theta} disagree with "
                             f"rope_parameters={params}; transformers 4.x and 5 would run different RoPE. "
                             "Make them identical")
    rope.setdefault("rope_theta", 10000.0)
    if takes_original_length(rope["rope_type"]):  # as transformers' standardize_rope_params
        top = cfg.get("original_max_position_embeddings")  # Phi-3 style; transformers 5 lets it win
        if top is not None and rope.setdefault("original_max_position_embeddings", top) != top:
            raise ValueError(f"{where}: original_max_position_embeddings={top} disagrees with the rope block's "
                             f"{rope['original_max_position_embeddings']}; make them identical")
        rope.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return rope


def args_from_hf_config(cfg: dict, where: str = "config.json", rope: dict | None = None) -> ModelArgs:
    """Map a Hugging Face config.json (already parsed) to ModelArgs.

    Args:
        cfg: the parsed config.json.
        where: the file, named in errors.
        rope: replaces the config's rope block (validated, `rope_parameters` form).

    Returns:
        ModelArgs with the architecture's flags, the validated rope, and the uninterpreted keys in `hf_extra`.

    Raises:
        ValueError: unsupported architecture, missing key, inconsistent or invalid rope block.
        NotImplementedError: an activation other than silu, or per-layer rope blocks.
    """
    archs = cfg.get("architectures")
    if archs is None and cfg.get("model_type") in MODEL_TYPES.values():  # as AutoModelForCausalLM does
        archs = [next(a for a, t in MODEL_TYPES.items() if t == cfg["model_type"])]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"{where}: architectures={archs!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    arch = archs[0]
    cfg = {**_ARCH_DEFAULTS[arch], **cfg}
    if cfg.get("model_type", MODEL_TYPES[arch]) != MODEL_TYPES[arch]:
        raise ValueError(f"{where}: model_type {cfg['model_type']!r} does not match {arch} "
                         f"(expected {MODEL_TYPES[arch]!r})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{where}: missing or non-integer {key!r} (got {cfg.get(key)!r})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act={cfg['hidden_act']!r}; longtrain's MLP is SwiGLU (silu)")
    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    bias = bool(cfg.get("attention_bias", False))
    match arch:  # the few ways the family differs (transformers' modeling_<arch>.py)
        case "LlamaForCausalLM":
            flags = dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
        case "MistralForCausalLM":
            flags = dict(sliding_window=cfg["sliding_window"])
        case "Qwen2ForCausalLM" | "Qwen3ForCausalLM":
            flags = dict(qkv_bias=True) if arch == "Qwen2ForCausalLM" else dict(qkv_bias=bias, o_bias=bias,
                                                                                 qk_norm=True)
            window = cfg["sliding_window"] if cfg.get("use_sliding_window", False) else None
            layer_types = cfg.get("layer_types") or [
                "sliding_attention" if window is not None and i >= cfg["max_window_layers"] else "full_attention"
                for i in range(n_layers)]
            flags.update(sliding_window=window, layer_types=list(layer_types))
        case _:
            raise AssertionError(arch)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    rope_block, rope_where = (_read_rope(cfg, where), f"{where}:rope") if rope is None else (rope, "load_hf(rope=)")
    rope_block = validate_rope(rope_block, rope_where, head_dim=head_dim)
    try:
        return ModelArgs(
            architecture=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg["max_position_embeddings"], rope=rope_block,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"), hf_extra={k: v for k, v in cfg.items() if k not in _INTERPRETED},
            **flags)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _config_dtype(cfg: dict, where: str) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"{where}: dtype {name!r} is not supported; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------------
# load_hf


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory (from the index when sharded)."""
    index = path / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} lists {f.name}, which does not exist in {path}")
        return files
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    bins = sorted(p.name for p in path.glob("*.bin"))
    if bins:
        raise ValueError(
            f"{path} holds only PyTorch .bin weights ({', '.join(bins[:3])}); longtrain reads safetensors only "
            "(unpickling .bin can run code). Convert once with transformers: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('OUT_DIR')\" "
            "(writes safetensors), then copy the tokenizer files.")
    raise ValueError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def load_hf(path: str | os.PathLike, rope: dict | None = None, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3 directory as a longtrain Transformer.

    The model is built on meta and each checkpoint tensor is assigned to it directly (one copy in memory).

    Args:
        path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
        rope: a rope block (`rope_parameters` form, see rope.py) replacing the config's; validated.
        dtype: parameter dtype; None: the config's `dtype`/`torch_dtype` (float32 when absent).
            Rotary buffers stay fp32 whatever this is.
        device: where the parameters are loaded.

    Returns:
        The model, in eval-agnostic state, with `args.source_dir` set to `path`.

    Raises:
        FileNotFoundError: `path` or its config.json does not exist.
        ValueError: unsupported architecture, bad config key, invalid rope, `.bin`-only checkpoint, or a
            missing, unexpected or shape-mismatched tensor (each named with its file and key).
        NotImplementedError: a config feature longtrain does not run (see args_from_hf_config).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_hf: {path} is not a directory (expected a Hugging Face model directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_hf: {config_file} does not exist")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(cfg).__name__}")
    args = args_from_hf_config(cfg, str(config_file), rope)
    args.source_dir = str(path.resolve())
    dtype = dtype or _config_dtype(cfg, str(config_file))
    if dtype not in _DTYPES.values():
        raise ValueError(f"load_hf: dtype {dtype} is not supported; supported: {', '.join(_DTYPES)}")
    files = _weight_files(path)

    with torch.device("meta"):  # shapes without memory; the checkpoint's tensors are assigned below
        model = Transformer(args)
    expected = {hf_key(name): (name, p.shape) for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    tied_head: tuple[Path, torch.Tensor] | None = None
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as sf:
            for key in sf.keys():
                if key.endswith(IGNORED_KEY_SUFFIXES):
                    continue
                if key == "lm_head.weight" and args.tie_embeddings:
                    tied_head = (file, sf.get_tensor(key))  # checked against the embedding below
                    continue
                if key not in expected:
                    hint = sorted(expected)[:3]
                    raise ValueError(f"{file}: unexpected tensor {key!r} for {args.architecture} with this "
                                     f"config.json (expected keys look like {hint})")
                name, shape = expected[key]
                if name in state:
                    raise ValueError(f"{file}: tensor {key!r} appears in more than one weight file")
                got = torch.Size(sf.get_slice(key).get_shape())
                if got != shape:
                    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(got)}, config.json implies "
                                     f"{tuple(shape)}")
                state[name] = sf.get_tensor(key).to(dtype)
    missing = [k for k, (name, _) in expected.items() if name not in state]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all) in {', '.join(f.name for f in files)}")
    if tied_head is not None and not torch.equal(tied_head[1].to(dtype), state["embed_tokens.weight"]):
        raise ValueError(f"{tied_head[0]}: config.json says tie_word_embeddings=true but 'lm_head.weight' differs "
                         "from 'model.embed_tokens.weight'; set tie_word_embeddings=false to keep the head")

    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to_empty(device=device)  # meta -> device; its _apply restores fp32 inv_freq from the fp64 master
    return model


# ----------------------------------------------------------------------------------------------------
# ModelArgs -> config.json


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The config.json of `args` for its architecture, rope written in transformers 5 and 4.x forms.

    Raises:
        NotImplementedError: the args use a feature the architecture's transformers class does not have.
    """
    arch = args.architecture
    rope, max_pos = export_rope(args.rope, args.max_position_embeddings, head_dim=args.head_dim)
    legacy = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    dtype_name = next(name for name, dt in _DTYPES.items() if dt == dtype)
    match arch:  # the keys that set the flags args_from_hf_config reads back (checked below)
        case "LlamaForCausalLM":
            arch_keys = dict(attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias, head_dim=args.head_dim)
        case "MistralForCausalLM":
            arch_keys = dict(head_dim=args.head_dim, sliding_window=args.sliding_window)
        case "Qwen2ForCausalLM" | "Qwen3ForCausalLM":
            arch_keys = dict(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window,
                             layer_types=["full_attention" if w is None else "sliding_attention"
                                          for w in args.layer_windows()],
                             max_window_layers=args.hf_extra.get("max_window_layers", args.n_layers))
            if arch == "Qwen3ForCausalLM" or args.head_dim != args.dim // args.n_heads:
                arch_keys["head_dim"] = args.head_dim
            if arch == "Qwen3ForCausalLM":
                arch_keys["attention_bias"] = args.qkv_bias
        case _:
            raise AssertionError(arch)
    cfg = {
        **args.hf_extra,
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        "initializer_range": args.initializer_range, "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
        **arch_keys,
        "max_position_embeddings": max_pos,
        "rope_parameters": rope,  # transformers 5
        "rope_theta": rope["rope_theta"],  # transformers 4.x: top-level theta ...
        "rope_scaling": None if legacy == {"rope_type": "default"} else legacy,  # ... and the scaling block
        "dtype": dtype_name, "torch_dtype": dtype_name,  # transformers 5 / 4.x spelling
    }
    if "partial_rotary_factor" in rope:  # 4.x reads it at the top level
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope["rope_type"] == "longrope":
        # transformers 4.x (4.57 modeling_rope_utils) takes longrope's original length only from this
        # top-level key (else max_position_embeddings: it would pick the short factors up to there) and
        # then derives the attention factor from max_position_embeddings / original, not `factor`. Write
        # the key; pin the attention factor where `factor` differs from that ratio.
        cfg["original_max_position_embeddings"] = orig = rope["original_max_position_embeddings"]
        if "attention_factor" not in rope and rope["factor"] != max_pos / orig:
            rope["attention_factor"] = compute_inv_freq(rope, args.head_dim, max_pos)[1]
            cfg["rope_scaling"]["attention_factor"] = rope["attention_factor"]
    # What transformers' class for `arch` cannot express (a Llama with q/k norm, a Qwen2 without q/k/v
    # bias, ...) would be dropped silently by every reader: read the config back and compare.
    back = args_from_hf_config(cfg, "save_hf")
    lost = [f"{f}={getattr(args, f)}" for f in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "head_dim")
            if getattr(back, f) != getattr(args, f)]
    if back.layer_windows() != args.layer_windows():
        lost.append(f"sliding_window={args.sliding_window}, layer_types={args.layer_types}")
    if lost:
        raise NotImplementedError(f"save_hf: {arch} in transformers cannot express {', '.join(lost)}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# save_hf


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: DTensor parameters (FSDP2) are gathered, others returned as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _plan_shards(names: list[str], sizes: list[int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in parameter order, like transformers: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _copy_tokenizer(src: Path, dst: Path, model_max_length: int) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    tok_cfg = dst / "tokenizer_config.json"
    if tok_cfg.is_file():
        data = json.loads(tok_cfg.read_text())
        data["model_max_length"] = model_max_length
        tok_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_hf(model: Transformer, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            dtype: torch.dtype | None = None, tokenizer_dir: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face directory that transformers 4.x and 5 load with the same RoPE.

    Writes config.json (see hf_config), model.safetensors or model-0000i-of-0000n.safetensors + index,
    and the tokenizer files of `tokenizer_dir` (else of the directory the model was loaded from, if
    any) with `model_max_length` set to the exported context length. Tied embeddings write no lm_head.
    Everything is written into a temporary sibling directory renamed into place at the end, so a crash
    never leaves a half-written `out_dir`.

    Args:
        model: the model. DTensor parameters are gathered with `full_tensor()` (a collective), which suits a
            single-process mesh; under multi-rank FSDP gather a full state dict to one rank first.
        out_dir: target directory; must not exist or be empty unless `overwrite`.
        max_shard_bytes: the largest shard file (a single larger tensor gets a shard of its own).
        dtype: dtype of the written tensors; None: the model's parameter dtype.
        tokenizer_dir: where to copy tokenizer files from; None: `model.args.source_dir` when set.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        The path of the written directory.

    Raises:
        TypeError: `model` is not a longtrain Transformer.
        ValueError: bad `max_shard_bytes` / `dtype`, mixed parameter dtypes with dtype=None, a missing
            tokenizer_dir or recorded source_dir, or an existing non-empty `out_dir` without `overwrite`.
        NotImplementedError: the model uses a feature its architecture cannot express (see hf_config).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"save_hf expects a longtrain Transformer, got {type(model).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"save_hf: max_shard_bytes must be > 0, got {max_shard_bytes}")
    params = dict(model.named_parameters())
    if dtype is None:
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"save_hf: parameters have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=")
        dtype = dtypes.pop()
    if dtype not in _DTYPES.values():
        raise ValueError(f"save_hf: dtype {dtype} is not supported; supported: {', '.join(_DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"save_hf: {out_dir} exists and is not empty; pass overwrite=True to replace it")
    tok_src = tokenizer_dir if tokenizer_dir is not None else model.args.source_dir
    if tok_src is not None and not Path(tok_src).is_dir():
        what = "tokenizer_dir" if tokenizer_dir is not None else "model.args.source_dir (where it was loaded from)"
        raise ValueError(f"save_hf: {what} {tok_src} is not a directory; pass tokenizer_dir= "
                         "(or set model.args.source_dir = None to write no tokenizer)")
    cfg = hf_config(model.args, dtype)  # validates before anything is written

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_safetensors(params, dtype, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tok_src is not None:
            _copy_tokenizer(Path(tok_src), tmp, context_length(cfg["rope_parameters"], cfg["max_position_embeddings"]))
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_safetensors(params: dict[str, torch.Tensor], dtype: torch.dtype, out: Path, max_shard_bytes: int) -> None:
    """Write `params` under their HF keys into `out`: one model.safetensors, or shards plus their index."""
    names = list(params)
    shards = _plan_shards(names, [params[n].numel() * dtype.itemsize for n in names], max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        file = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # One shard in memory at a time: cast and gather only this shard's tensors.
        tensors = {hf_key(n): _full_tensor(params[n].detach()).to(device="cpu", dtype=dtype).contiguous()
                   for n in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

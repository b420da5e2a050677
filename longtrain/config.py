"""Recipes: typed dataclasses, one per YAML section, loaded with `a.b=c` overrides and checked before anything runs.

A recipe maps 1:1 onto these classes (torchtitan `config/job_config.py`): every YAML key is a field, an unknown
key is an error that suggests the closest valid one, and each class checks its own values in `__post_init__`.
Precedence: command line `section.key=value` > YAML > the defaults below. Stages inherit the top-level `data`,
`train`, `memory` and `eval` sections and override them key by key (deep merge).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtrain.config_checks import check_sections
from longtrain.config_yaml import FieldError, RecipeError, apply_override, build_dataclass, interpolate, merge, suggest
from longtrain.data.sources import SourceSpec
from longtrain.kernels.attention import ATTENTION_BACKENDS
from longtrain.kernels.tiled_mlp import mlp_tile
from longtrain.model.args import MODEL_FLAVORS, ModelArgs
from longtrain.types import CP_MODES


def _choice(key: str, value: Any, valid: tuple) -> None:
    # String options: listed once here so every message names all valid options.
    if value not in valid:
        raise FieldError(key, value, f"valid values are {', '.join(map(repr, valid))}")


def _positive(key: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FieldError(key, value, "must be " + (">= 0" if allow_zero else "> 0"))


@dataclass
class LoraConfig:
    """LongLoRA-style low-rank adapters (Chen et al. 2023, arXiv:2309.12307): embeddings and norms stay trainable."""

    rank: int = 16
    alpha: float = 32.0  # the adapter output is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # q k v o gate up down
    train_embed_norm: bool = True  # LongLoRA: without trainable embeddings and norms long-context LoRA lags full FT

    def __post_init__(self):
        _positive("rank", self.rank)
        for t in self.targets:
            _choice("targets", t, ("q", "k", "v", "o", "gate", "up", "down"))


@dataclass
class ModelConfig:
    """Either `path` (a Hugging Face directory, via longtrain.load_hf) or `flavor` (longtrain.model.args.MODEL_FLAVORS)."""

    path: str | None = None  # Hugging Face directory: config.json + safetensors (+ tokenizer)
    flavor: str | None = None  # a MODEL_FLAVORS name, randomly initialised
    overrides: dict = field(default_factory=dict)  # ModelArgs fields changed on the flavor, e.g. {n_layers: 4}
    tokenizer: str | None = None  # "builtin" (the bundled demo tokenizer) or a directory; default: `path`
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16
    attention: str = "auto"  # a name of kernels/attention.py ATTENTION_BACKENDS (auto, reference, sdpa_flash, ...)
    # Triton RMSNorm / RoPE / SwiGLU (longtrain.kernels): auto = on with a CUDA GPU and triton, true = always
    # (fails without them), false = eager torch. Same results up to rounding, faster and less memory.
    fused_kernels: bool | str = "auto"
    init_seed: int = 0  # seed of the random init of a flavor
    lora: LoraConfig | None = None

    def __post_init__(self):
        if (self.path is None) == (self.flavor is None):
            raise FieldError("path", self.path, "set exactly one of model.path (a Hugging Face directory) "
                             f"and model.flavor (one of {', '.join(MODEL_FLAVORS)}); got flavor={self.flavor!r}")
        if self.flavor is not None and self.flavor not in MODEL_FLAVORS:
            raise FieldError("flavor", self.flavor, f"valid flavors are {', '.join(MODEL_FLAVORS)}"
                             + suggest(self.flavor, list(MODEL_FLAVORS)))
        valid_args = [f.name for f in dataclasses.fields(ModelArgs)]
        for k in self.overrides:
            if k not in valid_args:
                raise FieldError(f"overrides.{k}", self.overrides[k],
                                 f"not a ModelArgs field{suggest(k, valid_args)}; valid: {', '.join(valid_args)}")
        if self.path is not None and self.overrides:
            raise FieldError("overrides", self.overrides, "model.overrides applies to a flavor only, not to model.path")
        if self.tokenizer is None:
            self.tokenizer = "builtin" if self.flavor is not None else self.path
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("attention", self.attention, ATTENTION_BACKENDS)
        if isinstance(self.fused_kernels, str):
            _choice("fused_kernels", self.fused_kernels, ("auto",))

    def model_args(self) -> ModelArgs:
        """The ModelArgs of a flavor (with overrides), or those in the HF directory's config.json.

        Raises:
            ValueError: model.path has no config.json.
        """
        if self.flavor is not None:
            return dataclasses.replace(copy.deepcopy(MODEL_FLAVORS[self.flavor]), **self.overrides)
        from longtrain.model.hf import args_from_hf_config

        path = Path(self.path) / "config.json"
        if not path.is_file():
            raise ValueError(f"model.path = {self.path!r}: {path} does not exist; model.path must be a Hugging "
                             f"Face model directory (config.json + safetensors), or use model.flavor")
        return args_from_hf_config(json.loads(path.read_text()), str(path))


@dataclass
class DataConfig:
    sources: list[SourceSpec] = field(default_factory=list)  # longtrain.data.SourceSpec: path, text_field, weight, ...
    packing: str = "continuous"  # continuous | reset | anchor (positions across documents; see data/)
    on_bad_record: str = "error"  # error | skip (skipped records are counted in the logs)
    seed: int = 1234

    def __post_init__(self):
        _choice("packing", self.packing, ("continuous", "reset", "anchor"))
        _choice("on_bad_record", self.on_bad_record, ("error", "skip"))


@dataclass
class ParallelConfig:
    backend: str = "fsdp2"  # fsdp2 | deepspeed (ddp-like all-reduce when nothing is sharded)
    zero_stage: int = 3  # deepspeed only
    dp_shard: int = -1  # -1: whatever the world size leaves
    dp_replicate: int = 1
    cp: int = 1  # context-parallel degree
    cp_mode: str = "allgather"  # ring | allgather | ulysses | hybrid (Ulysses x ring) | hybrid_allgather
    ulysses: int = 1  # hybrid only: the Ulysses degree inside each ring group
    # How each sequence is cut over cp ranks (docs/parallelism.md): zigzag (by position, balances one causal
    # document) | balanced (by document attention work, packed batches) | auto (zigzag for a row of one
    # document, balanced for a packed row). Ulysses (cp_mode ulysses) gathers whole sequences: any layout works.
    cp_layout: str = "auto"

    def __post_init__(self):
        _choice("backend", self.backend, ("fsdp2", "deepspeed"))
        _choice("cp_mode", self.cp_mode, CP_MODES)
        _choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("cp_layout", self.cp_layout, ("zigzag", "balanced", "auto"))
        _positive("cp", self.cp)
        _positive("ulysses", self.ulysses)
        _positive("dp_replicate", self.dp_replicate)
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise FieldError("dp_shard", self.dp_shard, "must be -1 (the rest of the world size) or >= 1")
        hybrid = self.cp_mode.startswith("hybrid")
        if hybrid and self.cp % self.ulysses:
            raise FieldError("ulysses", self.ulysses, f"hybrid cp needs cp ({self.cp}) divisible by ulysses")
        if not hybrid and self.ulysses != 1:
            raise FieldError("ulysses", self.ulysses, "only the hybrid cp modes use ulysses; leave it at 1")


@dataclass
class ChunkwiseConfig:
    chunk: int = 4096  # tokens per chunk
    mode: str = "exact"  # exact | sparse
    keep: int = 8  # sparse only: chunks of K/V kept

    def __post_init__(self):
        _positive("chunk", self.chunk)
        _choice("mode", self.mode, ("exact", "sparse"))


@dataclass
class MemoryConfig:
    activation_checkpoint: str = "none"  # none | selective | full
    offload_activations: bool = False
    # With offload_activations and full checkpointing: the last this-many layers keep their checkpoint on the
    # GPU, the rest go to the host (split the checkpoints between GPU and host RAM; `longtrain plan` sizes it).
    gpu_checkpoint_layers: int = 0
    # With activation_checkpoint full: one stored checkpoint per this many layers; the others re-run the layers
    # before them in their group during backward (an extra forward of those, 1/stride of the checkpoint memory).
    checkpoint_stride: int = 1
    tiled_mlp: bool | str = "auto"  # auto | true | false
    chunkwise: ChunkwiseConfig | None = None
    # Parameters, gradients and optimizer states on the host (FSDP2 CPUOffloadPolicy, also in one process;
    # DeepSpeed ZeRO-3 offload_param, which needs offload_optimizer too).
    offload_params: bool = False
    # Optimizer states on the host: DeepSpeed ZeRO-Offload (fp32 master + states, stepped by the CPU Adam).
    # FSDP2 offloads them only together with the parameters (offload_params).
    offload_optimizer: bool = False
    # Storage dtype of sharded parameters, their gradients and AdamW states (FSDP2): auto = float32 whenever
    # FSDP2 shards or offloads, else model.dtype. bfloat16 halves the host RAM of offload_params.
    master_dtype: str = "auto"

    def __post_init__(self):
        _choice("activation_checkpoint", self.activation_checkpoint, ("none", "selective", "full"))
        _choice("master_dtype", self.master_dtype, ("auto", "float32", "bfloat16"))
        if self.checkpoint_stride < 1 or (self.checkpoint_stride > 1 and self.activation_checkpoint != "full"):
            raise FieldError("checkpoint_stride", self.checkpoint_stride,
                             "must be >= 1, and > 1 only with activation_checkpoint: full")
        if self.gpu_checkpoint_layers < 0:
            raise FieldError("gpu_checkpoint_layers", self.gpu_checkpoint_layers, "must be >= 0")
        if self.gpu_checkpoint_layers and not (self.offload_activations and self.activation_checkpoint == "full"):
            raise FieldError("gpu_checkpoint_layers", self.gpu_checkpoint_layers,
                             "splits offloaded checkpoints between GPU and host: it needs offload_activations: true "
                             "and activation_checkpoint: full")
        if isinstance(self.tiled_mlp, str):
            _choice("tiled_mlp", self.tiled_mlp, ("auto",))


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1

    def __post_init__(self):
        _choice("name", self.name, ("adamw",))
        _positive("lr", self.lr)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
        _positive("weight_decay", self.weight_decay, allow_zero=True)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0  # linear warmup from 0, counted from the start of each stage
    decay: str = "cosine"  # cosine | linear | constant, from lr down to lr * min_lr_ratio at the stage's end
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _positive("warmup_steps", self.warmup_steps, allow_zero=True)
        _choice("decay", self.decay, ("cosine", "linear", "constant"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise FieldError("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class TrainConfig:
    global_batch_tokens: int = 0  # tokens per optimizer step over all ranks; 0: one micro-batch per dp rank
    micro_batch: int = 1  # sequences per forward pass per rank
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_bad_steps: int = 5  # NaN/inf steps skipped before the run stops
    resume: str = "auto"  # auto | never | a checkpoint directory
    seed: int = 0  # python / numpy / torch RNG seed (offset by rank)
    stop_after_steps: int | None = None  # end this run after this many global steps (checkpointed), e.g. a time slot
    debug_nan_steps: list[int] = field(default_factory=list)  # test hook: the loss of these global steps becomes NaN

    def __post_init__(self):
        _positive("global_batch_tokens", self.global_batch_tokens, allow_zero=True)
        _positive("micro_batch", self.micro_batch)
        _positive("grad_clip", self.grad_clip, allow_zero=True)
        _positive("max_bad_steps", self.max_bad_steps, allow_zero=True)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of the run (and on SIGTERM)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    at_end: bool = True  # false: no checkpoint when the run ends (benchmark runs; SIGTERM still saves one)
    debug_pause_s: float = 0.0  # test hook: sleep after writing the files, before marking the checkpoint complete

    def __post_init__(self):
        _positive("every_steps", self.every_steps, allow_zero=True)
        _positive("keep_last", self.keep_last)


@dataclass
class WandbConfig:
    project: str = "longtrain"
    mode: str = "online"  # online | offline | disabled
    entity: str | None = None

    def __post_init__(self):
        _choice("mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress_bar: bool = True
    plot: bool = True  # loss.png at the end of the run
    mfu_ceiling: bool = True  # on a GPU: measure and log each stage's MFU ceiling at its start (seconds)
    wandb: WandbConfig | None = None

    def __post_init__(self):
        _positive("every_steps", self.every_steps)


@dataclass
class EvalConfig:
    """Evaluation after each stage (longtrain.eval); `longtrain eval` takes the same block."""

    lengths: list[int] = field(default_factory=list)  # context lengths in tokens
    tasks: list[str] = field(default_factory=lambda: ["passkey"])  # perplexity | passkey | needle | needle_mv | needle_mq
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 20  # examples per (length, depth) cell
    task_options: dict = field(default_factory=dict)  # per task, e.g. {passkey: {digits: 3}}
    batch_size: int = 8  # sequences per forward pass
    seed: int = 0  # the same seed gives every evaluated model the same sequences
    untrained_next_rope: bool = True  # also score each stage's end with the next stage's rope, before training it
    # The perplexity task's documents (as `longtrain eval --data`): .jsonl/.json/.parquet/.csv/.txt, a saved
    # datasets dir, tiny | stdlib | synthetic:passkey. None: the bundled tiny corpus, concatenated.
    data: str | None = None
    text_field: str = "text"  # text column of `data`
    max_windows: int | None = 16  # perplexity windows per length at most (each stage end pays for them); None: all

    def __post_init__(self):
        for t in self.tasks:
            _choice("tasks", t, ("perplexity", "passkey", "needle", "needle_mv", "needle_mq"))
        if self.data is not None and "perplexity" not in self.tasks:
            raise FieldError("data", self.data, "eval.data holds the perplexity task's documents; add perplexity "
                                                "to eval.tasks (or remove eval.data)")
        if self.max_windows is not None:
            _positive("max_windows", self.max_windows)
        for d in self.depths:
            if not 0.0 <= d <= 1.0:
                raise FieldError("depths", d, "depths are fractions in [0, 1]")
        _positive("samples", self.samples)


@dataclass
class StageConfig:
    """One phase of training. `data`, `train`, `memory` and `eval` are the top-level ones with this stage's changes."""

    name: str
    seq_len: int  # tokens per sequence
    steps: int  # optimizer steps in this stage
    rope: dict | None = None  # HF rope_parameters block (rope_type, rope_theta, factor, ...); None: keep the model's
    max_position_embeddings: int | None = None  # config.json value; None: by rope type (build.stage_max_positions)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig | None = None

    def __post_init__(self):
        _positive("seq_len", self.seq_len)
        _positive("steps", self.steps)
        if not self.data.sources:
            raise FieldError("data.sources", [], "at least one data source is needed (top level or in the stage)")


@dataclass
class Recipe:
    name: str
    stages: list[StageConfig]
    run_dir: str = "runs/${name}"  # ${key} is replaced by that top-level value
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig | None = None
    source: str = "<recipe>"  # the file it came from (not a YAML key)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `save` writes)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def mlp_tile(self) -> int | None:
        """Tokens per MLP tile for the whole run, or None: what the trainer installs and the planner plans.

        The model is wrapped once for every stage, so `tiled_mlp: auto` looks at the most tokens one GPU's MLP
        sees in a micro-batch over the stages (seq_len x micro_batch / cp: the MLP's intermediate activations
        grow with them).
        """
        most = max(st.seq_len * st.train.micro_batch for st in self.stages) // self.parallel.cp
        return mlp_tile(self.stages[0].memory.tiled_mlp, most)


STAGE_INHERITS = ("data", "train", "memory", "eval")  # top-level sections a stage inherits and may override
RUN_WIDE_TRAIN_KEYS = ("resume", "seed", "stop_after_steps")  # train keys a stage may not change


def build_recipe(raw: dict, overrides: list[str] | None = None, file: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe from YAML data plus command-line overrides.

    Args:
        raw: the parsed YAML mapping.
        overrides: `a.b=c` strings, applied in order over the YAML.
        file: the file name quoted in error messages.
    Returns:
        The validated Recipe; each stage carries fully resolved data/train/memory/eval sections.
    Raises:
        RecipeError: unknown key, wrong type, missing required value or impossible combination.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{file}: a recipe is a YAML mapping of sections (name, model, data, ..., stages), "
                          f"got {type(raw).__name__}.")
    raw = copy.deepcopy(raw)
    for o in overrides or []:
        apply_override(raw, o, file)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{file}: `stages` = {stages_raw!r} is invalid: a non-empty list of stages, each with "
                          f"name, seq_len and steps, is required.")
    for i, st in enumerate(stages_raw):
        if not isinstance(st, dict):
            raise RecipeError(f"{file}: `stages[{i}]` = {st!r} is invalid: expected a mapping (name, seq_len, steps).")
        for key in RUN_WIDE_TRAIN_KEYS:
            run_value = (raw.get("train") or {}).get(key, getattr(TrainConfig(), key))
            if isinstance(st.get("train"), dict) and st["train"].get(key, run_value) != run_value:
                raise RecipeError(f"{file}: `stages[{i}].train.{key}` is invalid here: {key} applies to the whole "
                                  f"run; set it in the top-level train section.")
        for sec in STAGE_INHERITS:  # the stage's section = top-level section deep-merged with the stage's changes
            top = raw.get(sec)
            if sec in st and st[sec] is not None and top is not None:
                st[sec] = merge(top, st[sec])
            elif sec not in st and top is not None:
                st[sec] = copy.deepcopy(top)
    resolved = dict(raw)
    if isinstance(raw.get("run_dir", "runs/${name}"), str):
        resolved["run_dir"] = interpolate(raw, raw.get("run_dir", "runs/${name}"), file)
    # Top-level sections first, so an error in an inherited value is reported where it was written.
    for sec in ("model", "data", "parallel", "memory", "train", "checkpoint", "logging", "eval"):
        if sec in resolved:
            hints = typing.get_type_hints(Recipe)
            build_dataclass(hints[sec], resolved[sec], sec, file)
    recipe: Recipe = build_dataclass(Recipe, resolved, "", file)
    recipe.source = file
    from longtrain.model.rope import validate_rope

    head_dim = recipe.model.model_args().head_dim if recipe.model.flavor else None  # HF dirs: checked at load
    for i, st in enumerate(recipe.stages):
        if st.rope is not None:
            try:  # normalised: floats as floats, defaults filled (what the checkpoint and export will carry)
                st.rope = validate_rope(st.rope, f"stages[{i}].rope", head_dim=head_dim)
            except ValueError as e:
                raise RecipeError(f"{file}: {e}") from None
    check_sections(recipe, file)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe with `a.b=c` overrides (command line > YAML > defaults).

    Args:
        path: the YAML file.
        overrides: e.g. ["parallel.cp=4", "stages.0.steps=100"].
    Returns:
        The validated Recipe.
    Raises:
        RecipeError: the file is missing or not YAML, or any recipe problem (see build_recipe).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return build_recipe(raw, overrides, str(path))

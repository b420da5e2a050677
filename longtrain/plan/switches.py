"""What a plan is of: the step's layout (sizes, degrees, dtype, engine) and its memory switches, validated."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.kernels.attention import BACKENDS
from longtrain.kernels.tiled_mlp import AUTO_TILE_TOKENS, TiledMlp, mlp_tile

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AC_MODES = ("none", "selective", "full")
LOSS_IMPLS = ("torch", "compile", "triton", "auto")  # auto: triton (the plan is of a GPU)
# Attention backends the plan models: those whose registry entry has a backward workspace
# (kernels/attention_backends.py; `auto`'s is the larger of fa4's and cuDNN's, kernels/attention_auto.py).
ATTENTION_BACKENDS = tuple(name for name, backend in BACKENDS.items() if backend.workspace is not None)
DEFAULT_TILE_TOKENS = AUTO_TILE_TOKENS  # the tiled MLP's default tile (also the sequence tile the ladder tries)
DEFAULT_LOSS_CHUNK = 2048  # kernels/linear_cross_entropy.py auto chunk for a 128K vocabulary


def _check(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"plan_memory: {name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class StepLayout:
    """Sizes, degrees, dtype and sharding engine of one training step (plan_memory's arguments of that name)."""

    seq_len: int  # tokens per sequence
    micro_batch: int  # sequences per forward pass per GPU
    dp_shard: int  # ranks that shard parameters (FSDP2 / ZeRO)
    cp: int  # context-parallel degree: tokens per GPU = seq_len * micro_batch / cp
    cp_mode: str  # ring | allgather | ulysses | hybrid (sets the communication buffers)
    dtype: str  # parameter and compute dtype (DTYPE_BYTES)
    optimizer: str  # adamw | sgd
    backend: str  # fsdp2 | deepspeed
    zero_stage: int  # 0-3 (deepspeed)
    dp_replicate: int  # replicas (tokens per step only)
    steady_state: bool  # torch AdamW's states exist during the step (every step after the first)
    # How sequences are cut over cp ranks (parallel.cp_layout): every layout gives each rank seq_len / cp tokens;
    # they differ in padding (zigzag, auto: to a multiple of 2*cp; balanced: of cp) and in attention balance.
    cp_layout: str = "zigzag"

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "dp_shard", "cp", "dp_replicate"):
            _check(name, getattr(self, name))
        if self.cp_layout not in ("zigzag", "balanced", "auto"):
            raise ValueError(f"plan_memory: cp_layout {self.cp_layout!r} is not known; valid: zigzag, balanced, auto")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"plan_memory: dtype {self.dtype!r} is not known; valid: {', '.join(DTYPE_BYTES)}")

    @property
    def bytes(self) -> int:
        """Bytes per element of the compute dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        """Tokens per GPU (the sequence padded as the cp layout pads it)."""
        multiple = 1 if self.cp == 1 else self.cp if self.cp_layout == "balanced" else 2 * self.cp
        return -(-self.seq_len // multiple) * multiple * self.micro_batch // self.cp


@dataclass(frozen=True)
class MemorySwitches:
    """The memory switches of a step (plan_memory's arguments of that name; see its docstring)."""

    ac_mode: str = "none"  # none | selective | full
    offload: bool = False  # activation offload to host (full AC or none)
    tiled_mlp: TiledMlp = False  # False / None, True (DEFAULT_TILE_TOKENS) or a tile size in tokens
    seq_tile: int | None = None  # sequence-tiled blocks with this tile size
    chunkwise: int | None = None  # SeCO chunk size in tokens
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK  # tokens per chunk of linear + cross-entropy; None: full logits
    loss_impl: str = "torch"  # LOSS_IMPLS
    fused_kernels: bool = False  # the Triton RMSNorm / RoPE / SwiGLU
    attention: str = "auto"  # ATTENTION_BACKENDS: sets the backward workspace
    offload_params: bool = False  # parameters, gradients and optimizer states on the host
    offload_optimizer: bool = False  # optimizer states on the host
    master_dtype: str | None = None  # storage dtype of sharded states (FSDP2); None: what the trainer does
    gpu_checkpoint_layers: int = 0  # with offload and full AC: the last k layers' checkpoints stay on the GPU
    checkpoint_stride: int = 1  # with full AC: one stored block input per this many layers

    def check(self, cp: int) -> None:
        """Raise for an unknown mode or a combination longtrain does not run (before any accounting)."""
        if self.ac_mode not in AC_MODES:
            raise ValueError(f"plan_memory: ac_mode {self.ac_mode!r} is not known; valid: {', '.join(AC_MODES)}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"plan_memory: loss_impl {self.loss_impl!r} is not known; valid: {', '.join(LOSS_IMPLS)}")
        if self.offload and self.ac_mode == "selective":
            raise NotImplementedError("plan_memory: offload with selective checkpointing is not supported")
        if self.chunkwise is not None and cp > 1:
            raise NotImplementedError("plan_memory: chunkwise optimization does not combine with cp > 1")

    def check_checkpoints(self) -> None:
        """Raise where the checkpoint split or stride is set without the checkpointing it needs."""
        if self.gpu_checkpoint_layers and not (self.offload and self.ac_mode == "full"):
            raise ValueError("plan_memory: gpu_checkpoint_layers needs offload with ac_mode 'full'")
        if self.checkpoint_stride > 1 and self.ac_mode != "full":
            raise ValueError("plan_memory: checkpoint_stride > 1 needs ac_mode 'full'")

    @property
    def loss_kernel(self) -> str:
        """The loss impl that runs: `auto` is linear_cross_entropy's default, triton on CUDA (a plan is of a GPU)."""
        return "triton" if self.loss_impl == "auto" else self.loss_impl

    @property
    def mlp_tile(self) -> int | None:
        """Tokens per tiled-MLP tile, or None (untiled)."""
        return mlp_tile(self.tiled_mlp)

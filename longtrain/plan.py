"""`longtrain plan`: predicted per-GPU memory of a training step, and which memory switches make it fit.

The model is an accounting of the tensors longtrain keeps alive at the peak of a step (the start of the
backward pass of the last layer), per GPU:

- params, grads, optimizer states: sharded over dp_shard by FSDP2 / ZeRO-3 (ZeRO-1/2 shard less);
- buffers: FSDP all-gather buffers (two layers in flight), RoPE cos/sin, the CUDA context and allocator
  slack (a constant, `RUNTIME_OVERHEAD_BYTES`);
- activations: what autograd saves per layer for the chosen checkpointing mode (counted tensor by tensor
  for decoder.py with a fused attention kernel), plus one layer's recomputation and its gradients;
- logits: the chunked linear + cross-entropy working set (or the full logits without chunking).

Tokens per GPU are seq_len * micro_batch / cp. Numbers are bytes; `MemoryPlan.gib()` formats them.
The constants are estimates to be checked against measured peaks (docs/memory.md, "Measured").
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from longtrain.model.args import ModelArgs

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = int(1.0 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AC_MODES = ("none", "selective", "full")
TILED_MLP_AUTO_TOKENS = 32768  # tiled_mlp: auto turns tiling on from this many tokens per GPU
DEFAULT_TILE_TOKENS = 8192  # kernels/tiled_mlp.py AUTO_TILE_TOKENS
DEFAULT_LOSS_CHUNK = 2048  # kernels/linear_cross_entropy.py auto chunk for a 128K vocabulary


@dataclass
class MemoryPlan:
    """Predicted bytes per GPU at the peak of a training step."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    buffers: int
    host_offload: int  # host RAM for offloaded activations (not part of `total`)
    tokens_per_gpu: int
    tokens_per_step: int  # seq_len * micro_batch * data-parallel ranks

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.buffers

    def gib(self) -> dict[str, float]:
        """Every byte field in GiB (rounded to 0.01), plus total."""
        d = {k: round(v / GIB, 2) for k, v in asdict(self).items() if not k.startswith("tokens")}
        d["total"] = round(self.total / GIB, 2)
        return d


def _check(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"plan_memory: {name} must be >= {minimum}, got {value}")


def _layer_activation_bytes(a: ModelArgs, tokens: int, b: int, tile: int | None, seq_tile: int | None) -> int:
    """Bytes autograd keeps for one decoder block without block checkpointing, fused attention kernel.

    Counted from decoder.py: each RMSNorm keeps an fp32 copy and its output; RoPE keeps fp32 q/k and their
    rotated halves; attention keeps q, k, v, out and the fp32 LSE; SwiGLU keeps gate, up, silu(gate) and
    their product (4 x intermediate) unless tiled (one tile's worth). With `seq_tile` only the block input
    and attention's tensors are whole-sequence; the rest exists for one tile at a time.
    """
    d, hq, hk = a.head_dim, a.n_heads, a.n_kv_heads
    norms = 2 * a.dim * (4 + b)
    rope = 2 * (hq + hk) * d * 4
    attn = (hq + 2 * hk) * d * b + hq * d * b + hq * 4
    mlp = 4 * a.intermediate_size * b
    if seq_tile is not None:
        t = min(seq_tile, tokens)
        return tokens * (a.dim * b + attn) + t * (norms + rope + mlp + 2 * a.dim * b)
    mlp_tokens = tokens if tile is None else min(tile, tokens)
    return tokens * (norms + rope + attn) + mlp_tokens * mlp


def plan_memory(model_args: ModelArgs, seq_len: int, micro_batch: int = 1, dp_shard: int = 1, cp: int = 1,
                cp_mode: str = "allgather", dtype: str = "bfloat16", ac_mode: str = "none", offload: bool = False,
                tiled_mlp: bool | int = False, seq_tile: int | None = None, chunkwise: int | None = None, loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
                optimizer: str = "adamw", backend: str = "fsdp2", zero_stage: int = 3, dp_replicate: int = 1,
                ) -> MemoryPlan:
    """Predict per-GPU memory of one training step.

    Args:
        model_args: the model shape.
        seq_len: tokens per sequence; micro_batch: sequences per forward pass per GPU.
        dp_shard: ranks that shard parameters (FSDP2 / ZeRO); dp_replicate: replicas (tokens per step only).
        cp: context-parallel degree (tokens per GPU = seq_len * micro_batch / cp); cp_mode: ring | allgather |
            ulysses | hybrid (sets the communication buffers).
        dtype: parameter and compute dtype ("bfloat16" | "float32" | "float16").
        ac_mode: "none" | "selective" | "full"; offload: activation offload to host (full or none).
        tiled_mlp: False, True (DEFAULT_TILE_TOKENS) or a tile size in tokens.
        seq_tile: sequence-tiled blocks (apply_ac seq_tile) with this tile size, or None.
        chunkwise: SeCO chunk size in tokens, or None.
        loss_chunk: tokens per chunk of the linear + cross-entropy; None: full logits.
        optimizer: "adamw" | "sgd"; backend: "fsdp2" | "deepspeed"; zero_stage: 0-3 (deepspeed).

    Returns:
        The MemoryPlan.

    Raises:
        ValueError: an unknown option or a non-positive size.
        NotImplementedError: selective + offload, or chunkwise with cp > 1 (not supported by longtrain).
    """
    for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("dp_shard", dp_shard), ("cp", cp),
                    ("dp_replicate", dp_replicate)):
        _check(name, v)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"plan_memory: dtype {dtype!r} is not known; valid: {', '.join(DTYPE_BYTES)}")
    match ac_mode:
        case "none" | "selective" | "full":
            pass
        case _:
            raise ValueError(f"plan_memory: ac_mode {ac_mode!r} is not known; valid: {', '.join(AC_MODES)}")
    if offload and ac_mode == "selective":
        raise NotImplementedError("plan_memory: offload with selective checkpointing is not supported")
    if chunkwise is not None and cp > 1:
        raise NotImplementedError("plan_memory: chunkwise optimization does not combine with cp > 1")
    a, b = model_args, DTYPE_BYTES[dtype]
    n_params = a.num_params(include_embedding=True)
    tokens = seq_len * micro_batch // cp
    tile = None if tiled_mlp is False else (DEFAULT_TILE_TOKENS if tiled_mlp is True else int(tiled_mlp))

    # ---- parameters, gradients, optimizer ------------------------------------------------------------
    match optimizer:
        case "adamw":
            states = 2
        case "sgd":
            states = 0
        case _:
            raise ValueError(f"plan_memory: optimizer {optimizer!r} is not known; valid: adamw, sgd")
    layer_params = n_params // max(1, a.n_layers)
    match backend:
        case "fsdp2":
            # torch AdamW keeps its states in the parameter dtype; FSDP2 shards params, grads and states.
            params = n_params * b // dp_shard
            grads = n_params * b // dp_shard
            opt = states * n_params * b // dp_shard
            gather = 2 * layer_params * b if dp_shard > 1 else 0  # current + prefetched layer
        case "deepspeed":
            # DeepSpeed bf16: fp32 master weights + fp32 states, partitioned from stage 1.
            shard = dp_shard
            params = n_params * b // (shard if zero_stage >= 3 else 1)
            grads = n_params * b // (shard if zero_stage >= 2 else 1)
            opt = (4 + 4 * states) * n_params // (shard if zero_stage >= 1 else 1)
            gather = 2 * layer_params * b if zero_stage >= 3 and shard > 1 else 0
        case _:
            raise ValueError(f"plan_memory: backend {backend!r} is not known; valid: fsdp2, deepspeed")

    # ---- activations ----------------------------------------------------------------------------------
    layer_tokens = tokens if chunkwise is None else min(chunkwise, tokens)
    one_layer = _layer_activation_bytes(a, layer_tokens, b, tile, seq_tile)
    block_input = layer_tokens * a.dim * b
    attn_out = layer_tokens * (a.n_heads * a.head_dim * b + a.n_heads * 4)
    # Backward of one layer: its activations (recomputed or saved) plus gradients of q/k/v and a few
    # residual-stream-sized buffers.
    grad_work = layer_tokens * ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b + a.n_heads * a.head_dim * b
                                + 2 * a.dim * b)
    host = 0
    match ac_mode:
        case "none":
            saved = a.n_layers * one_layer
            if offload:
                host, saved = saved, 2 * one_layer  # two layers in flight between device and host
            acts = saved + grad_work
        case "selective":
            acts = a.n_layers * (block_input + attn_out) + one_layer + grad_work
        case "full":
            saved = a.n_layers * block_input
            if offload:
                host, saved = saved, 2 * block_input
            acts = saved + one_layer + grad_work
    # Residual stream, final norm (its fp32 copy unless sequence-tiled) and its output, hidden gradient.
    acts += layer_tokens * a.dim * (3 * b + (0 if seq_tile is not None else 4))
    if chunkwise is not None:
        kv = a.n_layers * 2 * a.n_kv_heads * a.head_dim * tokens
        # K/V store (dtype) + fp32 gradient accumulators + the concatenated K/V and leaf gradients of the
        # chunk being rebuilt (trainer/chunkwise.py).
        acts += kv * (b + 4) + kv * 2 * b

    # ---- logits ----------------------------------------------------------------------------------------
    loss_tokens = layer_tokens
    if loss_chunk is None:
        logits = loss_tokens * a.vocab_size * (b + 8)  # logits + fp32 copy + fp32 softmax gradient
    else:
        c = min(loss_chunk, loss_tokens)
        # One chunk: logits (dtype), fp32 copy, fp32 d-logits and its dtype cast; plus the fp32 weight-gradient
        # accumulator and the transient dtype product, and the stored hidden gradient.
        logits = c * a.vocab_size * (2 * b + 8) + a.vocab_size * a.dim * (4 + b) + loss_tokens * a.dim * b

    # ---- buffers ---------------------------------------------------------------------------------------
    rope = 2 * tokens * a.head_dim * 4  # cos and sin, fp32
    comm = 0
    if cp > 1:
        kv_tokens = tokens * 2 * a.n_kv_heads * a.head_dim * b
        match cp_mode:
            case "ring":
                comm = 2 * kv_tokens  # the K/V block being received and the one in use
            case "allgather":
                comm = cp * kv_tokens * 2  # all-gathered K/V of the full sequence and its gradient
            case "ulysses" | "hybrid":
                comm = 2 * tokens * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b
            case _:
                raise ValueError(f"plan_memory: cp_mode {cp_mode!r} is not known; valid: ring, allgather, ulysses, hybrid")
    buffers = gather + rope + comm + RUNTIME_OVERHEAD_BYTES
    return MemoryPlan(params=params, grads=grads, optimizer=opt, activations=acts, logits=logits, buffers=buffers,
                      host_offload=host, tokens_per_gpu=tokens,
                      tokens_per_step=seq_len * micro_batch * dp_shard * dp_replicate // cp)


# Memory switches from cheapest (in step time) to costliest; each entry: (label, overrides).
SWITCH_LADDER: tuple[tuple[str, dict], ...] = (
    ("chunked loss", {"ac_mode": "none", "tiled_mlp": False}),
    ("chunked loss + tiled MLP", {"ac_mode": "none", "tiled_mlp": True}),
    ("selective AC", {"ac_mode": "selective", "tiled_mlp": False}),
    ("selective AC + tiled MLP", {"ac_mode": "selective", "tiled_mlp": True}),
    ("full AC", {"ac_mode": "full", "tiled_mlp": False}),
    ("full AC + tiled MLP", {"ac_mode": "full", "tiled_mlp": True}),
    ("full AC + offload + tiled MLP", {"ac_mode": "full", "offload": True, "tiled_mlp": True}),
    ("full AC + offload + sequence-tiled blocks", {"ac_mode": "full", "offload": True, "tiled_mlp": True,
                                                   "seq_tile": DEFAULT_TILE_TOKENS}),
)


def suggest(gpu_bytes: int, host_bytes: int | None = None, **plan_kwargs) -> list[tuple[str, MemoryPlan]]:
    """Memory-switch settings (cheapest first) whose predicted peak fits `gpu_bytes`.

    Args:
        gpu_bytes: memory of one GPU.
        host_bytes: host RAM for offload (None: not checked).
        **plan_kwargs: plan_memory arguments; the ladder overrides ac_mode / offload / tiled_mlp, and the loss
            is always chunked.

    Returns:
        (label, plan) for every ladder setting that fits, cheapest first; empty when none fits.
    """
    base = {**plan_kwargs, "offload": False, "chunkwise": None, "seq_tile": None}
    if base.get("loss_chunk") is None:
        base["loss_chunk"] = DEFAULT_LOSS_CHUNK
    fits = []
    for label, over in SWITCH_LADDER:
        p = plan_memory(**{**base, **over})
        if p.total <= gpu_bytes and (host_bytes is None or p.host_offload <= host_bytes):
            fits.append((label, p))
    return fits


def _format(plan: MemoryPlan, gpu_bytes: int) -> str:
    g = plan.gib()
    rows = [f"  {k:<13} {v:>9.2f} GiB" for k, v in g.items() if k not in ("total", "host_offload")]
    rows.append(f"  {'total':<13} {g['total']:>9.2f} GiB   ({'fits' if plan.total <= gpu_bytes else 'does NOT fit'} "
                f"in {gpu_bytes / GIB:.0f} GiB)")
    if plan.host_offload:
        rows.append(f"  {'host offload':<13} {g['host_offload']:>9.2f} GiB of host RAM")
    rows.append(f"  tokens/GPU {plan.tokens_per_gpu:,}   tokens/step {plan.tokens_per_step:,}")
    return "\n".join(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtrain plan RECIPE [a.b=c ...] [--gpu-memory-gib N] [--world-size N]`."""
    p = subparsers.add_parser("plan", help="predicted memory per GPU for a recipe and what makes it fit")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs in the job (resolves dp_shard: -1)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan of every stage of the recipe and the switches that fit. Returns 0 if all stages fit."""
    from longtrain.config import load_recipe  # config sits above plan in the data flow

    recipe = load_recipe(args.recipe, args.overrides)
    par = recipe.parallel
    dp_shard = par.dp_shard if par.dp_shard != -1 else max(1, args.world_size // (par.cp * par.dp_replicate))
    gpu = int(args.gpu_memory_gib * GIB)
    model_args = recipe.model.model_args()
    dtype = "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype
    ok = True
    for i, stage in enumerate(recipe.stages):
        mem = stage.memory
        tokens_per_gpu = stage.seq_len * stage.train.micro_batch // par.cp
        tiled = mem.tiled_mlp if isinstance(mem.tiled_mlp, bool) else tokens_per_gpu >= TILED_MLP_AUTO_TOKENS
        kwargs = dict(model_args=model_args, seq_len=stage.seq_len, micro_batch=stage.train.micro_batch,
                      dp_shard=dp_shard, cp=par.cp, cp_mode=par.cp_mode, dtype=dtype, optimizer="adamw",
                      backend=par.backend, zero_stage=par.zero_stage, dp_replicate=par.dp_replicate)
        plan = plan_memory(**kwargs, ac_mode=mem.activation_checkpoint, offload=mem.offload_activations,
                           tiled_mlp=tiled, chunkwise=mem.chunkwise.chunk if mem.chunkwise else None)
        print(f"stage {i} ({stage.name}): seq_len {stage.seq_len:,}, dp_shard {dp_shard}, cp {par.cp} ({par.cp_mode}), "
              f"ac {mem.activation_checkpoint}, offload {mem.offload_activations}, tiled_mlp {tiled}")
        print(_format(plan, gpu))
        if plan.total > gpu:
            ok = False
            fits = suggest(gpu, **kwargs)
            if fits:
                print("  fits with: " + "; ".join(f"{label} ({p.total / GIB:.1f} GiB)" for label, p in fits[:3]))
            else:
                print("  no memory switch makes it fit: raise parallel.cp or parallel.dp_shard, or shorten seq_len")
    return 0 if ok else 1


__all__ = ["MemoryPlan", "SWITCH_LADDER", "add_parser", "plan_memory", "run", "suggest"]

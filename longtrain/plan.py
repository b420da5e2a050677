"""`longtrain plan`: predicted per-GPU peak memory of a training step, and which memory switches make it fit.

The prediction is `torch.cuda.max_memory_allocated` of a step: the bytes alive at the step's worst moment.
It is the largest of three moments, each an accounting of the tensors alive then, per GPU:

- end of the forward (the chunked loss running): parameters, optimizer states, every layer's saved
  activations, the final norm and the loss working set. Gradients do not exist yet (`zero_grad` sets
  them to None), so with no checkpointing this moment is the peak;
- backward of the first layer it reaches (the last one): as above minus the loss, plus the output
  projection's gradient, the layer's recomputed activations and its backward working set;
- backward of layer 0: every gradient exists, only layer 0's saved activations are left (the peak with
  offload, where nothing is kept per layer on the GPU).

Per token and layer the saved tensors are counted from decoder.py, the kernels and the switches (a CPU
test checks the count against `saved_tensors_hooks`): the fused Triton RMSNorm keeps its bf16 input and
an fp32 rstd, the eager one an fp32 copy and two bf16 tensors; RoPE keeps only cos/sin; attention keeps
q, k, v, out and the fp32 LSE; the SwiGLU MLP keeps gate and up and the down projection's input (eager:
silu(gate) too). The backward working set of a layer adds the gradients in flight and the fused attention
backward's workspace, which depends on the backend (`_attention_workspace`). Sequence-tiled blocks
accumulate the gradients of their sliced inputs in whole-sequence buffers (`slice_backward` allocates the
full tensor).

Calibrated against measured peaks on one H100 (docs/memory.md "Measured", docs/benchmarks.md,
2026-11-26; tests/unit/test_memory_plan.py keeps them as regression cases). Tokens per GPU are
seq_len * micro_batch / cp. `total` excludes the CUDA context and allocator slack: `fits()` adds
`RUNTIME_OVERHEAD_BYTES` for that. Numbers are bytes; `MemoryPlan.gib()` formats them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

from longtrain.model.args import ModelArgs

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN handles and caching-allocator fragmentation: outside max_memory_allocated,
# so not in `total`, but a GPU must hold them too (`MemoryPlan.fits`).
RUNTIME_OVERHEAD_BYTES = int(1.0 * GIB)
# Host RAM the OS, the Python processes and the CUDA driver's pinned staging keep for themselves.
HOST_RESERVE_GIB = 8.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AC_MODES = ("none", "selective", "full")
LOSS_IMPLS = ("torch", "compile", "triton", "auto")  # auto: triton (the plan is of a GPU)
# Attention backends the plan models (kernels/attention.py names). "auto" picks fa4 or cuDNN for a dense
# causal sequence depending on the installed packages (kernels/attention_auto.py), which the plan cannot see:
# it takes the larger of the two workspaces. flex and reference are not modelled (flex adds a BlockMask and
# layout copies, reference a seq x seq score matrix per head).
ATTENTION_BACKENDS = ("sdpa_cudnn", "sdpa_flash", "flash_attn", "fa4", "auto")
TILED_MLP_AUTO_TOKENS = 32768  # tiled_mlp: auto turns tiling on from this many tokens per GPU
DEFAULT_TILE_TOKENS = 8192  # kernels/tiled_mlp.py AUTO_TILE_TOKENS
DEFAULT_LOSS_CHUNK = 2048  # kernels/linear_cross_entropy.py auto chunk for a 128K vocabulary


@dataclass
class MemoryPlan:
    """Predicted bytes per GPU at the peak of a training step (the fields as they are at that moment)."""

    params: int
    grads: int  # gradients alive at the peak (none at the end of the forward)
    optimizer: int
    activations: int
    logits: int  # the loss working set (only at the end of the forward)
    buffers: int  # FSDP all-gathers, RoPE cos/sin, context-parallel communication
    host_offload: int  # host RAM for offloaded activations, per GPU (not part of `total`)
    tokens_per_gpu: int
    tokens_per_step: int  # seq_len * micro_batch * data-parallel ranks (cp ranks share a sequence)
    peak_at: str = ""  # which moment of the step is the peak
    host_states: int = 0  # host RAM, per GPU, for offloaded parameters, gradients and optimizer states

    @property
    def host_total(self) -> int:
        """Host RAM this GPU's process needs for what is offloaded (states and activations)."""
        return self.host_offload + self.host_states

    @property
    def total(self) -> int:
        """Predicted torch.cuda.max_memory_allocated of the step."""
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.buffers

    def fits(self, gpu_bytes: int, host_bytes: int | None = None) -> bool:
        """The peak plus the runtime overhead (CUDA context, fragmentation) fits `gpu_bytes`, and what is
        offloaded fits `host_bytes` (host RAM per GPU; None: not checked)."""
        return self.total + RUNTIME_OVERHEAD_BYTES <= gpu_bytes and (host_bytes is None or
                                                                    self.host_total <= host_bytes)

    def gib(self) -> dict[str, float]:
        """Every byte field in GiB (rounded to 0.01), plus total."""
        d = {k: round(v / GIB, 2) for k, v in asdict(self).items()
             if isinstance(v, int) and not k.startswith("tokens")}
        d["total"] = round(self.total / GIB, 2)
        return d


def _check(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"plan_memory: {name} must be >= {minimum}, got {value}")


@dataclass
class _PerToken:
    """Bytes per token of one decoder block (see the module docstring for where each comes from)."""

    x: int  # residual stream (block input / output, their gradients)
    qkv: int  # q, k, v after RoPE
    out: int  # attention output
    lse: int  # fp32 log-sum-exp per query head
    attn_ws: int  # fused attention backward workspace (_attention_workspace)
    gate: int  # one intermediate_size tensor (gate, up, ...)
    mlp_saved: int  # what the untiled MLP keeps beyond its input
    norms: int  # what both RMSNorms keep, their outputs (the projections' inputs) included
    norm_keeps_x: bool  # the first RMSNorm saves the block input itself (fused), not an fp32 copy (eager)


def _attention_workspace(a: ModelArgs, b: int, attention: str) -> int:
    """Bytes per token the attention backward allocates beyond dq, dk, dv and the incoming d_out."""
    q, gqa = a.n_heads * a.head_dim, a.n_kv_heads < a.n_heads
    match attention:
        case "sdpa_cudnn":
            # dO copied into O's (bs, h, s, d) strides (attention_sdpa.py), an fp32 dq accumulator and, with
            # GQA, dk/dv per query head. cuDNN's workspace is internal: this is the accounting the 512K 1B and
            # 256K 3B measurements (cuDNN) confirm, not read from source.
            return q * b + q * 4 + (2 * q * b if gqa else 0)
        case "sdpa_flash" | "flash_attn":
            # FlashAttention-2 mha_bwd: dq_accum fp32, softmax_d fp32 per head, dk/dv_expanded per query head.
            return q * 4 + a.n_heads * 4 + (2 * q * b if gqa else 0)
        case "fa4":
            # flash-attn-4 _flash_attn_bwd (4.0.0b36): dq_accum fp32, dpsum and lse_log2 fp32 per head; with GQA
            # fp32 dk_accum/dv_accum per KV head (dK/dV summed in the kernel, never expanded). head_dim is
            # rounded up to 32 (64 with SM90's dKV_swapAB: not for the head dims 64 and 128 of Llama).
            hd = -(-a.head_dim // 32) * 32
            return a.n_heads * (hd * 4 + 8) + (2 * a.n_kv_heads * hd * 4 if gqa else 0)
        case "auto":
            return max(_attention_workspace(a, b, "fa4"), _attention_workspace(a, b, "sdpa_cudnn"))
        case "flex" | "reference":
            raise NotImplementedError(f"plan_memory: attention {attention!r} is not modelled; valid: "
                                      f"{', '.join(ATTENTION_BACKENDS)}")
        case _:
            raise ValueError(f"plan_memory: attention {attention!r} is not known; valid: {', '.join(ATTENTION_BACKENDS)}")


def _per_token(a: ModelArgs, b: int, fused: bool, attention: str) -> _PerToken:
    q = a.n_heads * a.head_dim
    x, gate = a.dim * b, a.intermediate_size * b
    ws = _attention_workspace(a, b, attention)
    if fused:  # Triton RMSNorm keeps its input x and an fp32 rstd; SwiGLU keeps gate and up
        norms, mlp = 2 * (x + x + 4), 3 * gate
    else:  # eager RMSNorm: fp32 copy, rsqrt, normalised bf16 and the weighted output; silu(gate) kept too
        norms, mlp = 2 * (4 * a.dim + 4 + 2 * x), 4 * gate
    return _PerToken(x=x, qkv=(a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b, out=q * b, lse=a.n_heads * 4,
                     attn_ws=ws, gate=gate, mlp_saved=mlp, norms=norms, norm_keeps_x=fused)


def layer_saved_bytes_per_token(a: ModelArgs, dtype: str = "bfloat16", fused_kernels: bool = False) -> int:
    """Bytes autograd saves per token for one decoder block without checkpointing or tiling (fused attention)."""
    p = _per_token(a, DTYPE_BYTES[dtype], fused_kernels, "auto")  # the saved set is the same for every fused backend
    return p.norms + p.qkv + p.out + p.lse + p.mlp_saved


def _block_bytes(p: _PerToken, ac_mode: str, offload: bool, mlp_tiled: bool, seq_tile: bool,
                 ) -> tuple[int, int, int]:
    """(kept per layer through the step, recomputed for the layer in backward, backward working set), per token.

    `kept` stays on the GPU for every layer (0 with offload); `recomputed` exists only for the layer being
    back-propagated; `work` is that layer's gradients in flight at its worst moment.
    """
    if seq_tile:
        # Only the block input and attention's tensors are whole-sequence; the tiled parts' gradients are
        # accumulated in whole-sequence buffers for x and out (slice_backward), plus dout's contiguous copy.
        layer = p.x + p.qkv + p.out + p.lse
        work = p.x + p.out + p.x + p.qkv + p.attn_ws  # dY, d_out, d_x, dq/dk/dv, workspace
    else:
        layer = p.norms + p.qkv + p.out + p.lse + (0 if mlp_tiled else p.mlp_saved)
        # Worst of: the MLP backward (dY, d_act, d_gate, d_up, the activation freed) and the attention
        # backward (dY, d_out, dq/dk/dv, workspace; the MLP's tensors already freed).
        mlp_moment = 0 if mlp_tiled else p.x + 2 * p.gate
        work = max(mlp_moment, p.x + p.out + p.qkv + p.attn_ws - (0 if mlp_tiled else p.mlp_saved))
    # A checkpoint saves the block input; the recomputed layer shares it where it saves x itself.
    shared_x = p.x if seq_tile or p.norm_keeps_x else 0
    match ac_mode:
        case "none":
            kept, recomputed = layer, 0
        case "selective":  # the block input and attention's outputs are kept, the rest recomputed
            kept = p.x + p.out + p.lse
            recomputed = layer - shared_x - p.out - p.lse
        case "full":
            kept, recomputed = p.x, layer - shared_x
        case _:
            raise AssertionError(ac_mode)
    if offload:
        # Nothing per layer stays; in backward the layer's saved tensors come back from the host. The
        # re-entrant checkpoint (full + offload) also holds the recomputed block output during its backward.
        recomputed, kept = recomputed + kept + (p.x if ac_mode == "full" else 0), 0
    return kept, recomputed, work


def plan_memory(model_args: ModelArgs, seq_len: int, micro_batch: int = 1, dp_shard: int = 1, cp: int = 1,
                cp_mode: str = "allgather", dtype: str = "bfloat16", ac_mode: str = "none", offload: bool = False,
                tiled_mlp: bool | int = False, seq_tile: int | None = None, chunkwise: int | None = None,
                loss_chunk: int | None = DEFAULT_LOSS_CHUNK, loss_impl: str = "torch", fused_kernels: bool = False,
                optimizer: str = "adamw", backend: str = "fsdp2", zero_stage: int = 3, dp_replicate: int = 1,
                steady_state: bool = True, attention: str = "auto", offload_params: bool = False,
                offload_optimizer: bool = False, master_dtype: str | None = None,
                gpu_checkpoint_layers: int = 0, checkpoint_stride: int = 1) -> MemoryPlan:
    """Predict per-GPU peak memory of one training step.

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
        loss_impl: the chunked loss's impl, "torch" (eager: fp32 logits and their softmax exist per chunk),
            "compile" (the fp32 copies are fused away), "triton" (the gradient overwrites the logits) or
            "auto" (triton: what runs on a GPU).
        fused_kernels: the Triton RMSNorm / RoPE / SwiGLU (kernels.apply_fused_kernels) are on.
        optimizer: "adamw" | "sgd"; backend: "fsdp2" | "deepspeed"; zero_stage: 0-3 (deepspeed).
        steady_state: torch AdamW's states exist during the step (every step after the first). False: the
            first step, whose states are created in opt.step() after the backward (a benchmark with no
            warm-up step measures that).
        attention: the attention backend (ATTENTION_BACKENDS; model.attention of a recipe, default "auto"):
            sets the backward workspace.
        offload_params: parameters, gradients and optimizer states live on the host (FSDP2 CPUOffloadPolicy;
            DeepSpeed ZeRO-3 offload_param, which needs offload_optimizer too). The GPU holds the layer being
            computed and the next one, gathered in the compute dtype, and the root's embedding/output/norm.
        offload_optimizer: optimizer states (DeepSpeed: fp32 master weights and states, and the fp32
            gradients they are stepped with) on the host. FSDP2 offloads states only with the parameters.
        gpu_checkpoint_layers: with offload and full AC, the last this-many layers keep their checkpoint (the
            block input) on the GPU; the host holds the others.
        checkpoint_stride: with full AC, one stored block input per this many layers (of the offloaded ones
            with offload); the layer being back-propagated then also holds its re-run input.
        master_dtype: storage dtype of sharded parameters, gradients and optimizer states (FSDP2). None: what
            the trainer does (float32 whenever FSDP2 shards or offloads, else `dtype`).

    Returns:
        The MemoryPlan at the peak moment.

    Raises:
        ValueError: an unknown option or a non-positive size.
        NotImplementedError: selective + offload, or chunkwise with cp > 1 (not supported by longtrain), or
            attention "flex" / "reference" (not modelled).
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
    match loss_impl:
        case "torch" | "compile" | "triton":
            pass
        case "auto":  # linear_cross_entropy's default: triton on CUDA, and the plan is of a GPU
            loss_impl = "triton"
        case _:
            raise ValueError(f"plan_memory: loss_impl {loss_impl!r} is not known; valid: {', '.join(LOSS_IMPLS)}")
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
    out_params = a.vocab_size * a.dim  # output projection (the embedding when tied): its gradient comes first
    root_params = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim  # embedding, output, final norm
    # FSDP2 shards over the flattened dp_shard x cp mesh, and ZeRO partitions over its data-parallel group,
    # which is every rank of a replica (dp_shard x cp): cp ranks hold different tokens of the same sequences
    # but share the parameters (PITFALLS.md "Planning memory at scale").
    shard = dp_shard * cp
    host_states = 0
    match backend:
        case "fsdp2":
            if offload_optimizer and not offload_params:
                raise ValueError("plan_memory: FSDP2 offloads optimizer states only together with the parameters "
                                 "(CPUOffloadPolicy): set offload_params too, or use backend deepspeed")
            sharded = shard > 1 or offload_params  # one process without offload runs unwrapped
            store = DTYPE_BYTES[master_dtype or ("float32" if sharded else dtype)]
            # torch AdamW keeps its states in the parameter (storage) dtype, created at the first opt.step();
            # FSDP2 shards params, grads and states. Gathered: the current and the prefetched block in the
            # compute dtype, and the root module's parameters (unsharded from its forward to its backward).
            params = n_params * store // shard
            grads = n_params * store // shard
            grad_out = out_params * store // shard
            opt = states * n_params * store // shard if steady_state else 0
            gather = 2 * layer_params * b + root_params * b if sharded else 0
            if offload_params:  # everything sharded lives on the host; the GPU keeps only what is gathered
                host_states = params + grads + states * n_params * store // shard
                params = grads = grad_out = opt = 0
        case "deepspeed":
            if offload_params and (zero_stage != 3 or not offload_optimizer):
                raise ValueError("plan_memory: DeepSpeed offloads parameters at zero_stage 3 only, with "
                                 "offload_optimizer")
            # Compute-dtype params (partitioned at stage 3) and grads (partitioned from stage 2); with a 16-bit
            # dtype, fp32 master weights + fp32 states partitioned from stage 1, built at initialisation.
            master = 4 if b < 4 else 0
            params = n_params * b // (shard if zero_stage >= 3 else 1)
            grads = n_params * b // (shard if zero_stage >= 2 else 1)
            grad_out = out_params * b // (shard if zero_stage >= 2 else 1)
            opt = (master + 4 * states) * n_params // (shard if zero_stage >= 1 else 1)
            gather = 2 * layer_params * b if zero_stage >= 3 and shard > 1 else 0
            if offload_optimizer:
                # ZeRO-Offload: master + states on the host, and an fp32 copy of the gradient partition
                # there for the CPU Adam step.
                host_states = opt + 4 * n_params // (shard if zero_stage >= 1 else 1)
                opt = 0
            if offload_params:
                host_states += params
                params, gather = 0, 2 * layer_params * b + root_params * b
        case _:
            raise ValueError(f"plan_memory: backend {backend!r} is not known; valid: fsdp2, deepspeed")

    # ---- activations: per token of the layer being run ------------------------------------------------
    t = tokens if chunkwise is None else min(chunkwise, tokens)  # tokens one layer's graph holds
    p = _per_token(a, b, fused_kernels, attention)
    kept, recomputed, work = _block_bytes(p, ac_mode, offload, tile is not None, seq_tile is not None)
    # Per-token tiles (tiled MLP, sequence-tiled blocks) add one tile's full intermediates in backward.
    tile_work = 0
    if seq_tile is not None:
        tile_work = min(seq_tile, t) * (p.norms + p.mlp_saved + 2 * p.gate)
    elif tile is not None:
        tile_work = min(tile, t) * (p.mlp_saved + 2 * p.gate)
    # The final norm: its saved input and its output (held by the caller through the backward); eager and
    # untiled, an fp32 copy instead of the input.
    final_fwd = t * (2 * p.x if fused_kernels or seq_tile is not None else 4 * a.dim + 2 * p.x)
    h_held = t * p.x  # the final hidden states, alive in the caller until the step ends
    if gpu_checkpoint_layers and not (offload and ac_mode == "full"):
        raise ValueError("plan_memory: gpu_checkpoint_layers needs offload with ac_mode 'full'")
    if checkpoint_stride > 1 and ac_mode != "full":
        raise ValueError("plan_memory: checkpoint_stride > 1 needs ac_mode 'full'")
    n_off = a.n_layers - gpu_checkpoint_layers
    stored = -(-n_off // checkpoint_stride) if ac_mode == "full" else n_off  # checkpoints of the offloaded layers
    host = stored * t * (p.x if ac_mode == "full" else kept + recomputed) if offload else 0
    # The last gpu_checkpoint_layers checkpoints stay on the GPU until their layer's backward frees them (they are
    # the first layers back-propagated, so none is left at layer 0's backward).
    gpu_ckpt = gpu_checkpoint_layers * t * p.x
    kv_store = 0
    if chunkwise is not None:
        kv = a.n_layers * 2 * a.n_kv_heads * a.head_dim * tokens
        # K/V store (dtype) + fp32 gradient accumulators + the concatenated K/V and leaf gradients of the
        # chunk being rebuilt (trainer/chunkwise.py).
        kv_store = kv * (b + 4) + kv * 2 * b

    # ---- the loss working set at the end of the forward -------------------------------------------------
    if loss_chunk is None:
        loss = t * a.vocab_size * (b + 8)  # logits + fp32 copy + fp32 softmax gradient
    else:
        c = min(loss_chunk, t)
        # One chunk's logits (dtype) and d-logits cast (dtype), plus with the eager impl their fp32 copy
        # and fp32 softmax (the Triton epilogue overwrites the logits: one buffer); the fp32 weight-gradient
        # accumulator and one fp32 product (addmm with an fp32 out_dtype still allocates the product before
        # adding it: +1.0 GiB measured at 8K and 32K on the H100, 2026-11-27); the stored hidden gradient.
        per_logit = {"torch": 2 * b + 8, "compile": 2 * b, "triton": b}[loss_impl]
        loss = c * a.vocab_size * per_logit + out_params * (4 + 4) + t * p.x

    # ---- the three candidate moments -------------------------------------------------------------------
    layer_now = t * (kept + recomputed + work) + tile_work  # the layer being back-propagated
    if checkpoint_stride > 1:  # its input re-run from the group's stored one, beside that one
        layer_now += t * p.x
    # Without offload, kept is per stored checkpoint: one per stride layers.
    kept_layers = a.n_layers if offload or checkpoint_stride == 1 else -(-a.n_layers // checkpoint_stride)
    moments = {
        "end of forward (loss)": (0, kept_layers * t * kept + gpu_ckpt + final_fwd + kv_store, loss),
        "backward of the last layer": (grad_out, h_held + (kept_layers - 1) * t * kept + gpu_ckpt + layer_now
                                       + kv_store, 0),
        "backward of layer 0": (grads, h_held + layer_now + kv_store, 0),
    }
    peak_at = max(moments, key=lambda k: sum(moments[k]))
    grads_now, acts, logits = moments[peak_at]

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
    buffers = gather + rope + comm
    return MemoryPlan(params=params, grads=grads_now, optimizer=opt, activations=acts, logits=logits,
                      buffers=buffers, host_offload=host, tokens_per_gpu=tokens,
                      tokens_per_step=seq_len * micro_batch * dp_shard * dp_replicate, peak_at=peak_at,
                      host_states=host_states)


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
    # Parameters, gradients and optimizer states on the host (memory.offload_params; with DeepSpeed also
    # memory.offload_optimizer): the GPU keeps only activations and the layers being computed.
    ("full AC + tiled MLP + parameter offload", {"ac_mode": "full", "tiled_mlp": True, "offload_params": True,
                                                 "offload_optimizer": True}),
    ("full AC + offload + tiled MLP + parameter offload", {"ac_mode": "full", "offload": True, "tiled_mlp": True,
                                                           "offload_params": True, "offload_optimizer": True}),
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
    base = {**plan_kwargs, "offload": False, "chunkwise": None, "seq_tile": None, "offload_params": False,
            "offload_optimizer": False}
    if base.get("loss_chunk") is None:
        base["loss_chunk"] = DEFAULT_LOSS_CHUNK
    fits = []
    for label, over in SWITCH_LADDER:
        over = dict(over)
        if over.get("offload_params") and base.get("backend", "fsdp2") == "fsdp2":
            over.pop("offload_optimizer")  # FSDP2 offloads the states with the parameters
        p = plan_memory(**{**base, **over})
        if p.fits(gpu_bytes, host_bytes):
            fits.append((label, p))
    return fits


def _format(plan: MemoryPlan, gpu_bytes: int) -> str:
    g = plan.gib()
    rows = [f"  {k:<13} {v:>9.2f} GiB" for k, v in g.items() if k not in ("total", "host_offload")]
    rows.append(f"  {'total':<13} {g['total']:>9.2f} GiB   ({'fits' if plan.fits(gpu_bytes) else 'does NOT fit'} "
                f"in {gpu_bytes / GIB:.0f} GiB with {RUNTIME_OVERHEAD_BYTES / GIB:.0f} GiB runtime overhead; "
                f"peak at {plan.peak_at})")
    if plan.host_offload or plan.host_states:
        rows.append(f"  host RAM per GPU: {g['host_states']:.2f} GiB parameters/gradients/optimizer states + "
                    f"{g['host_offload']:.2f} GiB activation checkpoints = {plan.host_total / GIB:.2f} GiB")
    rows.append(f"  tokens/GPU {plan.tokens_per_gpu:,}   tokens/step {plan.tokens_per_step:,}")
    return "\n".join(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `longtrain plan RECIPE [a.b=c ...] [--gpu-memory-gib N] [--world-size N]`."""
    p = subparsers.add_parser("plan", help="predicted memory per GPU for a recipe and what makes it fit")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs in the job (resolves dp_shard: -1)")
    p.add_argument("--host-memory-gib", type=float, default=None,
                   help="host RAM of one node, shared by its GPUs' processes (default: 128 for one GPU, 70 a GPU)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(world size, 8)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan of every stage of the recipe and the switches that fit. Returns 0 if all stages fit."""
    from longtrain.config import load_recipe  # config sits above plan in the data flow
    from longtrain.kernels.attention_auto import dense_choice_here
    from longtrain.kernels.linear_cross_entropy import auto_chunk_tokens

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.model.attention not in ATTENTION_BACKENDS:
        print(f"error: model.attention {recipe.model.attention!r} is not modelled by the plan; valid: "
              f"{', '.join(ATTENTION_BACKENDS)}", file=sys.stderr)
        return 2
    par = recipe.parallel
    dp_shard = par.dp_shard if par.dp_shard != -1 else max(1, args.world_size // (par.cp * par.dp_replicate))
    gpu = int(args.gpu_memory_gib * GIB)
    per_node = args.gpus_per_node or min(args.world_size, 8)
    # Default host RAM: this project's GPU machines (1 GPU: 128 GiB; 8 GPUs: 560 GiB, ~70 GiB a GPU).
    node_host = args.host_memory_gib if args.host_memory_gib else (128.0 if per_node == 1 else 70.0 * per_node)
    host = int((node_host - HOST_RESERVE_GIB) * GIB) // per_node  # host RAM each GPU's process may use
    model_args = recipe.model.model_args()
    dtype = "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype
    ok = True
    # What the trainer runs on a GPU: the recipe's attention backend, its loss chunk and impl
    # (linear_cross_entropy's defaults: the Triton epilogue on CUDA), the fused kernels unless the recipe
    # turns them off (model.fused_kernels auto = on with a GPU), no sequence-tiled blocks (the trainer does
    # not apply them), and the optimizer states of every step after the first.
    # `auto` is planned as the kernel it picks on this machine's GPU; without one, as the larger candidate.
    attention = dense_choice_here(recipe.model.attention, model_args.head_dim)
    common = dict(attention=attention, loss_chunk=auto_chunk_tokens(model_args.vocab_size),
                  loss_impl="auto", fused_kernels=recipe.model.fused_kernels is not False, steady_state=True)
    for i, stage in enumerate(recipe.stages):
        mem = stage.memory
        tokens_per_gpu = stage.seq_len * stage.train.micro_batch // par.cp
        tiled = mem.tiled_mlp if isinstance(mem.tiled_mlp, bool) else tokens_per_gpu >= TILED_MLP_AUTO_TOKENS
        kwargs = dict(model_args=model_args, seq_len=stage.seq_len, micro_batch=stage.train.micro_batch,
                      dp_shard=dp_shard, cp=par.cp, cp_mode=par.cp_mode, dtype=dtype, optimizer="adamw",
                      backend=par.backend, zero_stage=par.zero_stage, dp_replicate=par.dp_replicate, **common)
        master = None if mem.master_dtype == "auto" else mem.master_dtype
        plan = plan_memory(**kwargs, ac_mode=mem.activation_checkpoint, offload=mem.offload_activations,
                           tiled_mlp=tiled, chunkwise=mem.chunkwise.chunk if mem.chunkwise else None,
                           offload_params=mem.offload_params, offload_optimizer=mem.offload_optimizer,
                           master_dtype=master, gpu_checkpoint_layers=mem.gpu_checkpoint_layers,
                           checkpoint_stride=mem.checkpoint_stride)
        print(f"stage {i} ({stage.name}): seq_len {stage.seq_len:,}, dp_shard {dp_shard}, cp {par.cp} ({par.cp_mode}), "
              f"ac {mem.activation_checkpoint}, offload {mem.offload_activations}, tiled_mlp {tiled}, "
              f"offload_params {mem.offload_params}, attention {recipe.model.attention}")
        print(_format(plan, gpu))
        if plan.host_total > host:
            print(f"  host RAM does NOT fit: {plan.host_total / GIB:.1f} GiB per GPU, {host / GIB:.1f} GiB available "
                  f"({node_host:.0f} GiB less {HOST_RESERVE_GIB:.0f} for the OS shared by {per_node} GPU process(es)); "
                  f"memory.master_dtype: bfloat16 halves FSDP2's offloaded states, memory.gpu_checkpoint_layers "
                  f"keeps checkpoints on the GPU")
        if not plan.fits(gpu, host):
            ok = False
            fits = suggest(gpu, host, **{**kwargs, "master_dtype": master})
            if fits:
                print("  fits with: " + "; ".join(f"{label} ({p.total / GIB:.1f} GiB)" for label, p in fits[:3]))
            else:
                print("  no memory switch makes it fit: raise parallel.cp or parallel.dp_shard, or shorten seq_len")
    return 0 if ok else 1


__all__ = ["ATTENTION_BACKENDS", "MemoryPlan", "SWITCH_LADDER", "add_parser", "plan_memory", "run", "suggest"]

"""`plan_memory`: the per-GPU peak of one training step, the largest of three moments (see the package docstring)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from longtrain.kernels.tiled_mlp import TiledMlp
from longtrain.model.args import ModelArgs
from longtrain.plan.activations import PerToken, block_bytes, per_token
from longtrain.plan.states import States, state_bytes
from longtrain.plan.switches import DEFAULT_LOSS_CHUNK, DEFAULT_TILE_TOKENS, MemorySwitches, StepLayout

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN handles and caching-allocator fragmentation: outside max_memory_allocated,
# so not in `total`, but a GPU must hold them too (`MemoryPlan.fits`).
RUNTIME_OVERHEAD_BYTES = int(1.0 * GIB)


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


def plan_memory(model_args: ModelArgs, seq_len: int, micro_batch: int = 1, dp_shard: int = 1, cp: int = 1,
                cp_mode: str = "allgather", dtype: str = "bfloat16", ac_mode: str = "none", offload: bool = False,
                tiled_mlp: TiledMlp = False, seq_tile: int | None = None, chunkwise: int | None = None,
                loss_chunk: int | None = DEFAULT_LOSS_CHUNK, loss_impl: str = "torch", fused_kernels: bool = False,
                optimizer: str = "adamw", backend: str = "fsdp2", zero_stage: int = 3, dp_replicate: int = 1,
                steady_state: bool = True, attention: str = "auto", offload_params: bool = False,
                offload_optimizer: bool = False, master_dtype: str | None = None,
                gpu_checkpoint_layers: int = 0, checkpoint_stride: int = 1, cp_layout: str = "zigzag") -> MemoryPlan:
    """Predict per-GPU peak memory of one training step.

    Args:
        model_args: the model shape.
        seq_len, micro_batch, dp_shard, cp, cp_mode, dtype, optimizer, backend, zero_stage, dp_replicate,
            steady_state, cp_layout: the step's layout (`StepLayout`). steady_state False plans the first step, whose
            AdamW states are created in opt.step() after the backward (a benchmark with no warm-up step).
        ac_mode, offload, tiled_mlp, seq_tile, chunkwise, loss_chunk, loss_impl, fused_kernels, attention,
            offload_params, offload_optimizer, master_dtype, gpu_checkpoint_layers, checkpoint_stride: the
            memory switches (`MemorySwitches`). loss_impl: "torch" (eager: fp32 logits and their softmax exist
            per chunk), "compile" (the fp32 copies fused away), "triton" (the gradient overwrites the logits),
            "auto" (triton). offload_params: parameters, gradients and states on the host (FSDP2
            CPUOffloadPolicy; DeepSpeed ZeRO-3 offload_param, with offload_optimizer): the GPU holds the layer
            being computed and the next one, and the root's embedding/output/norm. offload_optimizer:
            DeepSpeed's fp32 master weights, states and the gradients they step with on the host (FSDP2 only
            with the parameters). master_dtype None: float32 whenever FSDP2 shards or offloads, else dtype.

    Returns:
        The MemoryPlan at the peak moment.

    Raises:
        ValueError: an unknown option or a non-positive size.
        NotImplementedError: selective + offload, or chunkwise with cp > 1 (not supported by longtrain), or
            attention "flex" / "reference" (not modelled).
    """
    lay = StepLayout(seq_len=seq_len, micro_batch=micro_batch, dp_shard=dp_shard, cp=cp, cp_mode=cp_mode,
                     dtype=dtype, optimizer=optimizer, backend=backend, zero_stage=zero_stage,
                     dp_replicate=dp_replicate, steady_state=steady_state, cp_layout=cp_layout)
    sw = MemorySwitches(ac_mode=ac_mode, offload=offload, tiled_mlp=tiled_mlp, seq_tile=seq_tile,
                        chunkwise=chunkwise, loss_chunk=loss_chunk, loss_impl=loss_impl, fused_kernels=fused_kernels,
                        attention=attention, offload_params=offload_params, offload_optimizer=offload_optimizer,
                        master_dtype=master_dtype, gpu_checkpoint_layers=gpu_checkpoint_layers,
                        checkpoint_stride=checkpoint_stride)
    return plan_step(model_args, lay, sw)


def plan_step(a: ModelArgs, lay: StepLayout, sw: MemorySwitches) -> MemoryPlan:
    """plan_memory on a validated layout and switches."""
    sw.check(lay.cp)
    st = state_bytes(a, lay, sw)
    moments, host = _moments(a, lay, sw, st)
    peak_at = max(moments, key=lambda k: sum(moments[k]))
    grads_now, acts, logits = moments[peak_at]
    return MemoryPlan(params=st.params, grads=grads_now, optimizer=st.opt, activations=acts, logits=logits,
                      buffers=st.gather + _buffers(a, lay), host_offload=host, tokens_per_gpu=lay.tokens,
                      tokens_per_step=lay.seq_len * lay.micro_batch * lay.dp_shard * lay.dp_replicate,
                      peak_at=peak_at, host_states=st.host)


def _moments(a: ModelArgs, lay: StepLayout, sw: MemorySwitches, st: States
             ) -> tuple[dict[str, tuple[int, int, int]], int]:
    """(gradients, activations, loss working set) at each candidate peak, and the host bytes of offload."""
    b, tokens = lay.bytes, lay.tokens
    t = tokens if sw.chunkwise is None else min(sw.chunkwise, tokens)  # tokens one layer's graph holds
    p = per_token(a, b, sw.fused_kernels, sw.attention)
    kept, recomputed, work = block_bytes(p, sw.ac_mode, sw.offload, sw.mlp_tile is not None, sw.seq_tile is not None)
    # The final norm: its saved input and its output (held by the caller through the backward); eager and
    # untiled, an fp32 copy instead of the input.
    final_fwd = t * (2 * p.x if sw.fused_kernels or sw.seq_tile is not None else 4 * a.dim + 2 * p.x)
    h_held = t * p.x  # the final hidden states, alive in the caller until the step ends
    sw.check_checkpoints()
    n_off = a.n_layers - sw.gpu_checkpoint_layers
    stored = -(-n_off // sw.checkpoint_stride) if sw.ac_mode == "full" else n_off  # checkpoints of offloaded layers
    host = stored * t * (p.x if sw.ac_mode == "full" else kept + recomputed) if sw.offload else 0
    # The last gpu_checkpoint_layers checkpoints stay on the GPU until their layer's backward frees them (they are
    # the first layers back-propagated, so none is left at layer 0's backward).
    gpu_ckpt = sw.gpu_checkpoint_layers * t * p.x
    kv_store = _kv_store(a, b, tokens, sw.chunkwise)
    layer_now = t * (kept + recomputed + work) + _tile_work(p, t, sw)  # the layer being back-propagated
    if sw.checkpoint_stride > 1:  # its input re-run from the group's stored one, beside that one
        layer_now += t * p.x
    # Without offload, kept is per stored checkpoint: one per stride layers.
    kept_layers = a.n_layers if sw.offload or sw.checkpoint_stride == 1 else -(-a.n_layers // sw.checkpoint_stride)
    moments = {
        "end of forward (loss)": (0, kept_layers * t * kept + gpu_ckpt + final_fwd + kv_store,
                                  _loss_bytes(a, b, t, p, sw)),
        "backward of the last layer": (st.grad_out, h_held + (kept_layers - 1) * t * kept + gpu_ckpt + layer_now
                                       + kv_store, 0),
        "backward of layer 0": (st.grads, h_held + layer_now + kv_store, 0),
    }
    return moments, host


def _tile_work(p: PerToken, t: int, sw: MemorySwitches) -> int:
    """Per-token tiles (tiled MLP, sequence-tiled blocks) add one tile's full intermediates in backward."""
    if sw.seq_tile is not None:
        return min(sw.seq_tile, t) * (p.norms + p.mlp_saved + 2 * p.gate)
    if sw.mlp_tile is not None:
        return min(sw.mlp_tile, t) * (p.mlp_saved + 2 * p.gate)
    return 0


def _kv_store(a: ModelArgs, b: int, tokens: int, chunkwise: int | None) -> int:
    """Chunk-wise optimization's K/V store (dtype) + fp32 gradient accumulators + the concatenated K/V and
    leaf gradients of the chunk being rebuilt (trainer/chunkwise.py)."""
    if chunkwise is None:
        return 0
    kv = a.n_layers * 2 * a.n_kv_heads * a.head_dim * tokens
    return kv * (b + 4) + kv * 2 * b


def _loss_bytes(a: ModelArgs, b: int, t: int, p: PerToken, sw: MemorySwitches) -> int:
    """The loss working set at the end of the forward."""
    if sw.loss_chunk is None:
        return t * a.vocab_size * (b + 8)  # logits + fp32 copy + fp32 softmax gradient
    c = min(sw.loss_chunk, t)
    # One chunk's logits (dtype) and d-logits cast (dtype), plus with the eager impl their fp32 copy
    # and fp32 softmax (the Triton epilogue overwrites the logits: one buffer); the fp32 weight-gradient
    # accumulator and one fp32 product (addmm with an fp32 out_dtype still allocates the product before
    # adding it: docs/benchmarks.md, the loss under "Results on the H100"); the stored hidden gradient.
    per_logit = {"torch": 2 * b + 8, "compile": 2 * b, "triton": b}[sw.loss_kernel]
    out_params = a.vocab_size * a.dim
    return c * a.vocab_size * per_logit + out_params * (4 + 4) + t * p.x


def _buffers(a: ModelArgs, lay: StepLayout) -> int:
    """RoPE's cos and sin (fp32) and the context-parallel communication buffers."""
    tokens, b = lay.tokens, lay.bytes
    rope = 2 * tokens * a.head_dim * 4
    if lay.cp == 1:
        return rope
    kv_tokens = tokens * 2 * a.n_kv_heads * a.head_dim * b
    match lay.cp_mode:
        case "ring":
            comm = 2 * kv_tokens  # the K/V block being received and the one in use
        case "allgather":
            comm = lay.cp * kv_tokens * 2  # all-gathered K/V of the full sequence and its gradient
        case "ulysses" | "hybrid":
            comm = 2 * tokens * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b
        case _:
            raise ValueError(f"plan_memory: cp_mode {lay.cp_mode!r} is not known; valid: ring, allgather, ulysses, hybrid")
    return rope + comm


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

"""Chunk-wise optimization: SeCO (exact) and SpaCO (sparse, unbiased).

From "Training Long-Context LLMs Efficiently via Chunk-wise Optimization" (Li et al. 2025,
arXiv:2505.16710). The sequence is cut into chunks of `chunk` tokens.

1. Forward, chunk by chunk, under no_grad. Each layer's attention of chunk c sees the keys/values of
   chunks 0..c (causal), so we keep every layer's K/V (after RoPE) in a buffer of the full length; the
   loss is summed on the way. Only K/V survive: 2 x n_kv_heads x head_dim values per token and layer.
2. Backward, chunk by chunk in reverse. Chunk c's graph is rebuilt with the earlier chunks' K/V as leaf
   tensors that require grad; its backward is seeded with its loss and with the gradient that later
   chunks sent to its own K/V, and it produces the gradient of the earlier chunks' K/V, which is added to
   their accumulators. Every path from a loss to a parameter is covered once: exact gradients, with one
   chunk's activations alive at a time (plus the K/V and their fp32 gradient accumulators).

SpaCO (mode="sparse") runs step 2 only for a random subset of chunks. We select each chunk independently
with probability p = keep / n_chunks (`keep` chunks in expectation; capped so p <= 1) and scale a selected
chunk's backward seed - its loss *and* the K/V gradient it received - by 1/p, the compensation factor.
A gradient path that crosses chunks c_0 > c_1 > ... > c_r (loss of c_0, K/V hops down to c_r) is then
weighted by prod 1/p over r+1 independent selections, each of probability p: its expectation is exactly
the SeCO path, so the estimator is unbiased for every path length. (The paper samples a fixed-size
subset with factor n/k; with a fixed size a path through more chunks than `keep` can never be sampled, so
exact unbiasedness needs independent selection.) `max_scale` caps the compensation factor: it raises p to
at least 1/max_scale, which keeps the estimator unbiased and bounds its variance at the cost of more chunks.

The attention backend must accept an AttnMask whose keys cover [earlier chunks ; this chunk] with global
token indices (q_index != k_index): the layer's `attn_fn` is wrapped for the duration of the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longtrain.data.batch import Batch
from longtrain.kernels.attention import AttnMask
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy

CHUNKWISE_MODES = ("exact", "sparse")


@dataclass
class _KVStore:
    """Per-layer K/V of the whole sequence and their gradient accumulators."""

    k: list[Tensor]  # n_layers x (bs, seqlen, n_kv_heads, head_dim), compute dtype
    v: list[Tensor]
    gk: list[Tensor]  # same shapes, fp32: sums of gradients from up to n_chunks later chunks
    gv: list[Tensor]


class _ChunkAttention:
    """Wraps one layer's attention: attends over [stored K/V of earlier chunks ; this chunk's K/V]."""

    def __init__(self, base, store: _KVStore, layer: int):
        self.base, self.store, self.layer = base, store, layer
        self.start = self.end = 0
        self.rebuild = False  # False: the no_grad forward pass; True: rebuilding a chunk's graph
        self.past: tuple[Tensor, Tensor] | None = None  # leaves (requires grad) in the rebuild pass
        self.current: tuple[Tensor, Tensor] | None = None  # this chunk's k, v (graph) in the rebuild pass

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
        s, e = self.start, self.end
        if not self.rebuild:
            # Forward pass: record this chunk's K/V, attend over the stored prefix (no copy).
            self.store.k[self.layer][:, s:e] = k
            self.store.v[self.layer][:, s:e] = v
            return self.base(q, self.store.k[self.layer][:, :e], self.store.v[self.layer][:, :e], mask, scale)
        if not k.requires_grad:
            raise NotImplementedError("chunkwise optimization needs the chunk's K/V in the autograd graph; it does "
                                      "not combine with re-entrant activation checkpointing (activation offload)")
        self.current = (k, v)
        if self.past is None:
            return self.base(q, k, v, mask, scale)
        pk, pv = self.past
        kk = torch.cat([pk, k], dim=1)  # (bs, e, n_kv_heads, head_dim)
        vv = torch.cat([pv, v], dim=1)
        return self.base(q, kk, vv, mask, scale)


def _chunk_mask(index: Tensor, doc_ids: Tensor, s: int, e: int, window: int | None) -> AttnMask:
    return AttnMask(q_index=index[:, s:e], k_index=index[:, :e], q_doc=doc_ids[:, s:e], k_doc=doc_ids[:, :e],
                    window=window, contiguous=False)


def chunkwise_forward_backward(model: nn.Module, batch: Batch, chunk: int, mode: str = "exact", keep: int = 8,
                               loss_normalizer: float = 1.0, generator: torch.Generator | None = None,
                               max_scale: float | None = None, loss_chunk_tokens: int | None = None) -> Tensor:
    """Forward and backward of one batch chunk by chunk; parameter gradients accumulate into `.grad`.

    The gradients are those of `loss_sum / loss_normalizer` (exact for mode="exact", unbiased for "sparse").

    Args:
        model: a longtrain `Transformer` (uses `hidden_states`, `output_weight`, `layers[i].self_attn.attn_fn`).
        batch: one (bs, seqlen) batch; `seq_index` must be None or 0..seqlen-1 (no context parallelism).
        chunk: tokens per chunk (the last chunk may be shorter).
        mode: "exact" (SeCO) or "sparse" (SpaCO).
        keep: expected number of chunks backpropagated in sparse mode.
        loss_normalizer: the caller's global valid-token count (the gradient is of loss_sum / normalizer).
        generator: random source for the sparse selection (seeded for reproducibility).
        max_scale: sparse mode: cap on the compensation factor 1/p (raises p to >= 1/max_scale).
        loss_chunk_tokens: chunk size of the linear + cross-entropy (None: its auto size).

    Returns:
        The fp32 loss sum over valid labels (detached), from the full forward pass.

    Raises:
        ValueError: bad chunk / keep / mode / normalizer / max_scale.
        NotImplementedError: a context-parallel shard (seq_index not 0..seqlen-1).
    """
    match mode:
        case "exact" | "sparse":
            pass
        case _:
            raise ValueError(f"chunkwise mode {mode!r} is not known; valid: {', '.join(CHUNKWISE_MODES)}")
    if chunk < 1:
        raise ValueError(f"chunkwise: chunk must be >= 1 token, got {chunk}")
    if mode == "sparse" and keep < 1:
        raise ValueError(f"chunkwise: keep must be >= 1 chunk in sparse mode, got {keep}")
    if not loss_normalizer > 0:
        raise ValueError(f"chunkwise: loss_normalizer must be > 0, got {loss_normalizer}")
    if max_scale is not None and max_scale < 1:
        raise ValueError(f"chunkwise: max_scale must be >= 1 or None, got {max_scale}")
    bs, seqlen = batch.input_ids.shape
    index = torch.arange(seqlen, device=batch.input_ids.device, dtype=torch.int64).expand(bs, seqlen)
    if batch.seq_index is not None and not torch.equal(batch.seq_index.to(index.device), index):
        raise NotImplementedError("chunkwise optimization runs on whole sequences; it is not combined with "
                                  "context parallelism (set parallel.cp=1 or memory.chunkwise=null)")
    n = -(-seqlen // chunk)
    # Which chunks backpropagate, and with which compensation factor.
    if mode == "exact":
        p, selected = 1.0, [True] * n
    else:
        p = min(1.0, keep / n)
        if max_scale is not None:
            p = max(p, min(1.0, 1.0 / max_scale))
        selected = (torch.rand(n, generator=generator) < p).tolist()
    return _run_chunks(model, batch, chunk, selected, 1.0 / p, 1.0 / p, loss_normalizer, loss_chunk_tokens)


def _run_chunks(model: nn.Module, batch: Batch, chunk: int, selected: list[bool], loss_factor: float,
                kv_factor: float, loss_normalizer: float, loss_chunk_tokens: int | None) -> Tensor:
    """Forward all chunks, then backward the `selected` ones in reverse.

    A selected chunk's loss seed is scaled by `loss_factor` and the K/V gradient it received by `kv_factor`
    (SeCO: both 1; SpaCO: both 1/p, which is what makes every cross-chunk path unbiased).
    """
    ids, labels, pos, docs = batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids
    bs, seqlen = ids.shape
    index = torch.arange(seqlen, device=ids.device, dtype=torch.int64).expand(bs, seqlen)
    bounds = [(s, min(seqlen, s + chunk)) for s in range(0, seqlen, chunk)]
    assert len(bounds) == len(selected), (len(bounds), len(selected))
    window = model.args.sliding_window

    layers = model.layers
    attn0 = layers[0].self_attn
    kv_heads = attn0.k_proj.out_features // attn0.head_dim
    dtype = attn0.k_proj.weight.dtype
    shape = (bs, seqlen, kv_heads, attn0.head_dim)

    def buf(dt):
        return [torch.zeros(shape, dtype=dt, device=ids.device) for _ in layers]

    store = _KVStore(buf(dtype), buf(dtype), buf(torch.float32), buf(torch.float32))
    wrappers = [_ChunkAttention(layer.self_attn.attn_fn, store, i) for i, layer in enumerate(layers)]
    originals = [layer.self_attn.attn_fn for layer in layers]
    for layer, w in zip(layers, wrappers):
        layer.self_attn.attn_fn = w
    try:
        # 1. Forward under no_grad: K/V of every chunk and the loss sum.
        loss_sum = torch.zeros((), dtype=torch.float32, device=ids.device)
        with torch.no_grad():
            for s, e in bounds:
                for w in wrappers:
                    w.start, w.end = s, e
                h = model.hidden_states(ids[:, s:e], pos[:, s:e], mask=_chunk_mask(index, docs, s, e, window))
                loss_sum += linear_cross_entropy(h, model.output_weight, labels[:, s:e], chunk_tokens=loss_chunk_tokens)

        # 2. Backward in reverse, one rebuilt chunk graph at a time.
        for w in wrappers:
            w.rebuild = True
        for c in reversed(range(len(bounds))):
            if not selected[c]:
                continue
            s, e = bounds[c]
            _start_chunk(wrappers, store, s, e)
            with torch.enable_grad():
                h = model.hidden_states(ids[:, s:e], pos[:, s:e], mask=_chunk_mask(index, docs, s, e, window))
                loss_c = linear_cross_entropy(h, model.output_weight, labels[:, s:e], chunk_tokens=loss_chunk_tokens)
                outputs, seeds = [loss_c * (loss_factor / loss_normalizer)], [None]
                for w in wrappers:
                    k_c, v_c = w.current
                    gk, gv = store.gk[w.layer][:, s:e], store.gv[w.layer][:, s:e]
                    # Chunk c's K/V gradient came from later chunks; in sparse mode it is compensated too.
                    outputs += [k_c, v_c]
                    seeds += [(gk * kv_factor).to(k_c.dtype), (gv * kv_factor).to(v_c.dtype)]
                seeds[0] = torch.ones_like(outputs[0])
                torch.autograd.backward(outputs, seeds)
            _end_chunk(wrappers, store, s)
            del h, loss_c, outputs, seeds
    finally:
        for layer, fn in zip(layers, originals):
            layer.self_attn.attn_fn = fn
    return loss_sum.detach()


def _start_chunk(wrappers: list[_ChunkAttention], store: _KVStore, s: int, e: int) -> None:
    """Point every layer's attention at chunk [s, e), with the stored K/V before it as gradient leaves."""
    for w in wrappers:
        w.start, w.end = s, e
        w.current = None
        if s > 0:
            pk = store.k[w.layer][:, :s].detach().requires_grad_(True)  # (bs, s, n_kv_heads, head_dim)
            pv = store.v[w.layer][:, :s].detach().requires_grad_(True)
            w.past = (pk, pv)
        else:
            w.past = None


def _end_chunk(wrappers: list[_ChunkAttention], store: _KVStore, s: int) -> None:
    """Add the K/V gradients the chunk sent to the earlier chunks into the fp32 accumulators; drop its tensors."""
    for w in wrappers:
        if w.past is not None:
            pk, pv = w.past
            if pk.grad is not None:
                store.gk[w.layer][:, :s] += pk.grad.float()
            if pv.grad is not None:
                store.gv[w.layer][:, :s] += pv.grad.float()
        w.past = w.current = None


"""Per-token scoring of a longtrain Transformer: next-token NLL and argmax, without full logits at once.

Every eval task reduces to this: perplexity needs the NLL of each target token, retrieval needs the argmax
at each answer position (teacher forcing; see retrieval.py for why that equals greedy decoding). Logits are
computed in chunks of positions so a long window never holds (seq, vocab) floats at once.

Also here: the check that a length can run with the model's attention backend at all, so a too-long eval
fails before it starts instead of dying in the allocator.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from longtrain.kernels.attention import attention_reference, get_attention_backend
from longtrain.model.decoder import Transformer
from longtrain.parallel.offload import host_memory_available  # the one host-RAM probe (offload's budget too)

LOGIT_CHUNK = 1024  # positions per output-projection chunk: (bs, 1024, vocab) fp32 at a time
# The reference backend holds the (bs, heads, s, s) fp32 scores, the masked copy and the probabilities of one
# layer at once (plus a bool mask): about 3 float copies.
REFERENCE_SCORE_COPIES = 3


def set_eval_attention(model: Transformer, attention: str | None) -> str:
    """Install the named attention backend on every layer (None keeps the model's current one).

    Args:
        model: the model.
        attention: a name known to `longtrain.kernels.attention.get_attention_backend`, or None.

    Returns:
        The name of the backend in use ("reference" when None was given and the model uses the reference).

    Raises:
        ValueError: unknown backend name (the message lists the valid ones).
    """
    if attention is None:
        fn = model.layers[0].self_attn.attn_fn
        return "reference" if fn is attention_reference else getattr(fn, "__name__", type(fn).__name__)
    model.set_attention(get_attention_backend(attention))
    return attention


def _quadratic(model: Transformer, backend: str, device: torch.device) -> bool:
    """Whether this backend materialises the (s, s) score matrix on this device."""
    if model.layers[0].self_attn.attn_fn is attention_reference:
        return True
    # `auto` and eager `flex` pick or fall back to a materialised score matrix on CPU (kernels/attention_auto.py).
    return device.type == "cpu" and backend in ("auto", "flex", "reference")


def available_memory(device: torch.device) -> int:
    """Bytes that an eval forward pass may use on `device` (free GPU memory, or MemAvailable on the host)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory_available()


def max_batch_for_length(model: Transformer, length: int, backend: str, batch_size: int,
                         memory_bytes: int | None = None) -> int:
    """The largest batch (<= batch_size) whose attention fits in memory at `length`.

    Args:
        model: the model (its heads and device count).
        length: sequence length of one row.
        backend: the attention backend's name (set_eval_attention's result).
        batch_size: the batch asked for.
        memory_bytes: memory to plan with; None: what the device has free now.

    Returns:
        A batch size in 1..batch_size.

    Raises:
        ValueError: even one row does not fit (the message gives the need, the memory and the way out).
    """
    device = model.output_weight.device
    if not _quadratic(model, backend, device):
        return batch_size
    memory = available_memory(device) if memory_bytes is None else memory_bytes
    n_heads = model.args.n_heads
    per_row = REFERENCE_SCORE_COPIES * n_heads * length * length * 4 + length * length  # fp32 scores + bool mask
    fit = int(memory * 0.8) // per_row
    if fit < 1:
        raise ValueError(
            f"eval length {length} cannot run with the {backend!r} attention backend on {device.type}: it builds "
            f"the ({n_heads} heads, {length}, {length}) fp32 score matrix, about {per_row / 2**30:.1f} GiB for one "
            f"sequence, and {memory / 2**30:.1f} GiB is available. Use shorter --lengths, or a GPU with a fused "
            f"backend (--attention auto / sdpa_flash / flex) that never materialises the scores.")
    return max(1, min(batch_size, fit))


@torch.no_grad()
def score_tokens(model: Transformer, input_ids: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
    """Next-token NLL and argmax for the predictions made at positions start .. seqlen-2.

    Args:
        model: the model (any attention backend; positions 0..seqlen-1 per row).
        input_ids: (bs, seqlen) int64.
        start: first position whose prediction is wanted (the rest of the sequence is still the context).

    Returns:
        nll: (bs, seqlen - 1 - start) fp32, nll[:, i] = -log p(input_ids[:, start+i+1] | input_ids[:, :start+i+1]).
        pred: (bs, seqlen - 1 - start) int64 argmax of the same distributions.
    """
    bs, seqlen = input_ids.shape
    h = model.hidden_states(input_ids)  # (bs, seqlen, dim)
    weight = model.output_weight
    nll, pred = [], []
    for a in range(start, seqlen - 1, LOGIT_CHUNK):
        b = min(a + LOGIT_CHUNK, seqlen - 1)
        logits = F.linear(h[:, a:b], weight).float()  # (bs, b - a, vocab) fp32: the loss is taken in fp32
        target = input_ids[:, a + 1:b + 1]
        nll.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))  # (bs, b - a)
        pred.append(logits.argmax(-1))
    if not nll:
        empty = torch.zeros(bs, 0, device=input_ids.device)
        return empty, empty.long()
    return torch.cat(nll, 1), torch.cat(pred, 1)

"""Perplexity by context length: sliding windows over documents, and loss by position inside the window.

The standard test that an extended model keeps a low perplexity past its original length (PI, arXiv:2306.15595;
YaRN, arXiv:2309.00071; LongLoRA, arXiv:2309.12307 use the same sliding-window protocol).

Windows. For a length L and a stride S (1 <= S <= L - 1), a document of n >= L tokens is covered by windows of
exactly L tokens starting at 0, S, 2S, ... and one last window ending at n. A window predicts its positions 1..L-1
(its first token has no context inside it); each token is scored once, in the first window that predicts it, so
with S < L - 1 every scored token (but those of the first window) sees at least L - 1 - S tokens of context. The
default S = L - 1 makes consecutive windows share one token, so no token goes unscored (the Hugging Face
perplexity guide's disjoint windows, S = L, skip the first token of each window). The last window is moved back
to end at n and scores only the tokens not yet scored, so every window has exactly L tokens and windows batch.
The first token of a document has no prediction.

Position buckets. Every window also gives the loss at each context size 1..L-1 (all its positions, scored or not);
averaged over windows and grouped into buckets, that is the loss-by-position curve: it keeps falling past the
training length when the model uses the longer context, and rises when positions beyond it confuse the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from longtrain.eval.scoring import max_batch_for_length, score_tokens
from longtrain.model.decoder import Transformer

PACKINGS = ("document", "concat")


@dataclass
class PerplexityResult:
    """Perplexity of one context length."""

    length: int
    stride: int
    nll_sum: float  # summed NLL of the scored tokens (nats)
    tokens: int  # scored tokens
    windows: int
    documents: int  # documents (or streams, with packing="concat") long enough for this length
    bucket_edges: list[int]  # context-size buckets [edges[i], edges[i+1]) (positions inside the window)
    bucket_loss: list[float]  # mean NLL per bucket over all windows

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "ppl": self.ppl}


def sliding_windows(n: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(begin, score_from) of each window over a document of n >= length tokens; windows are [begin, begin+length).

    Tokens at positions score_from .. begin+length-1 are scored in that window (each position >= 1 exactly once).

    Raises:
        ValueError: stride not in 1..length-1, or n < length.
    """
    if not 1 <= stride <= length - 1:
        raise ValueError(f"perplexity stride must be in 1..length-1 ({length - 1}: a window predicts length-1 "
                         f"tokens), got {stride}")
    if n < length:
        raise ValueError(f"a document of {n} tokens is shorter than the window length {length}")
    out: list[tuple[int, int]] = []
    prev_end = 1  # position 0 has no prediction
    begin = 0
    while True:
        begin = min(begin, n - length)
        end = begin + length
        out.append((begin, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            return out
        begin += stride


def bucket_edges(length: int, n_buckets: int) -> list[int]:
    """Evenly spaced context-size bucket edges over positions 1..length-1 (at most length-1 buckets)."""
    n = max(1, min(n_buckets, length - 1))
    edges = sorted({1 + round(i * (length - 1) / n) for i in range(n + 1)})
    return edges


@torch.no_grad()
def perplexity_at_length(model: Transformer, docs: Sequence[Sequence[int]], length: int, stride: int | None = None,
                         batch_size: int = 8, n_buckets: int = 8, max_windows: int | None = None,
                         packing: str = "document", eos_id: int | None = None, backend: str = "reference",
                         ) -> PerplexityResult:
    """Sliding-window perplexity of `model` over tokenized documents at one context length.

    Args:
        model: the model, in eval mode, with the attention backend to use installed.
        docs: token id lists (BOS already prepended when the tokenizer wants it).
        length: window length in tokens.
        stride: window stride (default `length - 1`: windows share one token, each token is predicted with
            0..length-2 tokens of context).
        batch_size: windows per forward pass (lowered when the attention backend would not fit).
        n_buckets: number of context-size buckets of the position curve.
        max_windows: evaluate at most this many windows (the first ones, in document order); None: all.
        packing: "document" (each document alone; shorter ones are skipped) or "concat" (all documents joined
            into one stream, separated by `eos_id`).
        eos_id: separator for packing="concat".
        backend: name of the installed attention backend (for the memory check).

    Returns:
        The PerplexityResult.

    Raises:
        ValueError: bad stride/packing, or no document (stream) has `length` tokens (an empty eval set).
    """
    stride = length - 1 if stride is None else stride
    match packing:
        case "document":
            streams = [list(d) for d in docs]
        case "concat":
            if eos_id is None:
                raise ValueError("perplexity packing='concat' needs the tokenizer's eos_id as the separator")
            stream: list[int] = []
            for d in docs:
                stream += list(d) + [eos_id]
            streams = [stream[:-1]] if stream else []
        case _:
            raise ValueError(f"unknown perplexity packing {packing!r}; valid: {', '.join(PACKINGS)}")
    usable = [s for s in streams if len(s) >= length]
    if not usable:
        longest = max((len(s) for s in streams), default=0)
        what = "documents" if packing == "document" else "the concatenated stream"
        raise ValueError(f"empty perplexity eval set at length {length}: none of {len(streams)} {what} has "
                         f"{length} tokens (longest: {longest}). Give longer documents, shorter lengths, or "
                         f"packing='concat' to join short documents.")
    windows = [(si, b, f) for si, s in enumerate(usable) for b, f in sliding_windows(len(s), length, stride)]
    if max_windows is not None:
        windows = windows[:max_windows]
    bs = max_batch_for_length(model, length, backend, batch_size)
    device = model.output_weight.device
    edges = bucket_edges(length, n_buckets)
    pos_sum = torch.zeros(length - 1, dtype=torch.float64)  # by predicted position 1..length-1
    nll_sum, n_tokens = 0.0, 0
    for i in range(0, len(windows), bs):
        chunk = windows[i:i + bs]
        ids = torch.tensor([usable[si][b:b + length] for si, b, _ in chunk], device=device)  # (bs, length)
        nll, _ = score_tokens(model, ids)  # (bs, length - 1): nll[:, j] is the loss of position j + 1
        nll = nll.double().cpu()
        pos_sum += nll.sum(0)
        for row, (_si, b, score_from) in enumerate(chunk):
            scored = nll[row, score_from - b - 1:]  # positions score_from-b .. length-1 of the window
            nll_sum += float(scored.sum())
            n_tokens += scored.numel()
    pos_mean = pos_sum / len(windows)  # (length - 1,) mean loss at window position 1..length-1
    loss_b = [float(pos_mean[a - 1:b - 1].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return PerplexityResult(length, stride, nll_sum, n_tokens, len(windows), len(usable), edges, loss_b)


def perplexity_by_length(model: Transformer, docs: Sequence[Sequence[int]], lengths: Sequence[int],
                         **kwargs) -> dict[int, PerplexityResult]:
    """`perplexity_at_length` for each length (same keyword arguments; stride defaults to each length).

    Raises:
        ValueError: as perplexity_at_length, naming the first length that has no data.
    """
    return {int(L): perplexity_at_length(model, docs, int(L), **kwargs) for L in lengths}

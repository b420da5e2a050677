"""Retrieval grids: passkey and needle-in-a-haystack accuracy over context lengths x needle depths.

Samples come from `longtrain.data.synthetic` (passkey: Mohtashami & Jaggi 2023, arXiv:2305.16300; multi-key,
multi-value and multi-query needles: RULER, arXiv:2404.06654).

Scoring is teacher-forced: one forward pass over the whole sequence (context + question + answer) and the argmax
at each answer position. A sample counts as correct when every answer token is the argmax. This equals greedy
decoding exactly: greedy decoding emits the first answer token iff it is the argmax given the prompt, and then
(having emitted it) the second iff it is the argmax given prompt + first token, which is what teacher forcing
computes at the next position; by induction all answer tokens match iff greedy decoding reproduces the answer.
It costs one batched forward pass per cell instead of one pass per generated token, and needs no KV cache.
The fraction of correct answer tokens is reported beside it (partial credit, a smoother signal).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from longtrain.data.synthetic import RetrievalSample, needle_sample, passkey_sample
from longtrain.data.tokenizer import Tokenizer
from longtrain.eval.scoring import max_batch_for_length, score_tokens
from longtrain.model.decoder import Transformer

RETRIEVAL_TASKS = ("passkey", "needle", "needle_mv", "needle_mq")


@dataclass
class RetrievalGrid:
    """Accuracy of one task over lengths x depths."""

    task: str
    lengths: list[int]
    depths: list[float]
    samples: int  # per cell
    accuracy: list[list[float]]  # [length][depth] exact-match fraction
    token_accuracy: list[list[float]]  # [length][depth] fraction of answer tokens that are the argmax
    options: dict  # the task's sample options (digits, filler, ...)
    examples: list[dict]  # one shown sample per length: answer text and what the model predicted

    def by_length(self) -> list[float]:
        """Mean accuracy over depths at each length."""
        return [sum(row) / len(row) for row in self.accuracy]

    def to_dict(self) -> dict:
        return {**asdict(self), "by_length": self.by_length()}


def sampler(task: str, tok: Tokenizer, **options) -> Callable[[int, float, random.Random], RetrievalSample]:
    """A function (seq_len, depth, rng) -> RetrievalSample for a retrieval task.

    Args:
        task: passkey | needle (multi-key: 4 keys, one asked) | needle_mv (one key, 4 values) |
            needle_mq (4 keys, 2 asked).
        tok: the tokenizer.
        options: passed to the sample function (e.g. digits, filler for passkey; filler, value_digits for needles).

    Raises:
        ValueError: unknown task.
    """
    match task:
        case "passkey":
            return lambda n, d, rng: passkey_sample(tok, n, d, rng, **options)
        case "needle":
            opts = {"n_keys": 4, "n_values": 1, "n_queries": 1, **options}
        case "needle_mv":
            opts = {"n_keys": 1, "n_values": 4, "n_queries": 1, **options}
        case "needle_mq":
            opts = {"n_keys": 4, "n_values": 1, "n_queries": 2, **options}
        case _:
            raise ValueError(f"unknown retrieval task {task!r}; valid: {', '.join(RETRIEVAL_TASKS)}")
    return lambda n, d, rng: needle_sample(tok, n, d, rng, **opts)


@torch.no_grad()
def score_samples(model: Transformer, samples: Sequence[RetrievalSample]) -> tuple[list[bool], list[float], list[list[int]]]:
    """Teacher-forced scoring of equal-length samples in one batch.

    Returns:
        (exact match per sample, fraction of answer tokens correct per sample, predicted answer ids per sample)
    """
    device = model.output_weight.device
    ids = torch.tensor([s.input_ids for s in samples], device=device)  # (bs, seq_len)
    first = min(s.answer_start for s in samples) - 1  # first position whose prediction is an answer token
    _, pred = score_tokens(model, ids, start=first)  # (bs, seq_len - 1 - first)
    exact, frac, preds = [], [], []
    for row, s in enumerate(samples):
        p = pred[row, s.answer_start - 1 - first:].tolist()
        hits = [a == b for a, b in zip(p, s.answer_ids)]
        exact.append(all(hits))
        frac.append(sum(hits) / len(hits))
        preds.append(p)
    return exact, frac, preds


def retrieval_grid(model: Transformer, tok: Tokenizer, task: str, lengths: Sequence[int], depths: Sequence[float],
                   samples: int, seed: int = 0, batch_size: int = 8, backend: str = "reference",
                   **options) -> RetrievalGrid:
    """Accuracy of `task` at every (length, depth) cell, `samples` sequences per cell.

    The same seed gives the same sequences for every model, so two models are compared on identical inputs.

    Args:
        model: the model, with its attention backend installed.
        tok: the tokenizer the model was trained with.
        task: see `sampler`.
        lengths: context lengths in tokens (each sequence is exactly this long, answer included).
        depths: needle depths in [0, 1].
        samples: sequences per cell (>= 1).
        seed: seed of the samples.
        batch_size: sequences per forward pass (lowered when the attention backend would not fit).
        backend: name of the installed attention backend (for the memory check).
        options: task options (see `sampler`).

    Returns:
        The RetrievalGrid.

    Raises:
        ValueError: empty lengths/depths, samples < 1, a length too long for the backend, or a length too short
            for the task's fixed text (from longtrain.data.synthetic).
    """
    if not lengths or not depths:
        raise ValueError(f"{task}: empty eval grid (lengths={list(lengths)}, depths={list(depths)}); give at "
                         "least one length and one depth")
    if samples < 1:
        raise ValueError(f"{task}: samples per cell must be >= 1, got {samples}")
    make = sampler(task, tok, **options)
    acc, tok_acc, examples = [], [], []
    for li, length in enumerate(lengths):
        bs = max_batch_for_length(model, length, backend, batch_size)
        row_acc, row_tok = [], []
        for di, depth in enumerate(depths):
            rng = random.Random(f"{seed}-{task}-{length}-{di}")
            cell = [make(length, float(depth), rng) for _ in range(samples)]
            exact, frac = [], []
            for i in range(0, len(cell), bs):
                e, f, p = score_samples(model, cell[i:i + bs])
                exact += e
                frac += f
                if li == len(examples) and i == 0:
                    examples.append({"length": length, "depth": float(depth), "answer": cell[0].answer_text,
                                     "predicted": tok.decode(p[0]), "correct": e[0]})
            row_acc.append(sum(exact) / len(exact))
            row_tok.append(sum(frac) / len(frac))
        acc.append(row_acc)
        tok_acc.append(row_tok)
    return RetrievalGrid(task, [int(x) for x in lengths], [float(d) for d in depths], samples, acc, tok_acc,
                         dict(options), examples)

"""Synthetic long-context tasks: offline, tokenizer-exact, reproducible from a seed.

Every task builds a sequence of exactly `seq_len` token ids = context + question + answer, assembled from
separately encoded pieces (so lengths are exact for any tokenizer), with `input_ids[answer_start:] == answer_ids`.
Training uses the whole sequence (`retrieval_batch`); the eval scores or greedily decodes the answer from
`input_ids[:answer_start]`.

Tasks:
* passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300): a number hidden in filler text at a depth;
* multi-key / multi-value needle in a haystack (RULER, arXiv:2404.06654);
* shuffled chunks (Untie-the-Knots, arXiv:2409.04774): a document cut into chunks and shuffled, then restored;
* variable tracking and common-word extraction (RULER): in synthetic_ruler.py, built from this file's pieces.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from longtrain.data.batch import IGNORE_INDEX, Batch
from longtrain.data.corpus import _ADJS, _NAMES, _NOUNS, _VERBS, read_tiny_corpus
from longtrain.data.tokenizer import Tokenizer

FILLERS = ("repeat", "random", "text", "echo")
# The classic passkey filler (Mohtashami & Jaggi 2023).
_REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class RetrievalSample:
    """One synthetic sequence: `input_ids[answer_start:] == answer_ids`, len(input_ids) == seq_len."""

    input_ids: list[int]
    answer_start: int  # index of the first answer token
    answer_ids: list[int]
    depth: float  # where the (first queried) needle sits in the filler, 0.0 = start, 1.0 = end
    task: str = "passkey"
    answer_text: str = ""  # the answer as text (for reports; scoring uses answer_ids)
    meta: dict = field(default_factory=dict)  # task details (keys, labels, ...), for reports


def _check_common(tok: Tokenizer, seq_len: int, depth: float) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def _filler_stream(tok: Tokenizer, kind: str, rng: random.Random) -> Iterator[list[int]]:
    """Endless pieces of filler token ids."""
    match kind:
        case "repeat":
            units = [tok.encode(" " + u) for u in _split_sentences(_REPEAT_FILLER)]
            while True:
                yield from units
        case "random":
            words = _ADJS + _NOUNS + _VERBS + _NAMES
            while True:
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                yield tok.encode(" " + sentence[0].upper() + sentence[1:] + ".")
        case "echo":
            # Two random-word sentences drawn per sample, then repeated: predicting the filler needs copying
            # from the context (an induction head), the same skill as retrieving the key, so a tiny model gets
            # a training signal for it on every filler token, not only on the few answer tokens.
            words = _ADJS + _NOUNS + _VERBS + _NAMES
            units = []
            for _ in range(2):
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
                units.append(tok.encode(" " + sentence[0].upper() + sentence[1:] + "."))
            while True:
                yield from units
        case "text":
            docs = _corpus()
            while True:
                for sentence in _split_sentences(rng.choice(docs)):
                    yield tok.encode(" " + sentence)
        case _:
            raise ValueError(f"unknown filler {kind!r}; valid: {', '.join(FILLERS)}")


_CORPUS: list[str] | None = None


def _corpus() -> list[str]:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = read_tiny_corpus()
    return _CORPUS


def _split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _take(stream: Iterator[list[int]], n: int) -> tuple[list[int], list[int]]:
    """Exactly n filler tokens (the last piece is cut at a token boundary) and the sentence boundaries in them."""
    out: list[int] = []
    bounds = [0]
    while len(out) < n:
        out.extend(next(stream))
        bounds.append(min(len(out), n))
    return out[:n], bounds


def _snap(offset: int, bounds: list[int]) -> int:
    """The sentence boundary nearest to `offset`, so a needle never splits a word or sentence of the filler."""
    return min(bounds, key=lambda b: (abs(b - offset), b))


def _fixed_len_or_raise(task: str, seq_len: int, fixed: int) -> int:
    budget = seq_len - fixed
    if budget < 0:
        raise ValueError(f"{task}: seq_len={seq_len} is shorter than the task's fixed text ({fixed} tokens with "
                         f"this tokenizer); use seq_len >= {fixed}")
    return budget


def _assemble(tok: Tokenizer, task: str, seq_len: int, head: list[int], filler: list[int],
              inserts: list[tuple[int, list[int]]], question: list[int], answer: list[int], depth: float,
              answer_text: str, meta: dict) -> RetrievalSample:
    """bos + head + filler with `inserts` (offset into filler, ids) + question + answer."""
    ids = [tok.bos_id] if tok.add_bos else []
    ids += head
    pos = 0
    for off, piece in sorted(inserts, key=lambda x: x[0]):
        ids += filler[pos:off] + piece
        pos = off
    ids += filler[pos:] + question
    answer_start = len(ids)
    ids += answer
    assert len(ids) == seq_len, (len(ids), seq_len)
    return RetrievalSample(ids, answer_start, list(answer), depth, task, answer_text, meta)


# Passkey wordings: (head, needle, question, answer). `classic` is Mohtashami & Jaggi's; `compact` says the same
# in a few tokens and marks the key with a colon used nowhere else, so short contexts keep most tokens for
# filler. In both, the answer " <key>" starts with a space token, and with a small byte-level vocabulary (the
# builtin tokenizer) that space is its own token, common in the filler: the first digit follows a token that
# does not identify the key, so a model must look two tokens back to find it. `tight` puts the digits right
# after the colon ("key:47."), so one induction head (match the previous token, copy the next) retrieves every
# digit: the CPU demo (recipes/tiny-demo.yaml) learns it with margin instead of at a knife edge (issue 23).
PASSKEY_TEMPLATES = {
    "classic": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.",
                " The pass key is {key}. Remember it. {key} is the pass key.",
                " What is the pass key? The pass key is", " {key}"),
    "compact": ("Find the pass key.", " The pass key: {key}.", " What is the pass key? The pass key:", " {key}"),
    "tight": ("Find the pass key.", " The pass key:{key}.", " What is the pass key? The pass key:", "{key}"),
}


def passkey_sample(tok: Tokenizer, seq_len: int, depth: float, rng: random.Random, digits: int = 5,
                   filler: str = "repeat", template: str = "classic") -> RetrievalSample:
    """A passkey retrieval sequence: a `digits`-long number hidden at `depth` of the filler.

    Args:
        tok: the tokenizer (BOS is prepended when `tok.add_bos`).
        seq_len: exact total length in tokens.
        depth: position of the passkey sentence within the filler (0 = start, 1 = end).
        rng: source of randomness (the passkey and random/text filler).
        digits: number of digits of the passkey.
        template: the wording, a key of PASSKEY_TEMPLATES ("classic", "compact" or "tight").
        filler: "repeat" (the classic grass/sky sentences), "random" (random word sentences), "echo" (two random
                sentences per sample, repeated: filler that is learnt by copying) or "text" (the
            bundled corpus).

    Returns:
        The sample; the answer is " <passkey>" ("<passkey>" for the tight template).

    Raises:
        ValueError: bad depth/digits/filler, or seq_len too short for the fixed text.
    """
    _check_common(tok, seq_len, depth)
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if template not in PASSKEY_TEMPLATES:
        raise ValueError(f"unknown passkey template {template!r}; valid: {', '.join(PASSKEY_TEMPLATES)}")
    key = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))
    head_text, needle_text, question_text, answer_text = PASSKEY_TEMPLATES[template]
    head = tok.encode(head_text)
    needle = tok.encode(needle_text.format(key=key))
    question = tok.encode(question_text)
    answer_text = answer_text.format(key=key)
    answer = tok.encode(answer_text)
    fixed = int(tok.add_bos) + len(head) + len(needle) + len(question) + len(answer)
    budget = _fixed_len_or_raise("passkey", seq_len, fixed)
    fill, bounds = _take(_filler_stream(tok, filler, rng), budget)
    inserts = [(_snap(round(depth * budget), bounds), needle)]
    return _assemble(tok, "passkey", seq_len, head, fill, inserts, question, answer,
                     depth, answer_text, {"passkey": key, "filler": filler})


def _random_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJS)}-{rng.choice(_NOUNS)}"
        if key not in used:
            used.add(key)
            return key


def _random_number(rng: random.Random, digits: int, used: set[str]) -> str:
    while True:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if v not in used:
            used.add(v)
            return v


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def needle_sample(tok: Tokenizer, seq_len: int, depth: float, rng: random.Random, n_keys: int = 4,
                  n_values: int = 1, n_queries: int = 1, filler: str = "text",
                  value_digits: int = 7) -> RetrievalSample:
    """Multi-key / multi-value needle in a haystack (RULER's MK/MV/MQ-NIAH).

    `n_keys` distinct keys are hidden ("One of the special magic numbers for <key> is: <value>."); the first
    `n_queries` of them are asked for, each with `n_values` values; the others are distractors with one value.
    The first queried needle sits at `depth`; every other needle at a random depth.

    Args:
        tok: the tokenizer.
        seq_len: exact total length in tokens.
        depth: depth of the first queried needle (0 = start of the filler, 1 = end).
        rng: source of randomness.
        n_keys: number of distinct keys (>= n_queries).
        n_values: values per queried key.
        n_queries: number of keys asked for.
        filler: as in `passkey_sample`.
        value_digits: digits of each value.

    Returns:
        The sample; the answer lists the values of the queried keys (per key in text order), comma-separated.

    Raises:
        ValueError: bad counts, depth or filler, or seq_len too short.
    """
    _check_common(tok, seq_len, depth)
    if not 1 <= n_queries <= n_keys or n_values < 1:
        raise ValueError(f"needle: need 1 <= n_queries <= n_keys and n_values >= 1, got n_keys={n_keys}, "
                         f"n_values={n_values}, n_queries={n_queries}")
    used_keys: set[str] = set()
    used_values: set[str] = set()
    keys = [_random_key(rng, used_keys) for _ in range(n_keys)]
    needles: list[tuple[float, str, str]] = []  # (depth, key, value)
    for qi, key in enumerate(keys):
        for vi in range(n_values if qi < n_queries else 1):
            d = depth if (qi == 0 and vi == 0) else rng.random()
            needles.append((d, key, _random_number(rng, value_digits, used_values)))
    needles.sort(key=lambda x: x[0])  # stable: the first queried needle keeps its place among equal depths
    queried = keys[:n_queries]
    answer_values = [v for k in queried for (_, nk, v) in needles if nk == k]
    head = tok.encode("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "them. I will quiz you about the numbers afterwards.")
    needle_ids = [(d, tok.encode(f" One of the special magic numbers for {k} is: {v}.")) for d, k, v in needles]
    what = _join(queried)
    question = tok.encode(f" What are all the special magic numbers for {what} mentioned in the provided text? "
                          f"The special magic numbers for {what} mentioned in the provided text are")
    answer_text = " " + ", ".join(answer_values)
    answer = tok.encode(answer_text)
    fixed = (int(tok.add_bos) + len(head) + sum(len(n) for _, n in needle_ids) + len(question) + len(answer))
    budget = _fixed_len_or_raise("needle", seq_len, fixed)
    fill, bounds = _take(_filler_stream(tok, filler, rng), budget)
    inserts = [(_snap(round(d * budget), bounds), ids) for d, ids in needle_ids]
    return _assemble(tok, "needle", seq_len, head, fill, inserts, question, answer, depth, answer_text,
                     {"keys": keys, "queried": queried, "values": answer_values, "filler": filler})


def shuffled_chunks_sample(tok: Tokenizer, seq_len: int, rng: random.Random, n_chunks: int = 8,
                           task: str = "restore", text: str | None = None) -> RetrievalSample:
    """Untie-the-Knots style sequence (arXiv:2409.04774): a document cut into labelled chunks, shuffled.

    Context: "[<label>]" + chunk for each chunk in shuffled order (labels are distinct random 2-digit numbers).
    `task="restore"`: the answer is the document in its original order (cut to fit), so the model has to find
    each next chunk in the knotted context. `task="order"`: the answer is the labels in original order.

    Args:
        tok: the tokenizer.
        seq_len: exact total length in tokens.
        rng: source of randomness (text choice, labels, shuffle).
        n_chunks: number of chunks (2..90).
        task: "restore" or "order".
        text: the document to cut; None draws documents from the bundled corpus.

    Returns:
        The sample (depth is 0.0: not used by this task).

    Raises:
        ValueError: bad n_chunks/task, too short seq_len, or `text` too short for the length.
    """
    if not 2 <= n_chunks <= 90:
        raise ValueError(f"shuffled_chunks: n_chunks must be in 2..90, got {n_chunks}")
    labels = rng.sample(range(10, 100), n_chunks)
    order = list(range(n_chunks))
    rng.shuffle(order)
    head = tok.encode("Below are the chunks of a document in shuffled order, each after its label.")
    headers = [tok.encode(f"\n[{labels[i]}]") for i in order]
    match task:
        case "restore":
            question = tok.encode("\nThe document in its original order:")
            answer_text = ""  # filled below
            label_answer: list[int] = []
        case "order":
            question = tok.encode("\nThe labels of the chunks in their original order are")
            answer_text = " " + " ".join(str(lab) for lab in labels)
            label_answer = tok.encode(answer_text)
        case _:
            raise ValueError(f"shuffled_chunks: unknown task {task!r}; valid: restore, order")
    fixed = int(tok.add_bos) + len(head) + sum(len(h) for h in headers) + len(question) + len(label_answer)
    budget = _fixed_len_or_raise("shuffled_chunks", seq_len, fixed + n_chunks * (2 if task == "restore" else 1))
    budget += n_chunks * (2 if task == "restore" else 1)
    # restore: the document appears twice (shuffled, then in order); the answer may be one token shorter.
    doc_len = -(-budget // 2) if task == "restore" else budget
    if text is None:
        doc = _take(_filler_stream(tok, "text", rng), doc_len)[0]
    else:
        doc = tok.encode(text)
        if len(doc) < doc_len:
            raise ValueError(f"shuffled_chunks: text has {len(doc)} tokens, needs {doc_len} for seq_len={seq_len}")
        doc = doc[:doc_len]
    bounds = [round(i * doc_len / n_chunks) for i in range(n_chunks + 1)]
    chunks = [doc[bounds[i]:bounds[i + 1]] for i in range(n_chunks)]
    context = [t for h, i in zip(headers, order) for t in h + chunks[i]]
    if task == "restore":
        answer = doc[: budget - doc_len]
        answer_text = tok.decode(answer)
    else:
        answer = label_answer
    return _assemble(tok, f"shuffled_chunks_{task}", seq_len, head + context, [], [], question, answer, 0.0,
                     answer_text, {"labels": labels, "order": order})


def retrieval_batch(samples: Sequence[RetrievalSample], loss_on: str = "answer") -> Batch:
    """Stack samples of one length into a training Batch (one document per row, positions 0..seq_len-1).

    Args:
        samples: samples of equal length.
        loss_on: "answer" (labels only on the answer tokens) or "all" (every next-token prediction).

    Returns:
        A Batch of shape (len(samples), seq_len) with labels pre-shifted (labels[t] = input_ids[t+1]).

    Raises:
        ValueError: no samples, unequal lengths, or an unknown `loss_on`.
    """
    if not samples:
        raise ValueError("retrieval_batch: no samples")
    lengths = {len(s.input_ids) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"retrieval_batch: samples have different lengths {sorted(lengths)}; use one seq_len")
    seq_len = lengths.pop()
    input_ids = torch.tensor([s.input_ids for s in samples], dtype=torch.int64)  # (bs, seq_len)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    match loss_on:
        case "all":
            pass
        case "answer":
            # labels[t] predicts token t+1: keep t+1 >= answer_start, i.e. t >= answer_start - 1.
            t = torch.arange(seq_len)
            starts = torch.tensor([s.answer_start for s in samples])[:, None]  # (bs, 1)
            labels = torch.where(t[None, :] >= starts - 1, labels, torch.full_like(labels, IGNORE_INDEX))
        case _:
            raise ValueError(f"retrieval_batch: unknown loss_on {loss_on!r}; valid: answer, all")
    positions = torch.arange(seq_len, dtype=torch.int64).expand_as(input_ids).clone()
    return Batch(input_ids=input_ids, labels=labels, position_ids=positions,
                 doc_ids=torch.zeros_like(input_ids))

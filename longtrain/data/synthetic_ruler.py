"""RULER's variable tracking and common-word extraction (arXiv:2404.06654), assembled with synthetic.py's pieces
(exact lengths for any tokenizer, `input_ids[answer_start:] == answer_ids`)."""

from __future__ import annotations

import random

from longtrain.data.synthetic import (RetrievalSample, _assemble, _check_common, _filler_stream, _fixed_len_or_raise,
                                      _random_number, _snap, _take)
from longtrain.data.tokenizer import Tokenizer


def _pseudo_words(rng: random.Random, n: int, used: set[str]) -> list[str]:
    """n distinct pronounceable made-up words (an endless supply, unlike a word list)."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    out = []
    while len(out) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if w not in used:
            used.add(w)
            out.append(w)
    return out


def variable_tracking_sample(tok: Tokenizer, seq_len: int, depth: float, rng: random.Random, n_chains: int = 1,
                             n_hops: int = 4, filler: str = "repeat") -> RetrievalSample:
    """RULER variable tracking: chains "VAR A = 12345", "VAR B = VAR A", ... hidden in filler.

    The first chain is queried; its first assignment sits at `depth`, its later hops at random depths after it
    (so every assignment follows the one it copies). Other chains are distractors with their own values.

    Args:
        tok: the tokenizer.
        seq_len: exact total length in tokens.
        depth: depth of the queried chain's first assignment.
        rng: source of randomness.
        n_chains: number of chains (the first is queried).
        n_hops: assignments after the first in each chain.
        filler: as in `passkey_sample`.

    Returns:
        The sample; the answer is the queried chain's variable names in order, space-separated.

    Raises:
        ValueError: bad counts, depth or filler, or seq_len too short.
    """
    _check_common(tok, seq_len, depth)
    if n_chains < 1 or n_hops < 0:
        raise ValueError(f"variable_tracking: need n_chains >= 1 and n_hops >= 0, got {n_chains}, {n_hops}")
    used_names: set[str] = set()
    used_values: set[str] = set()
    statements: list[tuple[float, list[int]]] = []
    chains = []
    for c in range(n_chains):
        names = []
        while len(names) < n_hops + 1:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in used_names:
                used_names.add(name)
                names.append(name)
        value = _random_number(rng, 5, used_values)
        start = depth if c == 0 else rng.random()
        depths = [start] + sorted(start + (1 - start) * rng.random() for _ in range(n_hops))
        texts = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        statements += [(d, tok.encode(t)) for d, t in zip(depths, texts)]
        chains.append((names, value))
    names, value = chains[0]
    head = tok.encode("Memorize and track the chain(s) of variable assignment hidden in the following text.")
    question = tok.encode(f" Question: Find all variables that are assigned the value {value} in the text above. "
                          f"Answer: the variables assigned the value {value} are")
    answer_text = " " + " ".join(names)
    answer = tok.encode(answer_text)
    fixed = int(tok.add_bos) + len(head) + sum(len(x) for _, x in statements) + len(question) + len(answer)
    budget = _fixed_len_or_raise("variable_tracking", seq_len, fixed)
    fill, bounds = _take(_filler_stream(tok, filler, rng), budget)
    inserts = [(_snap(round(d * budget), bounds), ids) for d, ids in statements]
    # sorted() in _assemble is stable and offsets are monotone within a chain: hops keep their order
    return _assemble(tok, "variable_tracking", seq_len, head, fill, inserts, question, answer, depth, answer_text,
                     {"chains": chains})


def common_words_sample(tok: Tokenizer, seq_len: int, rng: random.Random, n_common: int = 10,
                        common_freq: int = 30, rare_freq: int = 3) -> RetrievalSample:
    """RULER common-words extraction: a numbered list of words; name the `n_common` most frequent ones.

    Common words appear `common_freq` times each, rare ones `rare_freq` times; as many rare words as fit are
    added, and the few tokens left over are filler before the list (so the counts stay exact).

    Args:
        tok: the tokenizer.
        seq_len: exact total length in tokens.
        rng: source of randomness.
        n_common: number of words to name.
        common_freq: occurrences of each common word.
        rare_freq: occurrences of each rare word (< common_freq).

    Returns:
        The sample (depth 0.0, unused); the answer lists the common words, comma-separated.

    Raises:
        ValueError: bad counts, or seq_len too short for the common words alone.
    """
    if not 0 < rare_freq < common_freq or n_common < 1:
        raise ValueError(f"common_words: need n_common >= 1 and 0 < rare_freq < common_freq, got {n_common}, "
                         f"{rare_freq}, {common_freq}")
    used: set[str] = set()
    common = _pseudo_words(rng, n_common, used)
    rare_pool = _pseudo_words(rng, max(8, seq_len // max(1, 2 * rare_freq)), used)
    shuffle_seed = rng.random()
    head = tok.encode("Below is a numbered list of words. In these words, some appear more often than others. "
                      "Memorize the ones that appear most often.")
    question = tok.encode(f" Question: What are the {n_common} most common words in the above list? Answer: the "
                          f"top {n_common} words that appear most often in the list are")

    def build(n_rare: int) -> tuple[list[int], list[str]]:
        words = common * common_freq + rare_pool[:n_rare] * rare_freq
        random.Random(shuffle_seed).shuffle(words)
        return [t for i, w in enumerate(words) for t in tok.encode(f" {i + 1}. {w}")], words

    # The answer names the common words in the order they were drawn (random): its length does not depend on
    # the list, so the budget below is exact.
    answer_text = " " + ", ".join(common)
    answer = tok.encode(answer_text)
    fixed = int(tok.add_bos) + len(head) + len(question) + len(answer)
    if fixed + len(build(0)[0]) > seq_len:
        raise ValueError(f"common_words: seq_len={seq_len} is too short for {n_common} words x {common_freq} "
                         f"({fixed + len(build(0)[0])} tokens); lower common_freq or raise seq_len")
    lo, hi = 0, len(rare_pool)  # the most rare words that fit: binary search on the encoded list
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fixed + len(build(mid)[0]) <= seq_len:
            lo = mid
        else:
            hi = mid - 1
    listed, words = build(lo)
    pad, _ = _take(_filler_stream(tok, "repeat", rng), seq_len - fixed - len(listed))
    return _assemble(tok, "common_words", seq_len, head + pad + listed, [], [], question, answer, 0.0, answer_text,
                     {"common": common, "n_rare": lo, "words": words})

"""Synthetic long-context tasks: exact lengths, answers where they claim to be, reproducible, loud on bad input."""

from __future__ import annotations

import random

import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX
from longtrain.data.synthetic import needle_sample, passkey_sample, retrieval_batch, shuffled_chunks_sample
from longtrain.data.synthetic_ruler import common_words_sample, variable_tracking_sample
from longtrain.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("builtin", cache_dir=tmp_path_factory.mktemp("cache"))


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


@pytest.mark.parametrize("filler", ["repeat", "random", "text"])
@pytest.mark.parametrize("seq_len", [150, 257, 1000])
def test_passkey_exact(tok, filler, seq_len):
    for depth in [0.0, 0.3, 1.0]:
        s = passkey_sample(tok, seq_len, depth, random.Random(7), digits=6, filler=filler)
        assert len(s.input_ids) == seq_len and s.input_ids[0] == tok.bos_id
        assert s.input_ids[s.answer_start:] == s.answer_ids == tok.encode(" " + s.meta["passkey"])
        key = s.meta["passkey"]
        assert len(key) == 6 and key.isdigit()
        prompt = tok.decode(s.input_ids[:s.answer_start])
        assert prompt.count(key) == 2 and prompt.endswith("The pass key is")
        assert all(0 <= i < tok.vocab_size for i in s.input_ids)


def test_passkey_depth_and_reproducibility(tok):
    seq_len = 800
    starts = []
    for depth in [0.0, 0.25, 0.5, 0.75, 1.0]:
        s = passkey_sample(tok, seq_len, depth, random.Random(3))
        needle = tok.encode(f" The pass key is {s.meta['passkey']}.")
        starts.append(_find(s.input_ids, needle))
    assert starts == sorted(starts) and len(set(starts)) == 5
    head_len = len(tok.encode("There is an important info hidden inside a lot of irrelevant text. Find it and "
                              "memorize it. I will quiz you about the important information there.")) + 1
    assert starts[0] == head_len  # depth 0: right after the instruction
    filler_len = seq_len - len(passkey_sample(tok, seq_len, 0.5, random.Random(3)).answer_ids)
    assert all(abs(st - head_len - d * (filler_len - head_len)) < 0.1 * seq_len
               for st, d in zip(starts, [0.0, 0.25, 0.5, 0.75]))
    a = passkey_sample(tok, 500, 0.5, random.Random(11), filler="text")
    b = passkey_sample(tok, 500, 0.5, random.Random(11), filler="text")
    c = passkey_sample(tok, 500, 0.5, random.Random(12), filler="text")
    assert a == b and a.input_ids != c.input_ids


def test_needle_multikey_multivalue(tok):
    s = needle_sample(tok, 1500, 0.4, random.Random(5), n_keys=6, n_values=3, n_queries=2)
    assert len(s.input_ids) == 1500 and s.input_ids[s.answer_start:] == s.answer_ids
    keys, queried, values = s.meta["keys"], s.meta["queried"], s.meta["values"]
    assert len(set(keys)) == 6 and queried == keys[:2] and len(values) == 6 == len(set(values))
    prompt = tok.decode(s.input_ids[:s.answer_start])
    for k in keys:  # queried keys carry 3 values, distractors 1
        assert prompt.count(f"magic numbers for {k} is:") == (3 if k in queried else 1)
    for v in values:
        assert f"magic numbers for " in prompt and prompt.count(v) == 1
    assert tok.decode(s.answer_ids) == " " + ", ".join(values)
    # values of each queried key are listed in text order
    for k in queried:
        own = [v for v in values if f"{k} is: {v}." in prompt]
        assert own == sorted(own, key=prompt.index)
    with pytest.raises(ValueError, match="n_queries <= n_keys"):
        needle_sample(tok, 1500, 0.4, random.Random(5), n_keys=2, n_queries=3)


@pytest.mark.parametrize("seq_len", [300, 301])
def test_shuffled_chunks(tok, seq_len):
    text = " ".join(f"Sentence number {i} of the test document." for i in range(200))
    doc = tok.encode(text)
    s = shuffled_chunks_sample(tok, seq_len, random.Random(2), n_chunks=5, task="restore", text=text)
    assert len(s.input_ids) == seq_len and s.input_ids[s.answer_start:] == s.answer_ids
    assert s.answer_ids == doc[:len(s.answer_ids)] and len(s.answer_ids) > (seq_len - 120) // 2
    assert sorted(s.meta["order"]) == list(range(5)) and s.meta["order"] != list(range(5))
    o = shuffled_chunks_sample(tok, seq_len, random.Random(2), n_chunks=5, task="order")
    assert len(o.input_ids) == seq_len
    assert tok.decode(o.answer_ids) == " " + " ".join(map(str, o.meta["labels"]))
    # every chunk of the context follows its label, and the chunks in label order give back the document
    ctx = o.input_ids[:o.answer_start]
    positions = [_find(ctx, tok.encode(f"\n[{lab}]")) for lab in o.meta["labels"]]
    assert all(p > 0 for p in positions)
    assert [positions.index(p) for p in sorted(positions)] == o.meta["order"]
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        shuffled_chunks_sample(tok, seq_len, random.Random(2), task="sort")
    with pytest.raises(ValueError, match="text has"):
        shuffled_chunks_sample(tok, seq_len, random.Random(2), text="too short")


def test_retrieval_batch(tok):
    samples = [passkey_sample(tok, 200, d, random.Random(i)) for i, d in enumerate([0.1, 0.9])]
    b = retrieval_batch(samples, loss_on="all")
    ids = torch.tensor([s.input_ids for s in samples])
    assert b.input_ids.shape == (2, 200) and torch.equal(b.input_ids, ids)
    assert torch.equal(b.labels[:, :-1], ids[:, 1:]) and (b.labels[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(b.position_ids, torch.arange(200).expand(2, 200)) and (b.doc_ids == 0).all()
    a = retrieval_batch(samples, loss_on="answer")
    for row, s in enumerate(samples):
        kept = (a.labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert kept == list(range(s.answer_start - 1, 199))
        assert a.labels[row, kept].tolist() == s.answer_ids
    with pytest.raises(ValueError, match="different lengths"):
        retrieval_batch([samples[0], passkey_sample(tok, 201, 0.5, random.Random(0))])
    with pytest.raises(ValueError, match="unknown loss_on 'some'"):
        retrieval_batch(samples, loss_on="some")


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="seq_len=20 is shorter"):
        passkey_sample(tok, 20, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tok, 200, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="unknown filler 'lorem'.*repeat"):
        passkey_sample(tok, 200, 0.5, random.Random(0), filler="lorem")


@pytest.mark.parametrize("seq_len", [400, 1001])
def test_variable_tracking(tok, seq_len):
    s = variable_tracking_sample(tok, seq_len, 0.1, random.Random(seq_len), n_chains=2, n_hops=3)
    assert len(s.input_ids) == seq_len and s.input_ids[s.answer_start:] == s.answer_ids
    (names, value), (other_names, other_value) = s.meta["chains"]
    prompt = tok.decode(s.input_ids[:s.answer_start])
    assert tok.decode(s.answer_ids) == " " + " ".join(names) and value != other_value
    # each hop copies a variable assigned before it
    at = [prompt.index(f"VAR {names[0]} = {value}.")] + [prompt.index(f"VAR {b} = VAR {a}.")
                                                         for a, b in zip(names, names[1:])]
    assert at == sorted(at) and all(n not in names for n in other_names)


@pytest.mark.parametrize("seq_len", [700, 2000])
def test_common_words(tok, seq_len):
    s = common_words_sample(tok, seq_len, random.Random(4), n_common=4, common_freq=8, rare_freq=3)
    assert len(s.input_ids) == seq_len and s.input_ids[s.answer_start:] == s.answer_ids
    words, common = s.meta["words"], s.meta["common"]
    counts = {w: words.count(w) for w in words}
    assert all(counts[w] == 8 for w in common) and all(c == 3 for w, c in counts.items() if w not in common)
    assert s.meta["n_rare"] > 0 and tok.decode(s.answer_ids) == " " + ", ".join(common)
    listed = tok.decode(s.input_ids[:s.answer_start])
    assert f" {len(words)}. {words[-1]} Question:" in listed  # the whole list is there, numbered
    with pytest.raises(ValueError, match="too short for 4 words x 30"):
        common_words_sample(tok, 300, random.Random(4), n_common=4, common_freq=30)


@pytest.mark.parametrize("filler", ["echo", "repeat"])
def test_compact_passkey_marks_the_key_once(tok, filler):
    """The compact wording (the CPU demo's) puts the key after the only ':' before the question, so one
    induction step finds it; the echo filler repeats per-sample sentences, so it differs between samples."""
    colon = tok.encode(":")
    assert len(colon) == 1
    samples = [passkey_sample(tok, 128, d, random.Random(s), digits=3, filler=filler, template="compact")
               for s, d in ((0, 0.0), (1, 0.5), (2, 1.0))]
    for s in samples:
        assert len(s.input_ids) == 128 and s.input_ids[s.answer_start:] == s.answer_ids
        before_question = s.input_ids[: s.answer_start - 1]  # the question ends with ':'
        assert s.input_ids[s.answer_start - 1] == colon[0] and before_question.count(colon[0]) == 1
        key_at = before_question.index(colon[0]) + 1
        assert before_question[key_at:key_at + len(s.answer_ids)] == s.answer_ids
    tails = [passkey_sample(tok, 128, 1.0, random.Random(seed), digits=3, filler=filler, template="compact")
             for seed in range(3)]  # key at the end: the first 40 tokens are head + filler only
    assert len({tuple(s.input_ids[8:40]) for s in tails}) == (3 if filler == "echo" else 1)


def test_unknown_passkey_template(tok):
    with pytest.raises(ValueError, match="unknown passkey template 'short'; valid: classic, compact, tight"):
        passkey_sample(tok, 256, 0.5, random.Random(0), template="short")

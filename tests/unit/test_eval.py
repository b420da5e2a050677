"""longtrain eval: perplexity parity with transformers through the command, sliding windows, reports, bad input."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from longtrain.data.corpus import read_tiny_corpus
from longtrain.data.tokenizer import load_tokenizer
from longtrain.eval import command, evaluate, load_for_eval
from longtrain.eval.perplexity import sliding_windows
from longtrain.eval.report import summary_table, write_report

# Both sides compute in fp32 with the same weights; they differ only in summation order (~1e-6 relative
# observed). The issue asks 1e-3; we hold the tighter bound.
PPL_RTOL = 1e-4


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    return parser.parse_args(["eval", *argv])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A tiny random Llama saved by transformers, with the builtin tokenizer beside it."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    tok.save(path)
    return path, model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Three documents of different lengths (joined tiny-corpus texts), as a jsonl `datasets` reads."""
    texts = read_tiny_corpus()
    docs = ["\n".join(texts[0:4]), "\n".join(texts[4:10]), "\n".join(texts[10:13])]
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    return path, docs


@torch.no_grad()
def _hf_perplexity(model: LlamaForCausalLM, docs: list[list[int]], length: int) -> tuple[float, int]:
    """Direct transformers computation: windows of `length` tokens every `length - 1` tokens (consecutive windows
    share one token, so each token is predicted once), the last one ending at the document's end and scoring only
    the tokens not scored yet."""
    nll, n = 0.0, 0
    for ids in docs:
        if len(ids) < length:
            continue
        scored_to = 1
        begins = list(range(0, len(ids) - length + 1, length - 1))
        if begins[-1] + length < len(ids):
            begins.append(len(ids) - length)
        for b in begins:
            x = torch.tensor([ids[b:b + length]])
            logits = model(x).logits[0, :-1].float()
            losses = F.cross_entropy(logits, x[0, 1:], reduction="none")  # losses[j] = position b + j + 1
            keep = losses[scored_to - b - 1:]
            nll += float(keep.sum())
            n += keep.numel()
            scored_to = b + length
    return nll, n


def test_perplexity_matches_transformers_through_command(hf_dir, data_file, tok, tmp_path, capsys):
    path, hf_model = hf_dir
    data, texts = data_file
    out = tmp_path / "report"
    rc = command.run(_parse([str(path), "--lengths", "64,128", "--tasks", "perplexity", "--data", str(data),
                             "--text-field", "body", "--out", str(out), "--batch-size", "3"]))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    docs = [[tok.bos_id] + tok.encode(t) for t in texts]
    for L in (64, 128):
        nll, n = _hf_perplexity(hf_model, docs, L)
        got = res["perplexity"][str(L)]
        assert got["tokens"] == n == sum(len(d) - 1 for d in docs if len(d) >= L)
        assert math.isclose(got["ppl"], math.exp(nll / n), rel_tol=PPL_RTOL), (L, got["ppl"], math.exp(nll / n))
    assert (out / "perplexity.png").stat().st_size > 1000
    assert "perplexity" in (out / "report.md").read_text()
    assert "| 128 |" in capsys.readouterr().out


def test_sliding_windows_score_every_token_once():
    for n, L, s in [(10, 4, 3), (10, 4, 2), (11, 4, 1), (4, 4, 2), (100, 32, 7), (100, 32, 31)]:
        scored = []
        for begin, frm in sliding_windows(n, L, s):
            assert 0 <= begin and begin + L <= n and begin < frm <= begin + L
            scored += range(frm, begin + L)
        assert scored == list(range(1, n)), (n, L, s)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 4)


def test_stride_gives_more_context_and_buckets(hf_dir, tok):
    path, _ = hf_dir
    model, tok2, _ = load_for_eval(path)
    assert tok2.encode("The pass key is 123.") == tok.encode("The pass key is 123.")
    text = "\n".join(read_tiny_corpus()[:6])
    r1 = evaluate(model, tok2, [64], tasks=["perplexity"], data=[text])["perplexity"]["64"]
    r2 = evaluate(model, tok2, [64], tasks=["perplexity"], data=[text], stride=16)["perplexity"]["64"]
    assert r1["tokens"] == r2["tokens"]  # the same tokens, each once ...
    assert r2["windows"] > r1["windows"]  # ... from more, overlapping windows
    assert r1["bucket_edges"][0] == 1 and r1["bucket_edges"][-1] == 64
    assert len(r1["bucket_loss"]) == len(r1["bucket_edges"]) - 1


def test_passkey_grid_and_comparison_report(hf_dir, tmp_path):
    path, _ = hf_dir
    rc = command.run(_parse([str(path), "--lengths", "352,384", "--tasks", "passkey,needle", "--depths", "0,1",
                             "--samples", "2", "--compare", str(path), "--name", "a", "--compare-name", "b",
                             "--digits", "3", "--out", str(tmp_path / "cmp")]))
    assert rc == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["name"] for r in res] == ["a", "b"]
    # Same seed, same weights: identical grids (the comparison scores both models on identical inputs).
    assert res[0]["retrieval"] == res[1]["retrieval"]
    g = res[0]["retrieval"]["passkey"]
    assert g["lengths"] == [352, 384] and g["depths"] == [0.0, 1.0] and len(g["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for row in g["accuracy"] for a in row)
    table = summary_table(res, "passkey")
    assert "change" in table and "+0 pt" in table
    for png in ("passkey_heatmap.png", "needle_heatmap.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 1000


def test_load_longtrain_checkpoint(tmp_path):
    """A checkpoint written by the trainer's save_checkpoint loads with its args, weights and tokenizer."""
    from dataclasses import asdict

    from longtrain import Transformer
    from longtrain.model.args import model_flavor
    from longtrain.checkpoint.store import CheckpointMeta, rng_state, save_checkpoint
    from longtrain.trainer.engine import TorchEngine

    args = model_flavor("debug", rope={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    model = Transformer(args)
    model.init_weights(seed=3)
    opt = torch.optim.AdamW(model.parameters())
    meta = CheckpointMeta(step=5, stage=1, stage_step=0, model_args=asdict(args), lora=None, tokenizer="builtin",
                          world_size=1)
    save_checkpoint(tmp_path / "checkpoints", meta, TorchEngine(model, opt), {"rng": rng_state()}, 0, "name: t\n",
                    keep_last=1)
    loaded, tok, desc = load_for_eval(tmp_path)  # the run directory
    assert "step 5" in desc and tok.name == "builtin" and loaded.args.rope == args.rope
    ids = torch.randint(0, args.vocab_size, (1, 16))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)  # same weights, same fp32 math


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_model_dir(tmp_path, capsys):
    assert command.run(_parse([str(tmp_path / "nope"), "--lengths", "64"])) == 2  # the CLI: a message, no traceback
    assert "error: model path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):
        command.run_eval(_parse([str(tmp_path / "nope"), "--lengths", "64"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face directory"):
        load_for_eval(tmp_path / "empty")


def test_empty_eval_set(hf_dir, tmp_path):
    path, _ = hf_dir
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is an empty file"):
        command.run_eval(_parse([str(path), "--lengths", "64", "--tasks", "perplexity", "--data", str(empty)]))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "A short one."}) + "\n")
    with pytest.raises(ValueError, match="empty perplexity eval set at length 64: none of 1 documents"):
        command.run_eval(_parse([str(path), "--lengths", "64", "--tasks", "perplexity", "--data", str(short)]))
    with pytest.raises(ValueError, match="no column 'body'"):
        command.run_eval(_parse([str(path), "--lengths", "64", "--tasks", "perplexity", "--data", str(short),
                            "--text-field", "body"]))


def test_length_too_long_for_backend(hf_dir):
    path, _ = hf_dir
    model, tok, _ = load_for_eval(path)
    # The reference backend materialises (heads, L, L) fp32 scores: 4 heads at 2**20 tokens need ~48 TiB.
    with pytest.raises(ValueError, match="cannot run with the 'reference' attention backend"):
        evaluate(model, tok, [2**20], tasks=["passkey"], samples=1, depths=[0.5])


def test_bad_task_and_options(hf_dir):
    path, _ = hf_dir
    with pytest.raises(ValueError, match="unknown task 'pasky'; valid: perplexity, passkey"):
        command.run_eval(_parse([str(path), "--lengths", "64", "--tasks", "pasky"]))
    with pytest.raises(ValueError, match="--rope is not valid JSON"):
        command.run_eval(_parse([str(path), "--lengths", "64", "--rope", "{linear"]))
    model, tok, _ = load_for_eval(path)
    with pytest.raises(ValueError, match="shorter than the task's fixed text"):
        evaluate(model, tok, [32], tasks=["passkey"], samples=1)
    with pytest.raises(ValueError, match="no results"):
        write_report([], "unused")


# ---------------------------------------------------------------------------------------------------------------
# A trained model scores high, a random one at chance

PASSKEY_LEN = 144  # the passkey task's fixed text is 131 tokens with the builtin tokenizer
FIXED_KEY_SEED = 123  # passkey_sample with a fresh Random(123) always draws the same key


def _fixed_key_samples(tok, depths):
    import random

    from longtrain.data.synthetic import passkey_sample

    return [passkey_sample(tok, PASSKEY_LEN, d, random.Random(FIXED_KEY_SEED), digits=3) for d in depths]


def _train_fixed_key(tok, steps: int, seed: int = 0):
    """A tiny Llama trained on passkey sequences that all hide one key, at random depths (full next-token loss).

    Learning to *retrieve* random keys takes this model far more steps than a unit test may spend (see
    docs/eval.md "A real report"); a fixed key is learned in a few dozen steps and is enough to
    check the eval end to end: alignment of answer positions, teacher-forced argmax, exact match, and that
    a grid of random keys is not fooled by a memorised one.
    """
    import random

    from longtrain import ModelArgs, Transformer
    from longtrain.data.synthetic import retrieval_batch

    args = ModelArgs(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                     intermediate_size=128, max_position_embeddings=PASSKEY_LEN, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id)
    model = Transformer(args)
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = retrieval_batch(_fixed_key_samples(tok, [rng.random() for _ in range(8)]), loss_on="all")
        loss = F.cross_entropy(model(batch.input_ids).flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture
def one_thread():
    # A 64-wide model: one thread is faster than two fighting over tiny ops (and than spinning on a shared CPU).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trained_model_scores_high_random_model_at_chance(tok, one_thread):
    from longtrain.eval.retrieval import score_samples

    trained, untrained = _train_fixed_key(tok, steps=150), _train_fixed_key(tok, steps=0)  # 120 suffice
    held_out = _fixed_key_samples(tok, [0.05, 0.3, 0.55, 0.8, 1.0])  # depths not drawn in training
    exact, _, _ = score_samples(trained, held_out)
    assert all(exact), exact
    exact, frac, _ = score_samples(untrained, held_out)
    assert not any(exact) and max(frac) <= 0.25, (exact, frac)  # chance: 1/900 per sample
    # The grid draws a new key per sample: a memorised key is right with probability 1/900 per sample.
    grid = evaluate(trained, tok, [PASSKEY_LEN], depths=[0.5], samples=8, seed=7,
                    task_options={"passkey": {"digits": 3}})["retrieval"]["passkey"]
    assert grid["by_length"] == [0.0], grid

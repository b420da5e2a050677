"""plan_memory: its accounting against hand-computed values, monotonic in every switch, and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtrain.model.args import model_flavor
from longtrain.plan import GIB, RUNTIME_OVERHEAD_BYTES, SWITCH_LADDER, plan_memory, suggest

ONE_B = model_flavor("llama3.2-1b")
ROOT = Path(__file__).resolve().parents[2]


def test_params_grads_optimizer_by_hand() -> None:
    n = ONE_B.num_params()
    p = plan_memory(ONE_B, 4096, dtype="bfloat16")
    assert (p.params, p.grads, p.optimizer) == (2 * n, 2 * n, 4 * n)  # bf16 weights, grads, 2 AdamW states
    p8 = plan_memory(ONE_B, 4096, dp_shard=8)
    assert p8.params == 2 * n // 8 and p8.optimizer == 4 * n // 8
    ds = plan_memory(ONE_B, 4096, backend="deepspeed", zero_stage=1, dp_shard=4)
    assert ds.params == 2 * n and ds.grads == 2 * n and ds.optimizer == 12 * n // 4  # fp32 master + 2 fp32 states


def test_unchunked_logits_by_hand() -> None:
    # 32K tokens x 128256 vocab: bf16 logits + fp32 copy + fp32 softmax gradient = 10 bytes per logit.
    p = plan_memory(ONE_B, 32768, loss_chunk=None)
    assert p.logits == 32768 * ONE_B.vocab_size * 10
    # Chunked (2048 tokens): one chunk's logits (bf16 + fp32 + fp32 grad + bf16 grad), the fp32 weight-gradient
    # accumulator with its bf16 product, and the stored bf16 hidden gradient.
    v, d = ONE_B.vocab_size, ONE_B.dim
    assert plan_memory(ONE_B, 32768).logits == 2048 * v * 12 + v * d * 6 + 32768 * d * 2


def test_every_switch_lowers_the_peak() -> None:
    seq = 131072
    base = plan_memory(ONE_B, seq, loss_chunk=None).total
    totals = [plan_memory(ONE_B, seq, **sw).total for _, sw in SWITCH_LADDER]
    assert totals[0] < base
    # Along the ladder memory never rises between a setting and the same setting with more switches.
    assert plan_memory(ONE_B, seq, ac_mode="full").total < plan_memory(ONE_B, seq, ac_mode="selective").total \
        < plan_memory(ONE_B, seq, ac_mode="none").total
    assert plan_memory(ONE_B, seq, ac_mode="full", offload=True).total < plan_memory(ONE_B, seq, ac_mode="full").total
    assert plan_memory(ONE_B, seq, tiled_mlp=True).total < plan_memory(ONE_B, seq).total
    assert plan_memory(ONE_B, seq, ac_mode="full", seq_tile=8192).total < plan_memory(ONE_B, seq, ac_mode="full").total
    assert totals[-1] == min(totals)
    # Context parallelism divides the tokens per GPU.
    assert plan_memory(ONE_B, seq, cp=4, cp_mode="ring").activations < plan_memory(ONE_B, seq).activations / 3
    assert plan_memory(ONE_B, seq, cp=4).tokens_per_gpu == seq // 4


def test_offload_moves_block_inputs_to_host() -> None:
    seq = 262144
    p = plan_memory(ONE_B, seq, ac_mode="full", offload=True)
    assert p.host_offload == ONE_B.n_layers * seq * ONE_B.dim * 2  # every layer's bf16 block input


def test_suggest_orders_cheapest_first_and_respects_budget() -> None:
    fits = suggest(80 * GIB, model_args=ONE_B, seq_len=1 << 20)
    labels = [label for label, _ in fits]
    ladder = [label for label, _ in SWITCH_LADDER]
    assert labels == sorted(labels, key=ladder.index)
    assert all(p.total <= 80 * GIB for _, p in fits)
    assert suggest(RUNTIME_OVERHEAD_BYTES, model_args=ONE_B, seq_len=4096) == []  # nothing fits in the overhead


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="valid: none, selective, full"):
        plan_memory(ONE_B, 4096, ac_mode="partial")
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        plan_memory(ONE_B, 0)
    with pytest.raises(NotImplementedError, match="selective"):
        plan_memory(ONE_B, 4096, ac_mode="selective", offload=True)
    with pytest.raises(ValueError, match="backend"):
        plan_memory(ONE_B, 4096, backend="megatron")


def test_plan_cli_on_a_recipe(tmp_path: Path, capsys) -> None:
    from longtrain.cli import main

    recipe = ROOT / "recipes" / "tiny-demo.yaml"
    rc = main(["plan", str(recipe), "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 0 and "stage 0 (short-128)" in out and "stage 1 (long-512)" in out and "fits" in out
    # The same recipe at 512K tokens on a 1B shape does not fit as written and the plan says what would.
    rc = main(["plan", str(recipe), "model.flavor=llama3.2-1b", "model.overrides={}", "model.dtype=bfloat16",
               "stages.1.seq_len=524288", "stages.1.train.micro_batch=1", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "fits with:" in out

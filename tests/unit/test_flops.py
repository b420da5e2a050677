"""FLOPs per token, MFU and the ceiling: checked against hand counts and a counted forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.trainer.flops import (attention_context, ceiling_mfu, device_peak_flops, flops_per_token,
                                     matmul_params, measure_matmul_flops, mfu, peak_flops_by_name)


def test_llama_1b_by_hand():
    args = model_flavor("llama3.2-1b")
    # Per layer: q,o 2048x2048 each; k,v 2048x512 each; MLP 3 x 2048x8192. Output head 128256x2048 (tied).
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    assert matmul_params(args) == 16 * per_layer + 128256 * 2048
    s = 32768
    attn = 12 * 16 * 32 * 64 * (s / 2)  # causal: half the square
    assert flops_per_token(args, s) == pytest.approx(6 * matmul_params(args) + attn)
    assert flops_per_token(args, s, causal=False) == pytest.approx(6 * matmul_params(args) + 2 * attn)


def test_documents_are_counted_as_masked():
    assert attention_context(100) == 50
    assert attention_context(100, [50, 50]) == pytest.approx((50 * 50 / 2 * 2) / 100)
    assert attention_context(100, [100], causal=False) == 100
    assert attention_context(100, window=10) == pytest.approx((100 * 10 - 50) / 100)
    with pytest.raises(ValueError, match="sum to seq_len"):
        attention_context(100, [40, 40])


def test_matches_counted_matmuls_of_a_forward_pass():
    """torch's FLOP counter over a real forward: matmuls = 2*N_matmul/token, attention = 2 matmuls over
    the full square (the reference computes masked blocks too: twice the causal count)."""
    args = model_flavor("debug")
    model = Transformer(args)
    model.init_weights(0)
    s = 64
    ids = torch.randint(0, args.vocab_size, (1, s))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    counted = counter.get_total_flops() / s
    attn_full = 4 * args.n_layers * args.n_heads * args.head_dim * s  # fwd, unmasked
    assert counted == pytest.approx(2 * matmul_params(args) + attn_full, rel=1e-6)
    # Forward is a third of the training FLOPs; causal attention is half the square.
    fwd_causal = flops_per_token(args, s) / 3
    assert fwd_causal == pytest.approx(2 * matmul_params(args) + attn_full / 2)


def test_peaks_and_mfu():
    assert device_peak_flops("cpu") is None
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("Some Future GPU") is None
    with pytest.raises(ValueError, match="valid"):
        device_peak_flops("xla")
    assert mfu(1000.0, 1e9, 2e12) == 0.5
    assert mfu(1000.0, 1e9, None) is None


def test_ceiling():
    args = model_flavor("llama3.2-1b")
    # Kernels at the peak: ceiling 1; everything at half the peak: 0.5.
    assert ceiling_mfu(args, 8192, 989e12, 989e12, 989e12) == pytest.approx(1.0)
    assert ceiling_mfu(args, 8192, 494.5e12, 494.5e12, 989e12) == pytest.approx(0.5)
    # Slow attention hurts more at long context.
    assert ceiling_mfu(args, 131072, 700e12, 400e12, 989e12) < ceiling_mfu(args, 8192, 700e12, 400e12, 989e12)
    with pytest.raises(ValueError, match="> 0"):
        ceiling_mfu(args, 8192, 0.0, 1.0, 1.0)
    rate = measure_matmul_flops(model_flavor("debug"), 64, "cpu", torch.float32, iters=2, warmup=1)
    assert rate > 0


def test_measure_ceiling_and_the_logged_share(tmp_path, capsys):
    from longtrain.config import LoggingConfig
    from longtrain.kernels.attention import attention_reference
    from longtrain.trainer.flops import measure_ceiling
    from longtrain.trainer.metrics import MetricsLogger

    args = model_flavor("debug")
    assert measure_ceiling(args, 64, attention_reference, "cpu", torch.float32) is None  # no CPU peak
    peak = 1e15
    ceiling, mm, attn = measure_ceiling(args, 64, attention_reference, "cpu", torch.float32, peak_flops=peak)
    assert mm > 0 and attn > 0
    assert ceiling == pytest.approx(ceiling_mfu(args, 64, mm, attn, peak))
    log = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False, plot=False), "t", {}, 1, 0, True)
    record = {"step": 1, "stage_name": "s", "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0,
              "mfu": 0.44, "mfu_ceiling": 0.5, "memory_gib": 1.0}
    log.log(record)
    log.log(record | {"mfu_ceiling": None})
    lines = capsys.readouterr().out.splitlines()
    assert "mfu 44.0% (88% of ceiling)" in lines[0] and "ceiling" not in lines[1]

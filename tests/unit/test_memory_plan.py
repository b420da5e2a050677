"""plan_memory: measured GPU peaks, saved-tensor bytes on CPU, hand-computed values, monotonic switches, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtrain.model.args import model_flavor
from longtrain.model.args import ModelArgs
from longtrain.plan import GIB, RUNTIME_OVERHEAD_BYTES, SWITCH_LADDER, layer_saved_bytes_per_token, plan_memory, suggest

ONE_B = model_flavor("llama3.2-1b")
THREE_B = model_flavor("llama3.2-3b")
ROOT = Path(__file__).resolve().parents[2]


def test_params_grads_optimizer_by_hand() -> None:
    n = ONE_B.num_params()
    # With offload at 512K the peak is layer 0's backward, where every gradient exists.
    off = dict(seq_len=524288, ac_mode="full", offload=True, seq_tile=8192)
    p = plan_memory(ONE_B, dtype="bfloat16", **off)
    assert (p.params, p.grads, p.optimizer) == (2 * n, 2 * n, 4 * n)  # bf16 weights, grads, 2 AdamW states
    # FSDP2 over 8 ranks: the trainer keeps sharded parameters (and so grads and AdamW states) in fp32.
    p8 = plan_memory(ONE_B, dp_shard=8, **off)
    assert p8.params == 4 * n // 8 and p8.optimizer == 8 * n // 8
    assert plan_memory(ONE_B, dp_shard=8, master_dtype="bfloat16", **off).params == 2 * n // 8
    # Under context parallelism FSDP2 shards over dp_shard x cp: cp=8 divides like dp_shard=8 ...
    cp8 = plan_memory(ONE_B, cp=8, cp_mode="ring", **off)
    assert (cp8.params, cp8.optimizer) == (p8.params, p8.optimizer)
    # ... and one step still holds one sequence per data-parallel replica (cp ranks share it).
    assert cp8.tokens_per_step == 524288 and p8.tokens_per_step == 8 * 524288
    assert plan_memory(ONE_B, 256, micro_batch=4, cp=2, cp_mode="ring").tokens_per_step == 1024
    ds = plan_memory(ONE_B, backend="deepspeed", zero_stage=1, dp_shard=4, **off)
    assert ds.params == 2 * n and ds.grads == 2 * n and ds.optimizer == 12 * n // 4  # fp32 master + 2 fp32 states
    # Without checkpointing the peak is the end of the forward: gradients do not exist yet (set to None).
    assert plan_memory(ONE_B, 4096).grads == 0


def test_unchunked_logits_by_hand() -> None:
    # 32K tokens x 128256 vocab: bf16 logits + fp32 copy + fp32 softmax gradient = 10 bytes per logit.
    p = plan_memory(ONE_B, 32768, loss_chunk=None)
    assert p.logits == 32768 * ONE_B.vocab_size * 10
    # Chunked (2048 tokens, eager): one chunk's logits (bf16 + fp32 + fp32 softmax + bf16 cast), the fp32
    # weight-gradient accumulator and the fp32 product the GEMM adds into it, the stored bf16 hidden gradient.
    v, d = ONE_B.vocab_size, ONE_B.dim
    assert plan_memory(ONE_B, 32768).logits == 2048 * v * 12 + v * d * 8 + 32768 * d * 2
    # Compiled: the fp32 logits and softmax are fused away. Triton (and auto, the GPU default): the gradient
    # overwrites the logits, one bf16 buffer per chunk.
    assert plan_memory(ONE_B, 32768, loss_impl="compile").logits == 2048 * v * 4 + v * d * 8 + 32768 * d * 2
    assert plan_memory(ONE_B, 32768, loss_impl="triton").logits == 2048 * v * 2 + v * d * 8 + 32768 * d * 2
    assert plan_memory(ONE_B, 32768, loss_impl="auto").logits == plan_memory(ONE_B, 32768, loss_impl="triton").logits


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
    assert p.peak_at == "backward of layer 0"  # nothing stays per layer: the peak is where every gradient exists


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
    assert "attention auto" in out  # the recipe's backend reaches the plan
    # The recipe's backend sets the plan: fa4's workspace is smaller than auto's (cuDNN's) at any length.
    big = ["model.flavor=llama3.2-1b", "model.overrides={}", "model.dtype=bfloat16", "stages.1.seq_len=65536",
           "stages.1.train.micro_batch=1", "memory.activation_checkpoint=full",
           "memory.offload_activations=true"]  # the peak is then in a layer's backward, where the workspace is
    totals = {}
    for att in ("auto", "fa4"):
        main(["plan", str(recipe), *big, f"model.attention={att}"])
        line = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("total")][-1]
        totals[att] = float(line.split()[1])
    assert totals["fa4"] < totals["auto"]
    assert main(["plan", str(recipe), "model.attention=flex"]) == 2 and "not modelled" in capsys.readouterr().err
    # The same recipe at 512K tokens on a 1B shape does not fit as written and the plan says what would.
    rc = main(["plan", str(recipe), "model.flavor=llama3.2-1b", "model.overrides={}", "model.dtype=bfloat16",
               "stages.1.seq_len=524288", "stages.1.train.micro_batch=1", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "fits with:" in out


# Measured peaks, torch.cuda.max_memory_allocated, one H100 80GB, bf16, torch AdamW, random init, fused Triton
# RMSNorm/RoPE/SwiGLU, 2026-11-26. max_context: docs/memory.md "Measured" (--warmup 0 --steps 1: the optimizer
# states do not exist before opt.step, hence steady_state=False; loss impl torch, chunk 2048, seq_tile 8192;
# attention cuDNN, at 1B 1M and 3B 512K flash-attn-4 4.0.0b36). throughput: docs/benchmarks.md "Throughput
# (issue 8)", H100 run of 2026-11-27 (warm-up steps: states exist; loss impl triton, the GPU default; no AC up
# to 32K, selective at 128K; no tiled MLP; attention `auto` = flash-attn-4).
ALL_SWITCHES = dict(ac_mode="full", offload=True, tiled_mlp=True, seq_tile=8192, fused_kernels=True)
FIRST_STEP = dict(ALL_SWITCHES, steady_state=False)
THROUGHPUT = dict(fused_kernels=True, loss_impl="triton", attention="fa4")
MEASURED = [
    ("max_context 1B 512K all switches cudnn", ONE_B, 524288, dict(FIRST_STEP, attention="sdpa_cudnn"), 35.0),
    ("max_context 3B 256K all switches cudnn", THREE_B, 262144, dict(FIRST_STEP, attention="sdpa_cudnn"), 35.3),
    ("max_context 1B 1M all switches fa4", ONE_B, 1048576, dict(FIRST_STEP, attention="fa4"), 57.55),
    ("max_context 3B 512K all switches fa4", THREE_B, 524288, dict(FIRST_STEP, attention="fa4"), 53.70),
    ("throughput 1B 8K no AC", ONE_B, 8192, THROUGHPUT, 18.81),
    ("throughput 1B 32K no AC", ONE_B, 32768, THROUGHPUT, 47.00),
    ("throughput 1B 128K selective", ONE_B, 131072, dict(THROUGHPUT, ac_mode="selective"), 37.06),
]
MEASURED_TOLERANCE = 0.05  # issue 7 asks for 15%; the accounting lands within 2.5% of each point


@pytest.mark.parametrize("name,args,seq,switches,measured_gib", MEASURED, ids=[m[0] for m in MEASURED])
def test_plan_matches_measured_gpu_peaks(name, args, seq, switches, measured_gib) -> None:
    predicted = plan_memory(args, seq, **switches).total / GIB
    assert abs(predicted - measured_gib) / measured_gib < MEASURED_TOLERANCE, (name, predicted, measured_gib)


def test_attention_backward_workspace_by_hand() -> None:
    # 1B: 32 query heads, 8 KV heads, head_dim 64. With offload the peak is layer 0's backward, whose working
    # set holds the attention backward's workspace once per token; nothing else depends on the backend.
    t, q, kv = 1048576, 32 * 64, 8 * 64
    plans = {att: plan_memory(ONE_B, t, **FIRST_STEP, attention=att)
             for att in ("sdpa_cudnn", "sdpa_flash", "fa4", "auto")}
    cudnn = q * 2 + q * 4 + 2 * q * 2  # dO copy, fp32 dq accumulator, bf16 dk/dv per query head
    flash = q * 4 + 32 * 4 + 2 * q * 2  # fp32 dq_accum, fp32 softmax_d per head, dk/dv_expanded
    fa4 = q * 4 + 32 * 8 + 2 * kv * 4  # fp32 dq_accum, dpsum + lse_log2 per head, fp32 dk/dv_accum per KV head
    assert plans["sdpa_cudnn"].total - plans["fa4"].total == t * (cudnn - fa4)
    assert plans["sdpa_cudnn"].total - plans["sdpa_flash"].total == t * (cudnn - flash)
    assert plans["auto"].total == plans["sdpa_cudnn"].total  # auto may be either: the larger counts
    with pytest.raises(NotImplementedError, match="flex"):
        plan_memory(ONE_B, 4096, attention="flex")
    with pytest.raises(ValueError, match="valid: sdpa_cudnn"):
        plan_memory(ONE_B, 4096, attention="cudnn")


def test_first_step_has_no_optimizer_states() -> None:
    steady = plan_memory(ONE_B, 524288, **ALL_SWITCHES)
    first = plan_memory(ONE_B, 524288, **ALL_SWITCHES, steady_state=False)
    assert first.optimizer == 0 and steady.total - first.total == steady.optimizer == 4 * ONE_B.num_params()


class _CpuFlash(torch.autograd.Function):
    """Causal attention with a fused kernel's saved set (q, k, v, out, LSE), as the GPU backends keep it."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bs, heads, seqlen, head_dim)
        rep = qt.shape[1] // kt.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1), 0.0, True, scale=scale)
        ctx.save_for_backward(qt, kt, vt, out, lse)
        return out.transpose(1, 2), lse

    @staticmethod
    def backward(ctx, dout, dlse):  # never run: the test only counts what forward saves
        raise NotImplementedError


def _measured_saved_bytes_per_token(args: ModelArgs, seq: int, fused: bool) -> float:
    """Bytes autograd saves for one block, per token: distinct storages seen by saved_tensors_hooks, minus
    parameters and the RoPE cos/sin (shared by all layers, counted in buffers)."""
    from longtrain.kernels.attention import AttnMask
    from longtrain.model.decoder import Transformer

    torch.manual_seed(0)
    model = Transformer(args).to(torch.bfloat16)
    model.set_attention(lambda q, k, v, mask, scale: _CpuFlash.apply(q, k, v, scale))
    if fused:
        from longtrain.parallel.fused_kernels import apply_fused_kernels

        apply_fused_kernels(model)
    x = model.embed_tokens(torch.randint(0, args.vocab_size, (1, seq))).detach().requires_grad_()
    cos, sin = model.rotary(torch.arange(seq)[None])
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, AttnMask.causal(1, seq, "cpu"))
    return sum(seen.values()) / seq


TINY = ModelArgs(vocab_size=256, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=384,
                 max_position_embeddings=4096)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_saved_activation_bytes_match_autograd(fused: bool) -> None:
    if fused:
        from longtrain.kernels.rmsnorm import triton_usable

        if not triton_usable(torch.empty(1)):
            pytest.skip("fused kernels need triton (TRITON_INTERPRET=1 on CPU)")
    measured = _measured_saved_bytes_per_token(TINY, 256, fused)
    # Exact: every saved tensor is counted (the count is per token, so it holds at any length).
    assert measured == layer_saved_bytes_per_token(TINY, "bfloat16", fused_kernels=fused)


def test_offload_moves_states_to_the_host_by_hand() -> None:
    n, layer = ONE_B.num_params(), ONE_B.num_params() // ONE_B.n_layers
    root = ONE_B.vocab_size * ONE_B.dim + ONE_B.dim  # tied embedding + final norm
    off = dict(seq_len=131072, ac_mode="full", offload=True, tiled_mlp=True)
    # FSDP2 CPUOffloadPolicy on one GPU: fp32 params + grads + 2 states on the host; the GPU keeps the
    # gathered bf16 layer being computed, the prefetched one and the root's parameters.
    p = plan_memory(ONE_B, offload_params=True, **off)
    assert (p.params, p.grads, p.optimizer) == (0, 0, 0) and p.host_states == 16 * n
    assert p.buffers - plan_memory(ONE_B, **off).buffers == 2 * layer * 2 + root * 2
    assert plan_memory(ONE_B, offload_params=True, master_dtype="bfloat16", **off).host_states == 8 * n
    # ... over cp=4 ranks each holds a quarter on the host.
    assert plan_memory(ONE_B, offload_params=True, cp=4, cp_mode="ring", **off).host_states == 16 * n // 4
    # DeepSpeed ZeRO-3 over 2 ranks with ZeRO-Offload: fp32 master + 2 states + the fp32 gradient copy on the
    # host; with offload_param the bf16 partition too.
    ds = dict(backend="deepspeed", zero_stage=3, dp_shard=2, **off)
    z = plan_memory(ONE_B, offload_optimizer=True, **ds)
    assert z.optimizer == 0 and z.host_states == 16 * n // 2 and z.params == 2 * n // 2
    zp = plan_memory(ONE_B, offload_optimizer=True, offload_params=True, **ds)
    assert zp.params == 0 and zp.host_states == 16 * n // 2 + 2 * n // 2
    assert not zp.fits(80 * GIB, host_bytes=zp.host_total - 1) and zp.fits(80 * GIB, host_bytes=zp.host_total)
    with pytest.raises(ValueError, match="FSDP2 offloads optimizer states only together with the parameters"):
        plan_memory(ONE_B, offload_optimizer=True, **off)
    with pytest.raises(ValueError, match="zero_stage 3 only"):
        plan_memory(ONE_B, offload_params=True, offload_optimizer=True, backend="deepspeed", zero_stage=2, **off)

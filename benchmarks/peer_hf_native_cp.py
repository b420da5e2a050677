"""Peer for benchmarks/cp_scaling.py: Hugging Face transformers + PyTorch's native context parallelism
(`torch.distributed.tensor.experimental.context_parallel`, the engine behind accelerate's `cp_size`) +
liger-kernel's fused linear cross-entropy, FSDP2 over the cp ranks, SDPA + gradient checkpointing.

This is what a user gets from `accelerate launch` with `parallelism_config.cp_size = N`: the same pieces,
without accelerate's wrapper, so the benchmark controls the timing loop. Run under torchrun:

    torchrun --nproc-per-node 2 benchmarks/peer_hf_native_cp.py --flavor llama3.2-1b --tokens-per-gpu 32768,65536

liger-kernel is carried to the GPU machine as a wheel (pure Python); without it the loss is HF's own
(full logits), which is then named in the output.

Why the first attempt failed with `RuntimeError: No available kernel` (torch 2.11, transformers 5):
context_parallel shards `position_ids` with its head-tail load balancer, so rank 0 holds positions
[0, S/4) + [3S/4, S). transformers (masking_utils `find_packed_sequence_indices`) reads the jump in the
positions as two packed documents and builds an explicit attention mask; `sdpa_attention_forward` then passes
`attn_mask=<tensor>`, `is_causal=False` and repeats K/V (no `enable_gqa`). The flash kernel takes no mask and
torch's CP ring handlers take none either ("attn_bias is not supported yet"), so SDPA under
sdpa_kernel([FLASH, CUDNN]) finds no kernel. The mask would also be wrong: it is local to each shard, while
ring attention needs the global causal order. The fix a user can apply: pass an all-ones `attention_mask`
(no padding). transformers then skips the mask (`_ignore_causal_mask_sdpa`) and calls SDPA with
`is_causal=True, enable_gqa=True`, which the flash kernel runs (it supports GQA) and context_parallel turns
into load-balanced causal ring attention. `hf_cp_kwargs` builds those arguments;
tests/unit/test_peer_hf_native_cp.py checks on CPU what SDPA receives with and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from longtrain.model.args import model_flavor
from longtrain.trainer.flops import device_peak_flops, flops_per_token, mfu


def hf_cp_kwargs(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Arguments for an HF causal LM's forward on one context-parallel shard (see the module docstring).

    The all-ones attention mask keeps transformers from reading the load-balanced positions as packed
    documents; labels are already shifted and sharded, so they are passed as `shift_labels` too.
    """
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "shift_labels": labels,
            "attention_mask": torch.ones_like(input_ids)}


def build_hf(flavor: str, device: torch.device, mesh, master: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.model.hf import hf_config

    margs = model_flavor(flavor)
    cfg = LlamaConfig(**hf_config(margs, torch.bfloat16), attn_implementation="sdpa")
    cfg.use_cache = False
    default = torch.get_default_dtype()
    torch.set_default_dtype(master)  # weights allocated once in the master dtype (8B in fp32 is 32 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model, margs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--flavor", default="llama3.2-1b")
    p.add_argument("--tokens-per-gpu", default="32768,65536,131072")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--master-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the sharded weights, gradients and AdamW states (bf16 for 8B on 2 GPUs: "
                        "benchmarks/cp_scaling.py says why)")
    a = p.parse_args()
    master = torch.bfloat16 if a.master_dtype == "bf16" else torch.float32
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timedelta(minutes=10))
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:  # liger's fused linear cross-entropy (and its RMSNorm/SwiGLU/RoPE) patched into HF Llama
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
        loss_name = "liger-flce"
    except ImportError:
        loss_name = "hf-full-logits"
    for tpg in (int(t) for t in a.tokens_per_gpu.split(",")):
        seq = tpg * world
        result = {"side": "hf+native-cp+liger", "loss": loss_name, "cp": world, "tokens_per_gpu": tpg, "seq_len": seq,
                  "flavor": a.flavor, "master_dtype": a.master_dtype}
        try:
            model, margs = build_hf(a.flavor, device, mesh, master)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, margs.vocab_size, (1, seq + 1), generator=gen).to(device)
            inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
            positions = torch.arange(seq, device=device)[None]

            def step():
                # context_parallel shards the buffers in place (round-robin load balancing) and swaps SDPA
                # for ring attention inside the context.
                buf = [inputs.clone(), labels.clone(), positions.clone()]
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]), \
                        context_parallel(mesh, buffers=buf, buffer_seq_dims=[1, 1, 1]):
                    # The root forward (FSDP2 gathers the tied embedding / lm_head there).
                    loss = model(**hf_cp_kwargs(buf[0], buf[1], buf[2])).loss
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.steps
            tps = seq / dt / world
            result.update(status="ok", step_s=dt, tokens_per_s_per_gpu=tps,
                          mfu=mfu(tps, flops_per_token(margs, seq), device_peak_flops(device)),
                          peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
            del model, opt
        except torch.OutOfMemoryError:
            result.update(status="OOM")
        except Exception as e:  # a peer failing is a result to report, not a crash of the sweep
            result.update(status=f"error: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

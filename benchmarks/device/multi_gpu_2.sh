#!/usr/bin/env bash
# Multi-GPU device calls of issue 10 on 2 or 4 GPUs: NCCL parity at 4 GPUs, 8B CP scaling, the native-CP peer, a GPU
# end-to-end run, torchtitan.
#   (device tool, kind nvidia-h100-x2 or -x4) carry [".whl", ".whl-tt"]:  bash benchmarks/device/multi_gpu_2.sh
# With flash-attn-4 (auto then uses it for the per-rank attention), two calls on one warm machine:
#   carry [".whl1"]: bash .whl1/unpack.sh
#   carry [".whl2", ".whl"]: bash .whl2/unpack.sh && source /tmp/site/env.sh && STEPS="0 1a" bash benchmarks/device/multi_gpu_2.sh
# .whl: deepspeed/hjson/pydantic + liger-kernel 0.8.5 wheels; .whl-tt: torchtitan-0.3.0 (`pip download torchtitan
# --no-deps`), installed apart so that it cannot shadow anything the other steps import.
# Steps in priority order, each under its own timeout, capped by a deadline for the whole call (DEADLINE s after
# start, default 550: the tool kills at 600). STEPS picks a subset for a follow-up call, e.g. STEPS="1b 3".
# Expected wall (H100, estimated from FLOPs at ~30-40% MFU): setup 15 s; 4 torchtitan probe 15 s; 1a 8B 64K/GPU
# cp=1 + allgather + ulysses ~210 s; 1b best mode 128K/GPU ~150 s; 2 peer 8B 64K/GPU ~90 s; 3 end-to-end ~150 s.
# That is more than one call holds: 1b or 3 may be cut by the deadline (each says so), then run them next call.
#
# Memory of 8B on 2 x 80 GB (benchmarks/cp_scaling.py docstring): fp32 master weights + grads + AdamW states are
# 64 GB per GPU before activations, so both sides run bf16 weights/grads/states (--master-dtype bf16, 32 GB per
# GPU); full AC + tiled MLP + fused kernels; 16 GiB of checkpointed block inputs at 64K tokens/GPU fit (plan ~67
# GiB), 32 GiB at 128K do not, so 1b offloads them to host memory (~32 GiB pinned per rank, 256 GB host).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"0 4 1a 1b 2 3"}
source benchmarks/device/steps.sh

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site3 .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site3
N=$(nvidia-smi -L | wc -l); echo "GPUs: $N"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null
export TR="torchrun --nproc-per-node $N"
python -c "import torch; from longtrain.kernels.attention_auto import fa4_usable; print('auto uses fa4:', fa4_usable(0))"

# 0. NCCL/bf16 parity at this many GPUs: every cp mode (hybrid = Ulysses 2 x ring) against cp=1, FSDP2 and ZeRO-3, per-rank
#    reference math (packed documents, a length not divisible by 2*cp); then the fast per-rank kernels (auto: fa4 or
#    cuDNN) on one-document rows, where Ulysses and all-gather now hand them natural-order causal/full blocks.
parity() {
  local check="-m longtrain.trainer.check_parallel --flavor debug --dtype bf16 --batches 2"
  for m in ring allgather ulysses "hybrid --ulysses 2"; do
    $TR $check --seq-len 4093 --cp-mode $m 2>&1 | grep -E "^check-parallel|^  (loss|grad|max|OK|FAIL|MISMATCH)|Error|error:"
  done
  for m in ring "hybrid --ulysses 2"; do
    $TR $check --seq-len 4093 --cp-mode $m --sharding deepspeed --zero-stage 3 2>&1 | grep -E "^check-parallel|^  (loss|grad|max|OK|FAIL|MISMATCH)|Error|error:"
  done
}
parity_fast() {
  local check="-m longtrain.trainer.check_parallel --flavor debug --dtype bf16 --batches 2"
  for m in ring allgather ulysses; do
    $TR $check --seq-len 8192 --cp-mode $m --attention-backend auto 2>&1 | grep -E "^check-parallel|^  (loss|grad|max|OK|FAIL|MISMATCH)|Error|error:"
  done
}
export -f parity parity_fast
[ "$N" -ge 4 ] && run_step 0_parity 200 bash -c parity
SCALE="benchmarks/cp_scaling.py --flavor llama3.1-8b --ac full --master-dtype bf16 --fused"

# 4. torchtitan 0.3.0 against this torch: does its CP path import? (cheap, so first; it needs no GPU time)
tt_probe() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tt .whl-tt/*.whl || return 1
  PYTHONPATH=/tmp/tt:$PYTHONPATH python - <<'EOF'
import importlib, traceback
for m in ["torchtitan.distributed.context_parallel.api", "torchtitan.components.loss", "torchtitan.trainer"]:
    try:
        importlib.import_module(m); print("import ok:", m)
    except Exception as e:
        print("import FAILED:", m, "->", type(e).__name__, str(e).splitlines()[0][:200])
EOF
}
export -f tt_probe  # timeout runs programs, not functions: bash -c FUNCTION
run_step 4_torchtitan 30 bash -c tt_probe

# 1a. 8B weak scaling at 64K tokens per GPU: cp=1 (dp_shard=2, two 64K sequences) vs cp=2 (one 128K sequence).
CPS=$([ "$N" -ge 4 ] && echo 1,2,4 || echo 1,2)
run_step 1a_scaling_64k 380 $TR $SCALE --tokens-per-gpu 65536 --cps $CPS --modes ulysses,allgather --steps 1 \
  --out "$OUT/scaling_64k.jsonl"

# 1b. The best mode of 1a at 128K tokens per GPU (a 256K sequence), activations offloaded; one untimed step would
#     cost ~2 minutes, so no warm-up (the row says warmup 0).
if [ -s "$OUT/scaling_64k.jsonl" ]; then
  run_step 1b_scaling_128k 180 $TR $SCALE --tokens-per-gpu 131072 --cps 2 --best-of "$OUT/scaling_64k.jsonl" \
    --offload-activations --warmup 0 --steps 1 --out "$OUT/scaling_128k.jsonl"
else
  run_step 1b_scaling_128k 180 $TR $SCALE --tokens-per-gpu 131072 --cps 2 --modes allgather \
    --offload-activations --warmup 0 --steps 1 --out "$OUT/scaling_128k.jsonl"
fi

# 2. Peer (a): transformers + native context_parallel + Liger, same shape and length as 1a's cp=2 rows.
run_step 2_peer_8b 120 $TR benchmarks/peer_hf_native_cp.py --flavor llama3.1-8b --tokens-per-gpu 65536 --steps 1 \
  --master-dtype bf16

# 3. End to end: recipe -> cp=2 training (stage 1 2K, stage 2 8K YaRN) -> stop at 250 (checkpoint) -> resume to
#    300 -> export -> eval stage-1 end vs export -> the export loads in transformers with finite logits.
e2e() {
  local R=/tmp/e2e; rm -rf $R  # checkpoints (~12 GB each) stay off $OUT
  $TR -m longtrain train recipes/gpu-e2e-cp2.yaml run_dir=$R train.stop_after_steps=250 || return 1
  ls $R/checkpoints
  $TR -m longtrain train recipes/gpu-e2e-cp2.yaml run_dir=$R || return 1  # train.resume=auto (the recipe's)
  ls $R/checkpoints; cp $R/metrics.jsonl "$OUT/e2e_metrics.jsonl"
  python -m longtrain export $R/checkpoints/latest $R/export --dtype bfloat16 || return 1
  python -m longtrain eval $R/checkpoints/step-200 --compare $R/export --lengths 2048,8192 \
    --tasks perplexity,passkey --samples 5 --depths 0.5 --digits 3 --template compact --device cuda \
    --max-windows 4 --name stage1-end --compare-name extended --out "$OUT/e2e_eval" || return 1
  python - $R/export <<'EOF'
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda()
ids = torch.randint(0, m.config.vocab_size, (1, 8192), device="cuda")
with torch.no_grad():
    logits = m(ids).logits
print("export loads in transformers:", type(m).__name__, tuple(logits.shape), "rope:", getattr(m.config, "rope_parameters", None),
      "finite:", bool(torch.isfinite(logits).all()))
EOF
}
export -f e2e
run_step 5_parity_fast 120 bash -c parity_fast
run_step 3_e2e 240 bash -c e2e
echo "== done at $((SECONDS - T0))s"

#!/usr/bin/env bash
# One device call on a machine of several GPUs (issues 6 and 10): NCCL/bf16 parity of every cp mode,
# DeepSpeed ZeRO-3 parity, the fast backends' per-rank CP math, CP weak scaling and the native-CP peer.
#   (device tool) carry [".whl"]:  bash benchmarks/device/multi_gpu.sh
# .whl holds deepspeed 0.19.8 (+ hjson, pydantic) and liger-kernel 0.8.5 wheels (docs/benchmarks.md says how).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
N=$(nvidia-smi -L | wc -l); echo "GPUs: $N"; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
TR="torchrun --nproc-per-node $N"
CHECK="-m longtrain.trainer.check_parallel --flavor debug --seq-len 4093 --dtype bf16 --batches 2"
echo "== check-parallel, NCCL, bf16, FSDP2 (reference per-rank math)"
for mode in ring allgather ulysses; do
  timeout 120 $TR $CHECK --cp-mode $mode 2>&1 | grep -v -i warn | tail -4
done
[ "$N" -ge 4 ] && timeout 120 $TR $CHECK --cp-mode hybrid --ulysses 2 2>&1 | grep -v -i warn | tail -4
[ "$N" -ge 4 ] && echo "== check-parallel, dp_shard=$((N/2)) x cp=2" && \
timeout 120 $TR $CHECK --cp 2 --cp-mode ring 2>&1 | grep -v -i warn | tail -4
echo "== check-parallel, DeepSpeed ZeRO-3 x ring"
timeout 150 $TR $CHECK --cp-mode ring --sharding deepspeed --zero-stage 3 2>&1 | grep -v -i warn | tail -6
echo "== per-rank CP attention math, fast backends vs reference (one GPU)"
for mode in ring; do
  for b in sdpa_flash sdpa_cudnn; do  # documents inside a CP block go to flex: one document per row here
    timeout 90 python -m longtrain.parallel.cp_local_check --backend $b --mode $mode --cp 8 --dtype bf16 --single-doc 2>&1 | tail -2
  done
  timeout 150 python -m longtrain.parallel.cp_local_check --backend flex --mode $mode --cp 8 --dtype bf16 2>&1 | tail -2
done
echo "== CP weak scaling, Llama-3.2-1B shape"
timeout 200 $TR benchmarks/cp_scaling.py --flavor llama3.2-1b --tokens-per-gpu 32768 --cps 1,$N \
  --modes ring,allgather,ulysses --steps 2 --ac full --out $OUT/cp_scaling.jsonl 2>&1 | grep -v -i warn | grep -E '^\{|^[a-z-]+ +[0-9]' | tee $OUT/cp_scaling.log
echo "== peer: transformers + native context_parallel + liger FLCE"
timeout 120 $TR benchmarks/peer_hf_native_cp.py --flavor llama3.2-1b --tokens-per-gpu 32768 --steps 2 2>&1 | grep '^{' 

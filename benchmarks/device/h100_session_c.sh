#!/usr/bin/env bash
# Third H100 session (issues 7, 8), 2026-11-27. Calls back to back on one warm machine (flavor a), then a fresh
# one (flavor b); flash-attn-4 travels in two parts (../shared/tools/device-wheels, see its header):
# .whl-liger holds liger_kernel-0.8.5-py3-none-any.whl (pip download liger-kernel==0.8.5 --no-deps).
#   a1, carry [".whl1", ".whl-liger"]: bash benchmarks/device/h100_session_c.sh loss
#       unpacks part 1; GPU test of the chunked loss; benchmarks/loss.py (longtrain vs Liger vs full logits)
#   a2, carry [".whl2"]:               bash benchmarks/device/h100_session_c.sh throughput
#       benchmarks/throughput.py, all sides, 8K / 32K / 128K / 32K docs
#   a3:                                bash benchmarks/device/h100_session_c.sh max3b   (then `wait` calls)
#       `longtrain train` at 32K; profile (8K, 32K); then the peers' max context (transformers, + Liger) for
#       both shapes, one process per trial, in the background
#   b1, carry [".whl1"]:               bash .whl1/unpack.sh
#   b2, carry [".whl2", ".whl-liger"]: bash benchmarks/device/h100_session_c.sh max1b   (then `wait` calls)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null
liger() {  # liger-kernel 0.8.5 (pure Python) into /tmp/site2, once per machine
  [ -d /tmp/site2/liger_kernel ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site2 .whl-liger/liger*.whl
}
fa4_env() { source /tmp/site/env.sh && export PYTHONPATH=$PWD:$PYTHONPATH:/tmp/site2; }
poll() {  # poll SECONDS: until the background search ends or the time is up, then show what it printed
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$1" ] && pgrep -f "max_context.py" >/dev/null; do sleep 5; done
  grep -v -i warn /tmp/mc.log | tail -24; cp /tmp/mc.json /tmp/mc.log "$OUT/" 2>/dev/null
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}
start_max() {  # start_max FLAVORS SIDES SIDE_STARTS MAX_SEQ: fresh process per trial, in the background
  setsid nohup python benchmarks/max_context.py --flavors "$1" --sides "$2" --side-start "$3" --max-seq "$4" \
    --warmup 0 --steps 1 --fused --lt-switches all --attn auto --timeout 1500 \
    --json /tmp/mc.json > /tmp/mc.log 2>&1 < /dev/null &
  sleep 5
}
case "${1:-}" in
loss)
  bash .whl1/unpack.sh; liger
  export PYTHONPATH=$PWD:/tmp/site2
  python -m pytest -q -p no:cacheprovider tests/unit/test_memory_switches.py -k cuda 2>&1 | tail -3
  timeout 200 python benchmarks/loss.py 2>&1 | grep -v -i warn
  ;;
throughput)
  bash .whl2/unpack.sh && fa4_env || exit 1
  python -c "from longtrain.kernels.attention_auto import fa4_usable; print('auto uses fa4:', fa4_usable(0))"
  timeout 560 python benchmarks/throughput.py --sides longtrain,hf,hf_liger --lengths 8192,32768,131072 \
    --docs-lengths 32768 --steps 3 --warmup 1 --json $OUT/throughput.json 2>&1 | grep -v -i warn | tail -24
  ;;
max3b)
  fa4_env
  echo "== longtrain train recipes/gpu-throughput-1b.yaml (32K tokens per step)"
  timeout 120 python -m longtrain train recipes/gpu-throughput-1b.yaml run_dir=/tmp/tp stages.0.steps=6 2>&1 \
    | grep -E "^step|done|rror" | tail -8
  timeout 150 python benchmarks/throughput.py --sides longtrain --lengths 8192,32768 --docs-lengths "" --steps 2 \
    --warmup 1 --profile 2>&1 | grep -E "^profile|^longtrain" | tail -6
  start_max llama3.2-1b,llama3.2-3b hf,hf_liger hf=16384,hf_liger=131072 524288
  poll 330
  ;;
max1b)  # longtrain's own points (1B 1M, 3B 512K) in the same search: ~20 minutes of one GPU
  bash .whl2/unpack.sh && liger && fa4_env || exit 1
  start_max llama3.2-1b,llama3.2-3b longtrain longtrain=524288 1048576
  poll 570
  ;;
wait) fa4_env; poll 585 ;;
*) echo "usage: $0 loss|throughput|max3b|max1b|wait"; exit 2 ;;
esac

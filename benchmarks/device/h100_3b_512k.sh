#!/usr/bin/env bash
# Issue 7's 3B point: the Llama-3.2-3B shape at 512K tokens, one training step with every memory switch
# (full AC + host offload + sequence-tiled blocks, fused kernels, chunked loss), flash-attn-4 on one H100.
# The step takes longer than one device call may (~8-10 min), so it runs in its own process session and
# calls poll it; flash-attn-4 travels in two parts (../shared/tools/device-wheels, see its header):
#   call 1, carry [".whl1"]:  bash .whl1/unpack.sh
#   call 2, carry [".whl2"]:  bash benchmarks/device/h100_3b_512k.sh start   (unpacks, starts, polls ~9 min)
#   call 3:                   bash benchmarks/device/h100_3b_512k.sh wait    (polls until it ends, prints the row)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
poll() {  # poll SECONDS: until the trial ends or the time is up, then show what it printed
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$1" ] && pgrep -f "max_context.py --trial" >/dev/null; do sleep 5; done
  grep -v -i warn /tmp/mc3b.log | tail -14; cp /tmp/mc3b.json /tmp/mc3b.log "$OUT/" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader; free -g | head -2
}
case "${1:-}" in
start)
  bash .whl2/unpack.sh && source /tmp/site/env.sh || exit 1
  export PYTHONPATH=$PWD:$PYTHONPATH
  python -c "from longtrain.kernels.attention_auto import fa4_usable; print('auto uses fa4:', fa4_usable(0))"
  git rev-parse --short HEAD 2>/dev/null
  setsid nohup python benchmarks/max_context.py --flavors llama3.2-3b --sides longtrain --start 524288 \
    --max-seq 524288 --warmup 0 --steps 1 --fused --lt-switches all --timeout 1500 --attn auto \
    --json /tmp/mc3b.json > /tmp/mc3b.log 2>&1 < /dev/null &
  sleep 5; poll 560
  ;;
wait) poll 590 ;;
*) echo "usage: $0 start|wait"; exit 2 ;;
esac

#!/usr/bin/env bash
# Second H100 session (issues 7, 8), three calls back to back on one warm machine:
#   call 1, carry [".whl1"]:         bash .whl1/unpack.sh && bash benchmarks/device/h100_session_b.sh ratio
#   call 2, carry [".whl2", ".whl"]: bash benchmarks/device/h100_session_b.sh throughput   (starts the 3B run)
#   call 3:                          bash benchmarks/device/h100_session_b.sh wait
# ratio: the plain path's longest 1B step vs longtrain's cheapest fitting switches at that length (the
# issue's 1.35x bound; attention cuDNN on both sides: flash-attn-4 is not unpacked yet in call 1).
# throughput: benchmarks/throughput.py at 8K/32K/128K, longtrain (auto = flash-attn-4) vs transformers (+Liger).
# wait: the 3B shape at 512K tokens (all switches, flash-attn-4), started in the background by call 2.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-}" in
ratio)
  export PYTHONPATH=$PWD
  timeout 420 python benchmarks/max_context.py --flavors llama3.2-1b --sides longtrain_plain,longtrain --start 16384 \
    --max-seq 32768 --steps 2 --warmup 1 --fused --attn auto --timeout 150 --json $OUT/ratio.json 2>&1 | grep -v -i warn
  ;;
throughput)
  bash .whl2/unpack.sh && source /tmp/site/env.sh || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/liger*.whl
  export PYTHONPATH=$PWD:$PYTHONPATH:/tmp/site2
  python -c "
import torch; from longtrain.kernels.attention_auto import fa4_usable; print('auto uses fa4:', fa4_usable(0))"
  timeout 400 python benchmarks/throughput.py --sides longtrain,hf,hf_liger --lengths 8192,32768,131072 \
    --docs-lengths 32768 --steps 3 --warmup 1 --json $OUT/throughput.json 2>&1 | grep -v -i warn | tail -22
  echo "== 3B shape, 512K tokens, all switches, in the background (reads: /tmp/mc3b.log)"
  setsid nohup python benchmarks/max_context.py --flavors llama3.2-3b --sides longtrain --start 524288 --max-seq 524288 \
    --warmup 0 --steps 1 --fused --lt-switches all --timeout 1200 --attn auto --json /tmp/mc3b.json \
    > /tmp/mc3b.log 2>&1 < /dev/null &
  sleep 15; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ;;
wait)
  for i in $(seq 1 57); do pgrep -f "max_context.py --trial" >/dev/null || break; sleep 10; done
  grep -v -i warn /tmp/mc3b.log | tail -12; cp /tmp/mc3b.json $OUT/ 2>/dev/null
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; free -g | head -2
  ;;
*) echo "usage: $0 ratio|throughput|wait"; exit 2 ;;
esac

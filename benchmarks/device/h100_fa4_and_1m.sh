#!/usr/bin/env bash
# One H100 call (issues 4, 7, 8): flash-attn-4 against cuDNN, throughput with it, then a 1M-token step started
# in the background (it outlives this command; later calls read /tmp/mc1m.log while the machine stays warm).
#   (device tool) call 1, carry [".whl1"]:        bash .whl1/unpack.sh && bash benchmarks/device/h100_fa4_and_1m.sh demo
#                 call 2, carry [".whl2", ".whl"]: bash benchmarks/device/h100_fa4_and_1m.sh main
# .whl1/.whl2 come from ../shared/tools/device-wheels (flash-attn-4 4.0.0b36 + CUTLASS DSL 4.8.1 + deps);
# .whl holds liger-kernel 0.8.5 for the peers.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${1:-main}" = demo ]; then
export PYTHONPATH=$PWD
echo "== demo search on the GPU (12 tiny fp32 trials at once)"
mkdir -p /tmp/demo
timeout 200 python benchmarks/demo_search.py --grid g1 --jobs 12 --device cuda --log /tmp/demo/g1.jsonl
cp /tmp/demo/g1.jsonl $OUT/demo_g1.jsonl 2>/dev/null
python - <<'PY'
import json
for line in open("/tmp/demo/g1.jsonl"):
    r = json.loads(line); t = r["trial"]
    print(f"{r['name'][-70:]:<70} base {r['before']} yarn0 {r['ext_no_train']} after {r['after']} curve {r['curve']} var {r['variants']} s {r['s_base']}")
PY
for f in /tmp/demo/*.txt; do grep -q Traceback $f && { echo "FAILED $f"; tail -3 $f; }; done
[ "$(wc -l < /tmp/demo/g1.jsonl)" -lt 12 ] && grep -H "curve\|variant\|^base" /tmp/demo/*.txt | tail -60
tar czf $OUT/demo_logs.tgz -C /tmp/demo .
exit 0
fi

bash .whl2/unpack.sh && source /tmp/site/env.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/liger*.whl
export PYTHONPATH=$PWD:$PYTHONPATH:/tmp/site2
python -c "import flash_attn.cute as f; print('fa4 import ok', getattr(f, '__version__', ''))" 2>&1 | tail -1

echo "== attention: fa4 vs cuDNN (check + time), 1B shape (32 q / 8 kv x 64) and 3B/8B head_dim 128"
timeout 240 python benchmarks/attention.py --check --time --backends sdpa_cudnn,fa4 --lengths 32768,131072 \
  --json $OUT/attn_hd64.json 2>&1 | grep -v -i warn
timeout 120 python benchmarks/attention.py --time --backends sdpa_cudnn,fa4 --heads 24 --kv-heads 8 --head-dim 128 \
  --lengths 131072 --json $OUT/attn_hd128.json 2>&1 | grep -v -i warn
BEST=$(python - <<'PY'
import json
import os
d = json.load(open(os.environ["OUT"] + "/attn_hd64.json"))
ok = all(r["ok"] is not False for r in d.get("check", []) if r["backend"] == "fa4")
t = {(r["backend"], r["seq"], r["layout"]): r.get("tflops", 0) for r in d.get("time", [])}
fa4, cud = t.get(("fa4", 131072, "causal"), 0), t.get(("sdpa_cudnn", 131072, "causal"), 0)
print("fa4" if ok and fa4 > cud else "auto")
PY
)
echo "backend for the long runs: $BEST"

echo "== throughput, 1B shape: longtrain ($BEST) vs peers"
timeout 330 python benchmarks/throughput.py --sides longtrain,hf,hf_liger --lengths 32768,131072 --docs-lengths "" \
  --attn $BEST --steps 3 --warmup 1 --json $OUT/throughput_best.json 2>&1 | grep -v -i warn | tail -25

echo "== 1M tokens, 1B shape, all switches, in the background (reads: /tmp/mc1m.log)"
setsid nohup python benchmarks/max_context.py --flavors llama3.2-1b --sides longtrain --start 1048576 --max-seq 1048576 \
  --warmup 0 --steps 1 --fused --lt-switches all --timeout 1700 --attn $BEST --json /tmp/mc1m.json \
  > /tmp/mc1m.log 2>&1 < /dev/null &
sleep 20; tail -5 /tmp/mc1m.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader

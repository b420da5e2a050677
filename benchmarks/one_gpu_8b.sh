#!/usr/bin/env bash
# The Llama-3.1-8B shape on one GPU (issue 18, docs/memory.md): `longtrain train recipes/gpu-8b-offload.yaml`
# at 64K without and with parameter offload (the cost of offload), then at the recipe's length with offload
# (393,216 tokens; more with overrides after OUT_DIR).
# Each run logs its per-step time, MFU and peak GPU memory in runs/<name>/metrics.jsonl; host RAM in use
# (MemTotal - MemAvailable, whole machine) is sampled every second beside it.
# Usage (device machine, repo root): setsid bash benchmarks/one_gpu_8b.sh OUT_DIR > OUT_DIR/log 2>&1 &
set -u
out=${1:-/tmp/8b}; shift; mkdir -p "$out"   # further arguments: overrides of the long run
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
host_sampler() {  # peak host RAM in use while $1 runs, in GiB
  python - "$1" <<'PY'
import sys, time, os
peak, pid = 0, int(sys.argv[1])
while os.path.exists(f"/proc/{pid}"):
    m = dict(l.split(":") for l in open("/proc/meminfo"))
    used = (int(m["MemTotal"].split()[0]) - int(m["MemAvailable"].split()[0])) / 2**20
    peak = max(peak, used); time.sleep(1)
print(f"host RAM in use, peak: {peak:.1f} GiB")
PY
}
run() {  # name, overrides...
  local name=$1; shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  local t0=$(date +%s)
  python -m longtrain train recipes/gpu-8b-offload.yaml "run_dir=$out/$name" "$@" > "$out/$name.log" 2>&1 &
  local pid=$!
  host_sampler $pid
  wait $pid; echo "rc $? wall $(( $(date +%s) - t0 )) s"
  grep -E "^step|Error|error|OOM|Killed" "$out/$name.log" | tail -6
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
short="stages.0.seq_len=65536 stages.0.steps=2 memory.offload_activations=false memory.gpu_checkpoint_layers=0 \
  memory.checkpoint_stride=1"
run long-offload "$@"
run 64k-offload $short
run 64k-on-gpu $short memory.offload_params=false memory.master_dtype=auto
echo "=== done $(date -u +%H:%M:%S)"

#!/usr/bin/env bash
# Launch a longtrain command with torchrun on one node, or on several (one invocation per node).
#
# Single node, all local GPUs (or NPROC processes on CPU):
#   launch/torchrun.sh train recipes/tiny-demo.yaml parallel.cp=2
#   NPROC=4 launch/torchrun.sh check-parallel recipes/llama3.1-8b-128k-yarn.yaml --seq-len 8192
# Several nodes: run on every node with the same MASTER_ADDR / MASTER_PORT and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh train recipes/...   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh train recipes/...   # on node 1
#
# Environment: NPROC (processes per node; default: number of GPUs, else 2), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RDZV_ID (a job id shared by the nodes; default longtrain).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 COMMAND [ARGS...]   (COMMAND: train | check-parallel | eval | ...)" >&2
  exit 2
fi

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# Each process gets one GPU; keep CPU threads from oversubscribing the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ "$NNODES" == "1" ]]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m longtrain "$@"
fi
# c10d rendezvous: every node points at node 0's address; torchrun assigns global ranks.
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-longtrain}" \
  -m longtrain "$@"

#!/usr/bin/env bash
# Run the same command on every node:
#   NNODES=2 RDZV_ENDPOINT=node0.example:29500 launch/torchrun-multi-node.sh job.yaml [key=value ...]
# RDZV_ENDPOINT is any one node's host:port that all nodes reach; ranks are assigned by the rendezvous.
# checkpoint.dir must be storage every node sees (s3://, gs://, az://, or a shared filesystem): rank 0
# writes, and after a restart rank 0 (possibly on another node) reads it.
# When a worker on any node dies, every node's torchrun restarts its workers (up to MAX_RESTARTS times)
# and all of them resume from the newest valid checkpoint.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a fresh rendezvous store for each restart; with torch's shared store
# a restarted group can read the old group's addresses and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$NNODES" --nproc-per-node="${NPROC:-gpu}" --max-restarts="${MAX_RESTARTS:-3}" --shutdown-timeout=40 \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-runner}" \
  -m runner train "$@"

#!/usr/bin/env bash
# One machine, one process per GPU:   launch/torchrun-single-node.sh job.yaml [key=value ...]
# CPU only (gloo):                    NPROC=2 launch/torchrun-single-node.sh job.yaml
#
# A worker that dies (crash, OOM, SIGKILL) makes torchrun restart all workers, up to MAX_RESTARTS times;
# each restart resumes from the newest valid checkpoint. SIGTERM/SIGINT to torchrun is forwarded to the
# workers: they commit the step reached and exit 75, torchrun itself exits 1. Run the same command to resume.
# preemption.grace_s (25 s) must stay below torchrun's --shutdown-timeout (SIGTERM -> SIGKILL; set to 40 s here).
set -euo pipefail
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a fresh rendezvous store for each restart; with torch's shared store
# a restarted group can read the old group's addresses and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --standalone --nproc-per-node="${NPROC:-gpu}" --max-restarts="${MAX_RESTARTS:-3}" --shutdown-timeout=40 \
  -m runner train "$@"

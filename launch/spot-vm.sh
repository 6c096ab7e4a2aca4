#!/usr/bin/env bash
# Spot/preemptible VM: relaunch the job until it finishes (exit 0).
#   launch/spot-vm.sh job.yaml [key=value ...]        (NPROC=2 on a CPU-only VM)
# Start it from the VM's startup script or a systemd unit, so that a VM that comes back after a
# preemption picks the job up again; checkpoint.dir must outlive the VM (s3://, gs://, az://, a disk that stays).
# A finished job started again exits 0 at once, so rerunning is always safe.
set -u
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # reliable torchrun restarts (pytorch/pytorch#135712)
stop="" child=""
trap 'stop=1; kill -TERM "$child" 2>/dev/null' TERM INT  # shutdown: forward, let the job save, don't relaunch
tries=0
while :; do
  torchrun --standalone --nproc-per-node="${NPROC:-gpu}" --max-restarts="${MAX_RESTARTS:-3}" --shutdown-timeout=40 \
    -m runner train "$@" &
  child=$!
  wait "$child"; status=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done  # a trap interrupted wait
  [ "$status" -eq 0 ] && exit 0
  [ -n "$stop" ] && exit "$status"
  tries=$((tries + 1))
  if [ "$tries" -ge "${MAX_TRIES:-10}" ]; then
    echo "spot-vm.sh: giving up after $tries failed launches (last status $status)" >&2
    exit "$status"
  fi
  echo "spot-vm.sh: exit status $status; relaunching in 10 s (attempt $((tries + 1)))" >&2
  sleep 10
done

#!/usr/bin/env bash
# The GPU checks, in one command, on a CUDA machine: this machine's own Python and torch (PYTHONPATH=., no venv
# build, no network). Prints the tables; writes benchmarks/results/*.json.
#   bash benchmarks/gpu.sh
# 0. benchmarks/gpu_check.py: fp16 and bf16 training, SIGTERM + resume bit-identical, the checkpoint loaded on the CPU;
# 1. compare.py on one GPU: raw loop vs runner vs Lightning (if installed) on resnet18 with synthetic 224×224
#    images, and the tiny MLP (where per-step overhead shows most);
# 2. runner on 2 processes (DDP, NCCL) when there are 2 GPUs: the same resnet18 job, time per step;
# 3. the checkpoint bench (staging copy, background write, step time during a write) on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
checks=0
python benchmarks/gpu_check.py || checks=$?  # the benchmarks still run: their tables help find out why
python benchmarks/compare.py --device cuda --workloads resnet18,mlp --repeats 3
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  job=$(mktemp -d)/resnet18.yaml
  cat > "$job" <<YAML
model: {name: torchvision.resnet18}
data: {name: synthetic, args: {shape: [3, 224, 224], size: 2048, val_size: 0, num_classes: 10}, batch_size: 64,
       num_workers: 2}
optim: {name: AdamW, lr: 1.0e-3}
train: {max_epochs: 1, progress: plain, device: cuda}
checkpoint: {every_epoch: false, at_end: false}
out_dir: $(dirname "$job")/out
YAML
  for n in 1 2; do
    start=$(date +%s.%N)
    python -m torch.distributed.run --standalone --nproc-per-node=$n -m runner train "$job" resume.mode=never \
      "checkpoint.dir=$(dirname "$job")/ckpt-$n" > /dev/null
    echo "runner resnet18, $n GPU(s), 2048 samples (batch 64 per GPU): $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
  done
fi
RUNNER_BENCH_DEVICE=cuda python benchmarks/checkpoint_bench.py
exit $checks

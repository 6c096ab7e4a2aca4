#!/usr/bin/env bash
# The GPU checks, in one command, on a CUDA machine: this machine's own Python and torch (PYTHONPATH=., no venv
# build, no network). Prints the tables; writes benchmarks/results/*.json.
#   bash benchmarks/gpu.sh
# 0. benchmarks/gpu_check.py: fp16 and bf16 training, SIGTERM + resume bit-identical, the checkpoint loaded on the CPU;
# 1. compare.py on one GPU: raw loop vs runner vs Lightning (if installed), eager and torch.compiled, on resnet18
#    with synthetic 224×224 images, the built-in gpt (nanoGPT's char model) and the tiny MLP (where per-step
#    overhead shows most); then the restart cost of a compiled job (benchmarks/compile_bench.py) on the GPU;
# 2. runner on 2 processes (DDP, NCCL) when there are 2 GPUs: the same resnet18 job, time per step;
# 3. dist.strategy fsdp on up to 2 GPUs: SIGTERM, resume, verify, export on the CPU;
# 4. the checkpoint bench (staging copy, background write, step time during a write) on the GPU.
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
python benchmarks/compare.py --device cuda --workloads resnet18,gpt,mlp --repeats 3
python benchmarks/compile_bench.py --device cuda --repeats 2
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
# 3. dist.strategy fsdp (FSDP2, NCCL) on up to 2 GPUs: examples/gpt-fsdp.yaml in bf16 for 40 steps, every rank
#    writing its shards; SIGTERM after step 24 (step 25 committed, exit 75), the same command resumes it to 40; the
#    shards verify, and the model exports whole on the CPU; then 20 steps in fp16 (GradScaler over the shards).
gpus=$(python -c 'import torch; print(min(2, torch.cuda.device_count()))')
fsdp=$(mktemp -d)
fsdp_train() {
  python -m torch.distributed.run --standalone --nproc-per-node="$gpus" -m runner train examples/gpt-fsdp.yaml \
    "out_dir=$fsdp/gpt" train.device=cuda train.precision=bf16 train.max_steps=40 scheduler.args.total_steps=40 \
    checkpoint.every_steps=10 train.log_every_steps=10 "$@"
}
RUNNER_TEST_SIGNAL_AT_STEP=24 fsdp_train > "$fsdp/stopped.log" 2>&1 || true  # torchrun reports the 75 as 1
grep -E "preempted: step 25 committed" "$fsdp/stopped.log" || { echo "fsdp: no emergency checkpoint"; checks=1; }
fsdp_train | tee "$fsdp/resumed.log" | grep -E "resuming from|done:" || checks=1
grep -q "0 step(s) lost" "$fsdp/resumed.log" || { echo "fsdp resume lost steps"; checks=1; }
python -m runner ckpt verify "$fsdp/gpt/checkpoints" || checks=1
CUDA_VISIBLE_DEVICES= python -m runner export examples/gpt-fsdp.yaml "$fsdp/model.safetensors" "out_dir=$fsdp/gpt" \
  || checks=1
fsdp_train "out_dir=$fsdp/fp16" train.precision=fp16 train.max_steps=20 | grep -E "done:" || checks=1  # GradScaler
RUNNER_BENCH_DEVICE=cuda python benchmarks/checkpoint_bench.py
exit $checks

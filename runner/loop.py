"""The training loop: resume → epochs of train then eval → checkpoint cadence → stop.

`train()` owns the lifecycle; `run()` reads top to bottom; every decision is a call into a module.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__, dist, finetune, preemption
from .components import build_loss, build_model, build_optimizer, build_scheduler
from .config import RunConfig, digest, dump_yaml, to_dict
from .data import Datasets, SeededDataset, ShardedSampler, build_datasets, make_loader, seed_all
from .dist import DistEnv
from .errors import CheckpointError, ConfigError
from .faults import dump_weights, inject_fault
from .metrics import ProgressBar, StepRecord, format_epoch, log, warn, write_history
from .saving import Checkpointer
from .state import Progress, capture, load_bytes, restore

EPOCH_END, MAX_STEPS, PREEMPTED = "epoch end", "max steps", "preempted"


@dataclass
class Job:
    """Everything built from the config; `model` is the plain module, `wrapped` what trains (DDP or not)."""
    cfg: RunConfig
    env: DistEnv
    data: Datasets
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    phases: list
    checkpointer: Checkpointer
    steps: StepRecord
    wrapped: nn.Module | None = None
    phase: int | None = None


def train(cfg: RunConfig) -> int:
    """Entry point: set up, run, and always release the process group. Returns the exit status."""
    env = dist.setup(cfg.dist, cfg.train.device)
    handlers = preemption.install(cfg.preemption.extra_signal, cfg.preemption.grace_s)
    job = None
    try:
        job = build_job(cfg, env)
        return run(job)
    except BaseException:
        if job is not None:  # a crash must not abandon a snapshot half written (bounded: the store may hang)
            job.checkpointer.wait(cfg.preemption.grace_s)
        raise
    finally:
        if job is not None:
            job.steps.close()
        preemption.uninstall(handlers)
        dist.teardown()


def build_job(cfg: RunConfig, env: DistEnv) -> Job:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = build_datasets(cfg.data)
    model, phases, head = build_finetune_model(cfg, data, env)
    model.to(env.device)
    optimizer = build_optimizer(cfg.optim, finetune.param_groups(model, phases, head))
    if cfg.train.precision == "fp16" and env.device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 on CPU")
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    return Job(cfg, env, data, model, build_loss(cfg.train.loss), optimizer,
               build_scheduler(cfg.scheduler, optimizer), scaler, phases,
               Checkpointer(cfg.checkpoint, cfg.checkpoint_dir, env), StepRecord(cfg.out_dir, env.is_main))


def build_finetune_model(cfg: RunConfig, data: Datasets, env: DistEnv | None = None, load_weights: bool = True):
    """The model as training sees it: built, pretrained weights loaded, head replaced; with its phase plan."""
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    head = cfg.finetune.head.module if cfg.finetune.head else None
    phases = [finetune.Phase(p.epochs, tuple(p.train), dict(p.lr_mult)) for p in cfg.finetune.phases]
    finetune.validate_plan(model, phases, head)  # first: a misnamed module fails naming its key, before any load
    if cfg.model.init_from and load_weights:
        log(finetune.load_pretrained(model, cfg.model.init_from, storage_options=cfg.checkpoint.storage_options,
                                     strict=cfg.model.strict, trust_pickle=cfg.model.trust_pickle,
                                     new_head=head), env)
    if cfg.finetune.head:
        finetune.replace_head(model, head, cfg.finetune.head.num_classes)
    return model, phases, head


def run(job: Job) -> int:
    cfg, env = job.cfg, job.env
    progress, sums = resume(job)
    if progress.finished:
        log(f"training already finished at step {progress.step} (checkpoints in {cfg.checkpoint_dir}); "
            "nothing to do. Use another checkpoint.dir or resume.mode=never to train again.", env)
        return 0
    announce(job)
    batch_size = cfg.data.batch_size
    sampler = ShardedSampler(len(job.data.train), env.rank, env.world_size, cfg.train.seed, cfg.data.shuffle,
                             pad=True)
    seeded = SeededDataset(job.data.train, cfg.train.seed)
    loader = make_loader(seeded, sampler, batch_size, cfg.data.num_workers)
    while True:
        enter_phase(job, finetune.phase_at(job.phases, progress.epoch))
        seeded.epoch = progress.epoch
        sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * batch_size)
        outcome = train_epoch(job, loader, progress, sums)
        if outcome == PREEMPTED:
            return emergency_save(job, progress, sums)
        stop_early = end_epoch(job, progress, sums, complete=outcome == EPOCH_END)
        progress.finished = (outcome == MAX_STEPS or stop_early or progress.epoch >= cfg.train.max_epochs
                             or reached_max_steps(cfg, progress))
        # train_epoch leaves a step-cadence save on the epoch's or the run's last step to here (after end_epoch)
        if ((outcome == EPOCH_END and cfg.checkpoint.every_epoch) or (progress.finished and cfg.checkpoint.at_end)
                or job.checkpointer.step_due(progress.step)):
            save(job, progress, sums)
        if progress.finished:
            break
    if not job.checkpointer.wait():
        warn("the final checkpoint was not saved; see the error above", env)
    dist.barrier(env)  # nobody tears the group down while rank 0 is still writing
    dump_weights(job.model, env)
    log(f"done: {progress.step} steps, {progress.epoch} epochs", env)
    return 0


def train_epoch(job: Job, loader, progress: Progress, sums: list[float]) -> str:
    """Train until the epoch ends, max_steps is reached, or a stop is requested (agreed by all ranks)."""
    cfg, env = job.cfg, job.env
    total = progress.batch_in_epoch + len(loader)
    bar = ProgressBar(show_bar(cfg, env), total, progress.epoch, cfg.train.max_epochs, progress.batch_in_epoch)
    for x, y in loader:
        group_start = progress.batch_in_epoch - progress.batch_in_epoch % cfg.train.accumulate
        group_size = min(cfg.train.accumulate, total - group_start)
        progress.batch_in_epoch += 1
        boundary = progress.batch_in_epoch - group_start == group_size
        bar.update(forward_backward(job, x, y, sums, group_size, sync=boundary))
        if not boundary:
            continue
        optimizer_step(job)
        progress.step += 1
        if job.scheduler is not None and cfg.scheduler.interval == "step":
            job.scheduler.step()
        job.steps.write(progress.step)
        inject_fault(progress.step, env)
        stop, save_now = dist.any_rank([preemption.requested() is not None, job.checkpointer.due(progress.step)], env)
        if stop:
            bar.close()
            return PREEMPTED
        if reached_max_steps(cfg, progress) and progress.batch_in_epoch < total:
            bar.close()
            return MAX_STEPS
        if save_now and progress.batch_in_epoch < total:  # at the epoch's end, end_epoch's save covers it
            save(job, progress, sums)
    bar.close()
    return EPOCH_END


def forward_backward(job: Job, x, y, sums: list[float], group_size: int, sync: bool) -> float:
    x, y = x.to(job.env.device, non_blocking=True), y.to(job.env.device, non_blocking=True)
    model = job.wrapped
    no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with autocast(job):
            out = model(x)
            loss = job.loss_fn(out, y)
        job.scaler.scale(loss / group_size).backward()
    add_batch(sums, out, y, loss.detach().float().item() * len(y))
    return loss.item()


def add_batch(sums: list[float], out, y, loss_sum: float) -> None:
    """Running [loss sum, correct, count]; accuracy only for class-index targets."""
    sums[0] += loss_sum
    if not y.is_floating_point() and out.dim() == 2:
        sums[1] += (out.argmax(1) == y).sum().item()
    sums[2] += len(y)


def optimizer_step(job: Job) -> None:
    if job.cfg.train.grad_clip:
        job.scaler.unscale_(job.optimizer)
        params = [p for p in job.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, job.cfg.train.grad_clip)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)


def autocast(job: Job):
    precision = job.cfg.train.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(job.env.device.type, dtype=dtype, enabled=dtype is not None)


def end_epoch(job: Job, progress: Progress, sums: list[float], complete: bool) -> bool:
    """Reduce train metrics, evaluate, record history, step the epoch scheduler; True → stop early.

    Also called when max_steps ends an epoch early (complete=False): the run's last weights get evaluated,
    and the position stays where training stopped.
    """
    cfg, env = job.cfg, job.env
    loss_sum, correct, count = dist.all_sum(sums, env)
    metrics = {"epoch": progress.epoch, "step": progress.step, "train_loss": loss_sum / max(count, 1)}
    if correct or job.data.num_classes:
        metrics["train_acc"] = correct / max(count, 1)
    metrics.update(evaluate(job))
    metrics["lr"] = job.optimizer.param_groups[-1]["lr"]
    sums[:] = [0.0, 0.0, 0.0]
    if job.scheduler is not None and cfg.scheduler.interval == "epoch":
        step_epoch_scheduler(job, metrics)
    progress.history.append(metrics)
    if complete:
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    stop = early_stopping(cfg, progress, metrics)
    log(format_epoch(metrics) + (" — early stop" if stop else ""), env)
    if env.is_main:
        write_history(Path(cfg.out_dir) / "metrics.jsonl", progress.history)
    return stop


def evaluate(job: Job) -> dict:
    """Sharded, unpadded evaluation of the plain module; sums over ranks count every sample once."""
    if job.data.val is None:
        return {}
    cfg, env, model = job.cfg, job.env, job.model
    dist.broadcast_buffers(model, env)  # BatchNorm statistics drift per rank; evaluate (and save) rank 0's
    sampler = ShardedSampler(len(job.data.val), env.rank, env.world_size, 0, shuffle=False, pad=False)
    loader = make_loader(job.data.val, sampler, cfg.data.eval_batch_size or cfg.data.batch_size,
                         cfg.data.num_workers)
    per_sample = copy.copy(job.loss_fn)
    if hasattr(per_sample, "reduction"):
        per_sample.reduction = "none"  # sum per-sample losses in float64: independent of batching
    sums = [0.0, 0.0, 0.0]
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(job):
        for x, y in loader:
            x, y = x.to(env.device), y.to(env.device)
            out = model(x)
            loss = per_sample(out, y)
            loss_sum = loss.double().sum().item() if loss.dim() else loss.item() * len(y)
            add_batch(sums, out, y, loss_sum)
    model.train(was_training)
    loss_sum, correct, count = dist.all_sum(sums, env)
    metrics = {"val_loss": loss_sum / max(count, 1)}
    if job.data.num_classes:
        metrics["val_acc"] = correct / max(count, 1)
    return metrics


def step_epoch_scheduler(job: Job, metrics: dict) -> None:
    if isinstance(job.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        job.scheduler.step(metric_value(metrics, job.cfg.scheduler.monitor, "scheduler.monitor"))
    else:
        job.scheduler.step()


def early_stopping(cfg: RunConfig, progress: Progress, metrics: dict) -> bool:
    es = cfg.train.early_stopping
    if not es.metric:
        return False
    value = metric_value(metrics, es.metric, "train.early_stopping.metric")
    if es.mode == "min":
        improved = progress.best is None or value < progress.best - es.min_delta
    else:
        improved = progress.best is None or value > progress.best + es.min_delta
    progress.best, progress.bad_epochs = (value, 0) if improved else (progress.best, progress.bad_epochs + 1)
    return progress.bad_epochs >= es.patience


def metric_value(metrics: dict, name: str, key: str) -> float:
    if name not in metrics:
        raise ConfigError(f"{key}: no metric '{name}'; this run has {', '.join(metrics)}")
    return metrics[name]


def reached_max_steps(cfg: RunConfig, progress: Progress) -> bool:
    return cfg.train.max_steps is not None and progress.step >= cfg.train.max_steps


def enter_phase(job: Job, index: int) -> None:
    """Apply the fine-tune phase for this epoch; (re)build DDP when what trains changes."""
    head = job.cfg.finetune.head.module if job.cfg.finetune.head else None
    if job.wrapped is None or index != job.phase:
        finetune.apply_phase(job.model, job.phases, index, head, job.cfg.finetune.freeze_bn)
        finetune.apply_lr_mults(job.optimizer, job.scheduler, job.phases, index)
        # DDP registers only parameters that require grad when it is built: rebuild so unfrozen ones sync.
        job.wrapped, job.phase = dist.wrap(job.model, job.env), index
        if index >= 0:
            log(f"phase {index + 1}/{len(job.phases)}: training {', '.join(job.phases[index].train)}", job.env)
    finetune.set_train_mode(job.model, job.phases, index, head, job.cfg.finetune.freeze_bn)


def show_bar(cfg: RunConfig, env: DistEnv) -> bool:
    return env.is_main and (cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty()))


# --- checkpoints -------------------------------------------------------------------------------------------

def meaning_digest(cfg: RunConfig) -> str:
    """What a checkpoint means: changing any of these makes resuming it wrong, not just different."""
    parts = [digest(cfg.model), digest(cfg.data), digest(cfg.finetune), cfg.optim.name, str(cfg.train.seed)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def save(job: Job, progress: Progress, sums: list[float], emergency: bool = False) -> None:
    """All ranks call (RNG and running sums are gathered); rank 0 hands the snapshot to the writer."""
    data = capture(job.model, job.optimizer, job.scheduler, job.scaler, progress, sums, job.env)
    meta = {
        "step": progress.step, "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch,
        "samples_in_epoch": progress.samples_in_epoch(job.cfg.data.batch_size, job.env.world_size),
        "world_size": job.env.world_size, "finished": progress.finished,
        "metrics": progress.history[-1] if progress.history else {},
        "meaning_digest": meaning_digest(job.cfg), "config": to_dict(job.cfg),
        "runner_version": __version__, "torch_version": torch.__version__,
    }
    job.checkpointer.save(data, meta, emergency)


def resume(job: Job) -> tuple[Progress, list[float]]:
    """Pick the checkpoint on rank 0, agree on it, and load it on every rank; or start fresh."""
    cfg, env = job.cfg, job.env
    choice, data = job.checkpointer.find_resume(cfg.resume.mode) if env.is_main else (None, None)
    found = dist.broadcast(None if choice is None else (choice.url, choice.manifest), env)
    if found is None:
        log("fresh start: no checkpoint to resume" + ("" if cfg.resume.mode == "never" else f" in {cfg.checkpoint_dir}"),
            env)
        seed_all(hash((cfg.train.seed, env.rank)) & 0x7FFF_FFFF)  # per-rank randomness, reproducible
        return Progress(), [0.0, 0.0, 0.0]
    url, manifest = found
    check_compatible(cfg, env, manifest, url)
    state = load_bytes(data if env.is_main else job.checkpointer.store.read(url), url)
    progress, sums = restore(state, job.model, job.optimizer, job.scheduler, job.scaler, env)
    job.checkpointer.last_committed = progress.step
    lost = max(0, job.steps.last() - progress.step)
    log(f"resuming from {url}: step {progress.step}, epoch {progress.epoch + 1}, "
        f"batch {progress.batch_in_epoch} of the epoch; {lost} step(s) lost since that checkpoint", env)
    return progress, sums


def check_compatible(cfg: RunConfig, env: DistEnv, manifest: dict, url: str) -> None:
    if manifest.get("meaning_digest") != meaning_digest(cfg) and not cfg.resume.allow_config_change:
        raise CheckpointError(f"{url} was written by a job with another model, data, fine-tune plan, optimizer "
                              "or seed; resume it with the original job file, start fresh with "
                              "resume.mode=never (or another checkpoint.dir), or set resume.allow_config_change=true")
    saved = manifest.get("world_size")
    if saved != env.world_size and not cfg.resume.allow_world_size_change:
        raise CheckpointError(f"{url} was written with world size {saved}, this run has {env.world_size}; the data "
                              "order depends on it. Relaunch with the same number of processes or set "
                              "resume.allow_world_size_change=true")


def emergency_save(job: Job, progress: Progress, sums: list[float]) -> int:
    """Stop requested: commit the step reached within the grace period, then exit 'preempted'.

    The grace period counts from the signal. Every rank returns rank 0's outcome (only rank 0 writes).
    """
    cfg, env, ckpt = job.cfg, job.env, job.checkpointer
    t0, end = time.monotonic(), preemption.deadline(cfg.preemption.grace_s)
    log(f"{preemption.requested() or 'stop requested by another rank'}: saving step {progress.step} "
        "before exiting", env)
    ckpt.wait(max(end - time.monotonic(), 0.0))  # a periodic write in flight finishes (or fails) first
    # Still writing when the time is up: starting another save would block on it past the grace period.
    if not dist.broadcast(ckpt.writer is not None, env):
        save(job, progress, sums, emergency=True)
        ckpt.wait(max(end - time.monotonic(), 0.0))
    if not dist.broadcast(ckpt.last_committed == progress.step, env):
        if env.is_main:
            what = (f"did not complete within preemption.grace_s={cfg.preemption.grace_s:g}"
                    if ckpt.writer is not None else "failed (see the error above)")
            last = "none" if ckpt.last_committed is None else ckpt.last_committed
            warn(f"emergency checkpoint of step {progress.step} {what}; the last committed step is {last}; "
                 f"exiting with status {preemption.EMERGENCY_SAVE_FAILED_EXIT}", env)
        return preemption.EMERGENCY_SAVE_FAILED_EXIT
    log(f"preempted: step {progress.step} committed in {time.monotonic() - t0:.1f}s; exiting with status "
        f"{preemption.PREEMPTED_EXIT}; run the same command to resume", env)
    return preemption.PREEMPTED_EXIT


def announce(job: Job) -> None:
    """Rank 0 prints and stores the resolved config once per start."""
    cfg, env = job.cfg, job.env
    if not env.is_main:
        return
    text = dump_yaml(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(text)
    log("resolved config:\n" + text.rstrip(), env)
    log(f"world size {env.world_size}, device {env.device}, global batch {cfg.data.batch_size * env.world_size} "
        f"({cfg.data.batch_size} per rank)", env)

"""The training loop: resume → epochs of train then eval → checkpoint cadence → stop.

`train()` owns the lifecycle; `run()` reads top to bottom; every decision is a call into a module: building
the job (job.py), the save/resume protocol (checkpointer.py), the stop agreement (preemption.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, dist, finetune, preemption
from .checkpointer import Checkpointer
from .compiler import CompileCache, compile_model
from .config import RunConfig, dump_yaml
from .console import ProgressBar, format_epoch, log
from .data import MicroBatch, SeededDataset, ShardedSampler, make_loader, micro_batches, to_device
from .dist import DistEnv
from .errors import ConfigError, RunnerError
from .events import EVENTS, EventLog
from .job import Job, build_job
from .records import StepRecord, write_history
from .state import TrainState
from .trackers import Trackers, launch_line
from .test_hooks import count_host_syncs, dump_weights, inject_fault, planned_faults, slow_eval_batch
from .watchdog import Watchdog

EPOCH_END, MAX_STEPS, PREEMPTED, EARLY_STOP = "epoch end", "max steps", "preempted", "early stop"


@dataclass
class Launch:
    """What this process start keeps besides the training state: the last-step record (steps lost at the next
    start), the event log (runner report), the experiment trackers (TensorBoard, MLflow, W&B, CSV), the cloud-notice
    watcher, the agreement on stopping and saving, the progress watchdog, and with train.compile the compile cache."""
    steps: StepRecord
    events: EventLog
    trackers: Trackers
    notices: preemption.NoticeStop | None = None
    agreement: preemption.StopAgreement | None = None
    ckpt: Checkpointer | None = None
    compile_cache: CompileCache | None = None
    watchdog: Watchdog | None = None
    faults: dict = field(default_factory=dict)  # test_hooks.planned_faults
    finished: bool = False  # this launch ended the run (the trackers log its summary)


def train(cfg: RunConfig) -> int:
    """Entry point: set up, run, and always release the process group and the store's lease. Returns the
    exit status."""
    is_main = os.environ.get("RANK", "0") == "0"
    launch = Launch(StepRecord(cfg.out_dir, is_main), EventLog(Path(cfg.out_dir) / EVENTS, is_main),
                    Trackers(cfg, is_main))
    launch.events.emit("start", world_size=int(os.environ.get("WORLD_SIZE", "1")), host=socket.gethostname(),
                       torch_version=torch.__version__, runner_version=__version__, pid=os.getpid(),
                       restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    env = dist.setup(cfg.dist, cfg.train.device)
    dist.set_deterministic(env.device, cfg.train.deterministic)
    count_host_syncs(env.rank)
    launch.faults = planned_faults(env.rank)
    handlers = preemption.install(cfg.preemption.extra_signal, cfg.preemption.grace_s)
    launch.notices = preemption.NoticeStop(cfg.preemption, launch.events,
                                           last_save_s=lambda: launch.ckpt.last_save_took_s if launch.ckpt else None)
    ckpt, status, job = None, 1, None
    try:
        job = build_job(cfg, env)
        ckpt = launch.ckpt = Checkpointer(cfg, env, launch.events)
        if cfg.train.compile.enabled:
            launch.compile_cache = CompileCache(cfg, env, ckpt.store, launch.events)
        status = run(job, ckpt, launch)
        return status
    except RunnerError as e:
        status = e.exit_status
        raise
    finally:
        if ckpt is not None:  # a crash must not abandon a snapshot half written (bounded: the store may hang)
            ckpt.close(cfg.preemption.grace_s)
        if launch.compile_cache is not None:
            launch.compile_cache.close(cfg.preemption.grace_s)
        launch.steps.close()
        launch.events.timers.switch("other")
        launch.events.emit("exit", status=status, step=launch.events.step)
        launch.events.close()
        # after the exit record, so the goodput totals count this launch whole
        launch.trackers.close(status, launch.finished, job.model if launch.finished else None, launch.events.step)
        launch.notices.close()
        if launch.watchdog is not None:
            launch.watchdog.close()
        preemption.uninstall(handlers)
        dist.teardown()


def run(job: Job, ckpt: Checkpointer, launch: Launch) -> int:
    cfg, env = job.cfg, job.env
    state = ckpt.start(job, launch.steps.last())
    if state.finished:
        log(f"training already finished at step {state.step} (run {ckpt.lineage.run_id} in {cfg.checkpoint_dir}); "
            "nothing to do. To train longer raise train.max_epochs or train.max_steps; for a new run use another "
            "checkpoint.dir", env)
        return 0
    announce(job)
    if launch.compile_cache is not None:
        launch.compile_cache.restore()  # before the first compiled step
    launch.trackers.open(state.step, ckpt.lineage.run_id, ckpt.tracker_ids,
                         launch_line(state.step, max(0, launch.steps.last() - state.step), env.world_size,
                                     int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))))
    sampler = ShardedSampler(len(job.data.train), env.rank, env.world_size, cfg.train.seed, cfg.data.shuffle,
                             pad=True)
    seeded = SeededDataset(job.data.train, cfg.train.seed)
    loader = make_loader(seeded, sampler, cfg.data.batch_size, cfg.data.num_workers, env.device.type == "cuda")
    launch.agreement = preemption.StopAgreement(env)
    state.sums = state.sums.to(env.device)
    launch.watchdog = Watchdog(cfg.watchdog, env.rank, env.world_size, cfg.out_dir, launch.events, state.step)
    while True:
        enter_phase(job, finetune.phase_at(job.phases, state.epoch))
        seeded.epoch = state.epoch
        sampler.set_epoch(state.epoch, start=state.sample_in_epoch)
        outcome = train_epoch(job, ckpt, launch, loader, state)
        if outcome != PREEMPTED:
            if cfg.data.num_workers and job.data.val is not None:
                before_fork(ckpt, launch)  # the validation loader forks its workers too
            outcome = end_epoch(job, state, launch, outcome)
        if outcome == PREEMPTED:
            launch.watchdog.close()  # the stop's own deadline governs from here (preemption.py)
            launch.events.emit("stop_request", step=state.step, reason=preemption.requested() or "another rank")
            status = ckpt.emergency_save(job, state, launch.agreement.deadline(cfg.preemption.grace_s))
            launch.notices.acknowledge(status)  # committed: the VM may go now
            return status
        launch.trackers.log_epoch(state.history[-1])
        if not math.isfinite(state.history[-1]["train_loss"]):
            ckpt.raise_diverged(state, "non-finite loss")
        state.finished = (outcome in (MAX_STEPS, EARLY_STOP) or state.epoch >= cfg.train.max_epochs
                          or reached_max_steps(cfg, state))
        ckpt.maybe_save(job, state, epoch_end=outcome != MAX_STEPS)
        if state.finished:
            break
    launch.events.timers.switch("other")
    launch.watchdog.close()  # the final write may take its time: ckpt.finish waits for it
    if launch.compile_cache is not None:
        launch.compile_cache.save_if_grown()  # the last epoch's evaluation may have compiled
    status = ckpt.finish(state)
    launch.finished = status == 0
    dist.barrier(env)  # nobody tears the group down while rank 0 is still writing
    dump_weights(job.model, env)
    log(f"done: {state.step} steps, {state.epoch} epochs", env)
    return status


def train_epoch(job: Job, ckpt: Checkpointer, launch: Launch, loader, state: TrainState) -> str:
    """Train until the epoch ends, max_steps is reached, or a stop is agreed by all ranks.

    No host sync per step: the running sums stay on the device and are read every train.log_every_steps, and
    the agreement on stopping and saving of one step travels while the next step computes.
    """
    cfg, env = job.cfg, job.env
    if reached_max_steps(cfg, state) and len(loader):  # stopped on the max_steps step, before end_epoch ran
        return MAX_STEPS
    if cfg.data.num_workers:
        before_fork(ckpt, launch)
    launch.watchdog.expect_slow()  # the loader's workers start, a new shape may compile
    with progress_bar(cfg, env, state, len(loader)) as bar:
        for micro in micro_batches(loader, job.accumulate, cfg.data.batch_size):
            if micro.first and launch.agreement.stop_agreed(settle=True):
                return PREEMPTED  # a stop during the start (resume, the loader's first batch) takes no step first
            state.sample_in_epoch += micro.samples * env.world_size
            forward_backward(job, micro, state)
            bar.advance()
            if micro.sync:
                outcome = end_step(job, ckpt, launch, state, bar, last=micro.last)
                if outcome is not None:
                    return outcome
    return EPOCH_END


def forward_backward(job: Job, micro: MicroBatch, state: TrainState) -> None:
    """One micro-batch: the step's loss, divided by the group size, backward (DDP syncs gradients on the group's
    last only), then what the step measured added to the running sums on the device."""
    batch = to_device(micro.batch, job.env.device, non_blocking=True)
    model = job.wrapped
    with dist.gradient_sync(model, micro.sync):
        with autocast(job):
            loss, outputs = job.step_fn(model, batch, training=True)
        # no division (and no autograd node for it) without accumulation: on a small model each op shows
        job.scaler.scale(loss / micro.group_size if micro.group_size > 1 else loss).backward()
    if state.metric_names is None and (names := job.step_fn.metric_names(outputs)) is not None:
        state.track_metrics(names)  # the run's first step names the metrics
    job.step_fn.add(state.sums, state.metric_names, loss, outputs, micro.samples)


def end_step(job: Job, ckpt: Checkpointer, launch: Launch, state: TrainState, bar: ProgressBar,
             last: bool) -> str | None:
    """What ends an accumulation group: the optimizer step, then the records, a log step, the ranks' agreement on
    stopping and saving, a periodic save. PREEMPTED or MAX_STEPS end the epoch here."""
    cfg = job.cfg
    optimizer_step(job)
    if dist.is_sharded(job.model):  # BatchNorm statistics drift per rank, and a sharded checkpoint keeps one
        dist.broadcast_buffers(job.model, job.env)  # rank's copy: all take rank 0's, as DDP's forward does
    state.step += 1
    if job.scheduler is not None and cfg.scheduler.interval == "step":
        job.scheduler.step()
    launch.steps.write(state.step)
    launch.events.after_step(state.step)
    launch.watchdog.beat(state.step)
    if launch.compile_cache is not None:
        launch.compile_cache.save_if_grown()
    inject_fault(state.step, job.env.rank, launch.faults)
    if state.step % cfg.train.log_every_steps == 0:
        loss = running_loss(job, ckpt, state)
        bar.show(loss)
        launch.trackers.log_step(state.step, loss, job.optimizer.param_groups[-1]["lr"])
    final = reached_max_steps(cfg, state)
    decision = launch.agreement.after_step(*ckpt.poll(), settle=last or final)
    if decision.broken:
        ckpt.raise_broken()
    if decision.stop:
        return PREEMPTED
    if final and not last:
        return MAX_STEPS
    if not last:  # at the epoch's end, the save after end_epoch covers it
        ckpt.maybe_save(job, state, due_now=decision.save_now)
    return None


def running_loss(job: Job, ckpt: Checkpointer, state: TrainState) -> float:
    """The epoch's mean training loss so far over all ranks (a host read and a collective: log steps only);
    a non-finite one stops the run before anything non-finite can be saved."""
    loss_sum, _, count, *_ = dist.all_sum(state.sums, job.env)
    if not math.isfinite(loss_sum):
        ckpt.raise_diverged(state, "non-finite loss")
    return loss_sum / max(count, 1)


def optimizer_step(job: Job) -> None:
    """Unscale and clip (train.grad_clip) the gradients, step the optimizer and the GradScaler, zero the grads."""
    if job.cfg.train.grad_clip:
        job.scaler.unscale_(job.optimizer)
        params = [p for p in job.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, job.cfg.train.grad_clip)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)


def autocast(job: Job):
    dtype = dist.HALF_PRECISION.get(job.cfg.train.precision)
    # building a disabled torch.autocast each step costs more than the step of a tiny model; a sharded model casts
    # by its MixedPrecisionPolicy (dist.shard)
    if dtype is None or dist.is_sharded(job.model):
        return contextlib.nullcontext()
    return torch.autocast(job.env.device.type, dtype=dtype)


def end_epoch(job: Job, state: TrainState, launch: Launch, outcome: str) -> str:
    """Reduce train metrics, evaluate, record history, step the epoch scheduler; returns `outcome`, EARLY_STOP,
    or PREEMPTED when a stop cut the evaluation (nothing changed: the resumed run evaluates the epoch again).

    When max_steps ends an epoch early (outcome MAX_STEPS) the run's last weights get evaluated and recorded
    as partial, and nothing else moves: no scheduler or early-stopping step, the running sums and the
    position stay where training stopped, so a run extended from here goes on as if it had never stopped.
    A partial record is replaced by the next record of the run (a later partial one, or the full epoch's).
    """
    cfg, env, events = job.cfg, job.env, launch.events
    complete = outcome != MAX_STEPS
    names = state.metric_names or []
    loss_sum, correct, count, *metric_sums = dist.all_sum(state.sums, env)
    # the epoch numbered as everywhere a user reads one (log, ckpt ls, metrics.jsonl): from 1
    metrics = {"epoch": state.epoch + 1, "step": state.step, "train_loss": loss_sum / max(count, 1)}
    if job.step_fn.accuracy and (correct or job.data.num_classes):
        metrics["train_acc"] = correct / max(count, 1)
    metrics.update({f"train_{name}": value / max(count, 1) for name, value in zip(names, metric_sums)})
    with events.timers.during("eval"):
        launch.watchdog.expect_slow()
        val = evaluate(job, names, launch.agreement, launch.watchdog.beat)
    if val is None:
        log(f"evaluation of epoch {metrics['epoch']} cut by the stop request; the resumed run evaluates it again",
            env)
        return PREEMPTED
    metrics.update(val)
    metrics["lr"] = job.optimizer.param_groups[-1]["lr"]
    if complete:
        state.reset_sums()
        if job.scheduler is not None and cfg.scheduler.interval == "epoch":
            step_epoch_scheduler(job, metrics)
    else:
        metrics["partial"] = True
    if cfg.checkpoint.keep_best:  # before any save: a misspelled metric must not rank (and prune) by nothing
        metric_value(metrics, cfg.checkpoint.metric, "checkpoint.metric")
    if state.history and state.history[-1].get("partial"):
        state.history.pop()
    state.history.append(metrics)
    events.emit("epoch", step=state.step, epoch=metrics["epoch"], metrics=metrics)
    stop = False
    if complete:
        state.epoch, state.sample_in_epoch = state.epoch + 1, 0
        stop = early_stopping(cfg, state, metrics)
    log(format_epoch(metrics) + (" — early stop" if stop else ""), env)
    if env.is_main:
        write_history(Path(cfg.out_dir) / "metrics.jsonl", state.history)
    return EARLY_STOP if stop else outcome


def evaluate(job: Job, names: list[str], agreement: preemption.StopAgreement | None = None,
             beat=lambda: None) -> dict | None:
    """Sharded, unpadded evaluation of the plain module; sums over ranks count every sample once. With train.step:
    its loss and metrics `names` averaged over samples. None: a stop request, agreed by all ranks after a batch
    that every rank has (unpadded shares differ by one sample), cut it."""
    if job.data.val is None:
        return {}
    cfg, env, model = job.cfg, job.env, job.model
    dist.broadcast_buffers(model, env)  # BatchNorm statistics drift per rank; evaluate (and save) rank 0's
    sampler = ShardedSampler(len(job.data.val), env.rank, env.world_size, 0, shuffle=False, pad=False)
    batch_size, left = cfg.data.eval_batch_size or cfg.data.batch_size, len(sampler)
    common = math.ceil(len(job.data.val) // env.world_size / batch_size)  # batches of the smallest share
    most = math.ceil(math.ceil(len(job.data.val) / env.world_size) / batch_size)  # and of the largest
    loader = make_loader(job.data.val, sampler, batch_size, cfg.data.num_workers, env.device.type == "cuda")
    sums = torch.zeros(3 + len(names), dtype=torch.float64, device=env.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(job):
        for index, batch in enumerate(loader):
            slow_eval_batch()
            loss, outputs = job.step_fn(model, to_device(batch, env.device), training=False)
            job.step_fn.add(sums, names, loss, outputs, min(batch_size, left - index * batch_size))
            beat()  # progress, for the watchdog
            if agreement is not None and index < common and agreement.stop_agreed(settle=index + 1 == common):
                model.train(was_training)
                return None
        if dist.is_sharded(model) and 0 < len(loader) < most:  # each forward all-gathers: as many on every rank
            job.step_fn(model, to_device(batch, env.device), training=False)
    model.train(was_training)
    loss_sum, correct, count, *metric_sums = dist.all_sum(sums, env)
    metrics = {"val_loss": loss_sum / max(count, 1)}
    if job.step_fn.accuracy and job.data.num_classes:
        metrics["val_acc"] = correct / max(count, 1)
    metrics.update({f"val_{name}": value / max(count, 1) for name, value in zip(names, metric_sums)})
    return metrics


def step_epoch_scheduler(job: Job, metrics: dict) -> None:
    if isinstance(job.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        job.scheduler.step(metric_value(metrics, job.cfg.scheduler.monitor, "scheduler.monitor"))
    else:
        job.scheduler.step()


def early_stopping(cfg: RunConfig, state: TrainState, metrics: dict) -> bool:
    es = cfg.train.early_stopping
    if not es.metric:
        return False
    value = metric_value(metrics, es.metric, "train.early_stopping.metric")
    if es.mode == "min":
        improved = state.best is None or value < state.best - es.min_delta
    else:
        improved = state.best is None or value > state.best + es.min_delta
    state.best, state.bad_epochs = (value, 0) if improved else (state.best, state.bad_epochs + 1)
    return state.bad_epochs >= es.patience


def metric_value(metrics: dict, name: str, key: str) -> float:
    if name not in metrics:
        raise ConfigError(f"{key}: no metric '{name}'; this run has {', '.join(metrics)}")
    return metrics[name]


def reached_max_steps(cfg: RunConfig, state: TrainState) -> bool:
    return cfg.train.max_steps is not None and state.step >= cfg.train.max_steps


def enter_phase(job: Job, index: int) -> None:
    """Apply the fine-tune phase for this epoch; (re)build DDP when what trains changes."""
    head = job.cfg.finetune.head.module if job.cfg.finetune.head else None
    if job.wrapped is None or index != job.phase:
        finetune.apply_phase(job.model, job.phases, index, head, job.cfg.finetune.freeze_bn)
        finetune.apply_lr_mults(job.optimizer, job.scheduler, job.phases, index)
        # DDP registers only parameters that require grad when it is built: rebuild so unfrozen ones sync.
        job.wrapped, job.phase = dist.wrap(job.model, job.env), index
        if job.cfg.train.compile.enabled:
            compile_model(job.model, job.wrapped, job.step_fn, job.cfg)
        if index >= 0:
            log(f"phase {index + 1}/{len(job.phases)}: training {', '.join(job.phases[index].train)}", job.env)
    finetune.set_train_mode(job.model, job.phases, index, head, job.cfg.finetune.freeze_bn)


def before_fork(ckpt: Checkpointer, launch: Launch) -> None:
    """Writer threads finish before DataLoader workers fork (Checkpointer.before_fork says why)."""
    ckpt.before_fork()
    if launch.compile_cache is not None:
        launch.compile_cache.wait()


def progress_bar(cfg: RunConfig, env: DistEnv, state: TrainState, batches: int) -> ProgressBar:
    """The epoch's bar on rank 0's terminal (train.progress), counting this rank's micro-batches, those done first."""
    show = env.is_main and (cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty()))
    done = state.sample_in_epoch // (cfg.data.batch_size * env.world_size)
    return ProgressBar(show, done + batches, state.epoch, cfg.train.max_epochs, done)


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
    accumulated = f" × {job.accumulate} accumulated" if job.accumulate > 1 else ""
    log(f"world size {env.world_size}, device {env.device}, global batch "
        f"{cfg.data.batch_size * env.world_size * job.accumulate} ({cfg.data.batch_size} per rank{accumulated})", env)

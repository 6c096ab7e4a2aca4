"""The training loop: resume → epochs of train then eval → checkpoint cadence → stop.

`train()` owns the lifecycle; `run()` reads top to bottom; every decision is a call into a module: building
the job (job.py), the save/resume protocol (checkpointer.py), the stop agreement (preemption.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, dist, finetune, notices, preemption
from .checkpointer import Checkpointer
from .config import RunConfig, dump_yaml
from .data import SeededDataset, ShardedSampler, make_loader, to_device
from .dist import DistEnv
from .errors import ConfigError, RunnerError
from .events import EVENTS, EventLog
from .faults import count_host_syncs, dump_weights, inject_fault, slow_eval_batch
from .job import Job, build_job
from .metrics import ProgressBar, StepRecord, format_epoch, log, warn, write_history
from .state import TrainState
from .step import add_step, call_step, pair
from .tensorboard import TensorBoard

EPOCH_END, MAX_STEPS, PREEMPTED, EARLY_STOP = "epoch end", "max steps", "preempted", "early stop"


@dataclass
class Launch:
    """What this process start keeps besides the training state: the last-step record (steps lost at the next
    start), the event log (runner report), the TensorBoard writer and the agreement on stopping and saving."""
    steps: StepRecord
    events: EventLog
    tensorboard: TensorBoard
    agreement: preemption.StopAgreement | None = None
    ckpt: Checkpointer | None = None
    watcher: notices.NoticeWatcher | None = None


def train(cfg: RunConfig) -> int:
    """Entry point: set up, run, and always release the process group and the store's lease. Returns the
    exit status."""
    is_main = os.environ.get("RANK", "0") == "0"
    launch = Launch(StepRecord(cfg.out_dir, is_main), EventLog(Path(cfg.out_dir) / EVENTS, is_main),
                    TensorBoard(cfg.out_dir, is_main and cfg.metrics.tensorboard))
    launch.events.emit("start", world_size=int(os.environ.get("WORLD_SIZE", "1")), host=socket.gethostname(),
                       torch_version=torch.__version__, runner_version=__version__, pid=os.getpid(),
                       restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    env = dist.setup(cfg.dist, cfg.train.device)
    dist.set_deterministic(env.device, cfg.train.deterministic)
    count_host_syncs(env.rank)
    handlers = preemption.install(cfg.preemption.extra_signal, cfg.preemption.grace_s)
    launch.watcher = watch_notices(cfg, launch)
    ckpt, status = None, 1
    try:
        job = build_job(cfg, env)
        ckpt = launch.ckpt = Checkpointer(cfg, env, launch.events)
        status = run(job, ckpt, launch)
        return status
    except RunnerError as e:
        status = e.exit_status
        raise
    finally:
        if ckpt is not None:  # a crash must not abandon a snapshot half written (bounded: the store may hang)
            ckpt.close(cfg.preemption.grace_s)
        launch.steps.close()
        launch.tensorboard.close()
        launch.events.timers.switch("other")
        launch.events.emit("exit", status=status, step=launch.events.step)
        launch.events.close()
        if launch.watcher is not None:
            launch.watcher.stop(timeout=0)
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
    launch.tensorboard.open(state.step)
    sampler = ShardedSampler(len(job.data.train), env.rank, env.world_size, cfg.train.seed, cfg.data.shuffle,
                             pad=True)
    seeded = SeededDataset(job.data.train, cfg.train.seed)
    loader = make_loader(seeded, sampler, cfg.data.batch_size, cfg.data.num_workers, env.device.type == "cuda")
    launch.agreement = preemption.StopAgreement(env)
    state.sums = state.sums.to(env.device)
    while True:
        enter_phase(job, finetune.phase_at(job.phases, state.epoch))
        seeded.epoch = state.epoch
        sampler.set_epoch(state.epoch, start=state.sample_in_epoch)
        outcome = train_epoch(job, ckpt, launch, loader, state)
        if outcome != PREEMPTED:
            if cfg.data.num_workers and job.data.val is not None:
                ckpt.before_fork()  # the validation loader forks its workers too
            outcome = end_epoch(job, state, launch, outcome)
        if outcome == PREEMPTED:
            launch.events.emit("stop_request", step=state.step, reason=preemption.requested() or "another rank")
            status = ckpt.emergency_save(job, state, launch.agreement.deadline(cfg.preemption.grace_s))
            notice = launch.watcher.notice if launch.watcher is not None else None
            if notice is not None and status == preemption.PREEMPTED_EXIT:  # committed: the VM may go now
                launch.watcher.provider.acknowledge(notice)
                launch.events.emit("notice_acknowledged", provider=notice.provider, event_id=notice.event_id)
            return status
        launch.tensorboard.log_epoch(state.history[-1])
        if not math.isfinite(state.history[-1]["train_loss"]):
            ckpt.raise_diverged(state, "non-finite loss")
        state.finished = (outcome in (MAX_STEPS, EARLY_STOP) or state.epoch >= cfg.train.max_epochs
                          or reached_max_steps(cfg, state))
        ckpt.maybe_save(job, state, epoch_end=outcome != MAX_STEPS)
        if state.finished:
            break
    launch.events.timers.switch("other")
    status = ckpt.finish(state)
    dist.barrier(env)  # nobody tears the group down while rank 0 is still writing
    dump_weights(job.model, env)
    log(f"done: {state.step} steps, {state.epoch} epochs", env)
    return status


def watch_notices(cfg: RunConfig, launch: Launch) -> notices.NoticeWatcher | None:
    """Local rank 0 of every node watches its cloud's preemption notice on a thread (off-cloud nothing is sent:
    notices.detect decides from local evidence). A notice takes the signal's path: all ranks stop at the same
    step, commit it and exit 75."""
    p = cfg.preemption
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    provider = notices.detect(p.notice, notices.resolve_metadata_url(p.metadata_url), poll_s=p.notice_poll_s)
    if provider is None:
        return None
    log(f"watching {provider.name} preemption notices at {provider.base}")

    def on_notice(notice: notices.Notice) -> None:
        left = notice.seconds_left()
        warn(f"{notice.describe()}: committing the step reached and stopping")
        last = launch.ckpt.last_save_s if launch.ckpt is not None else None
        if last is not None and last > left:
            warn(f"the last checkpoint took {last:.1f}s, more than the {left:.0f}s left before the deadline: the "
                 "emergency checkpoint may not be committed in time")
        launch.events.emit("notice", provider=notice.provider, action=notice.action, deadline=notice.deadline,
                           event_id=notice.event_id)
        preemption.request_stop(f"{notice.provider} preemption notice", notice.monotonic_deadline())
        stop_launcher()

    return notices.NoticeWatcher(provider, on_notice, p.notice_poll_s).start()


def stop_launcher() -> None:
    """Under torchrun, local rank 0 sends SIGTERM to its agent: the agent forwards it to every local worker and does
    not restart them (workers exiting 75 without it would be restarted by --max-restarts, on a VM about to go)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK") == "0":
        os.kill(os.getppid(), signal.SIGTERM)


def train_epoch(job: Job, ckpt: Checkpointer, launch: Launch, loader, state: TrainState) -> str:
    """Train until the epoch ends, max_steps is reached, or a stop is agreed by all ranks.

    No host sync per step: the running sums stay on the device and are read every train.log_every_steps, and
    the agreement on stopping and saving of one step travels while the next step computes.
    """
    cfg, env = job.cfg, job.env
    batches = len(loader)  # this rank's micro-batches left in the epoch
    if reached_max_steps(cfg, state) and batches:  # stopped on the max_steps step, before end_epoch ran
        return MAX_STEPS
    done = state.sample_in_epoch // (cfg.data.batch_size * env.world_size)
    bar = ProgressBar(show_bar(cfg, env), done + batches, state.epoch, cfg.train.max_epochs, done)
    left = len(loader.sampler)  # this rank's samples left in the epoch, as many on every rank (padding)
    if cfg.data.num_workers:
        ckpt.before_fork()
    for index, batch in enumerate(loader):
        if index == 0 and stop_agreed(launch.agreement, settle=True):
            bar.close()  # a stop during the start (resume, the loader's first batch) takes no step first
            return PREEMPTED
        # accumulation groups count from where this launch entered the epoch: a checkpoint is on a step boundary
        group_start = index - index % job.accumulate
        group_size = min(job.accumulate, batches - group_start)
        boundary = index + 1 - group_start == group_size
        samples = min(cfg.data.batch_size, left - index * cfg.data.batch_size)  # from the sampler, not the batch
        state.sample_in_epoch += samples * env.world_size
        forward_backward(job, batch, samples, state, group_size, sync=boundary)
        bar.advance()
        if not boundary:
            continue
        optimizer_step(job)
        state.step += 1
        if job.scheduler is not None and cfg.scheduler.interval == "step":
            job.scheduler.step()
        launch.steps.write(state.step)
        launch.events.after_step(state.step)
        inject_fault(state.step, env)
        if state.step % cfg.train.log_every_steps == 0:
            loss = running_loss(job, ckpt, state)
            bar.show(loss)
            launch.tensorboard.log_step(state.step, loss, job.optimizer.param_groups[-1]["lr"])
        last = index + 1 == batches
        decision = launch.agreement.after_step(preemption.requested() is not None, *ckpt.poll(),
                                               settle=last or reached_max_steps(cfg, state))
        if decision.broken:
            ckpt.raise_broken()
        if decision.stop:
            if decision.final:
                stop_launcher()  # every node's agent, not only the one whose VM got the notice
            launch.agreement.settle()
            bar.close()
            return PREEMPTED
        if reached_max_steps(cfg, state) and not last:
            bar.close()
            return MAX_STEPS
        if not last:  # at the epoch's end, the save after end_epoch covers it
            ckpt.maybe_save(job, state, due_now=decision.save_now)
    bar.close()
    return EPOCH_END


def stop_agreed(agreement: preemption.StopAgreement, settle: bool) -> bool:
    """Outside the steps (the first batch, evaluation): whether some rank got a stop request, agreed as after a
    step (with `settle`, at once; else one call later), nothing left in flight when it says stop."""
    decision = agreement.after_step(preemption.requested() is not None, False, False, settle=settle)
    if decision.stop:
        if decision.final:
            stop_launcher()  # every node's agent, not only the one whose VM got the notice
        agreement.settle()
    return decision.stop


def running_loss(job: Job, ckpt: Checkpointer, state: TrainState) -> float:
    """The epoch's mean training loss so far over all ranks (a host read and a collective: log steps only);
    a non-finite one stops the run before anything non-finite can be saved."""
    loss_sum, _, count, *_ = dist.all_sum(state.sums, job.env)
    if not math.isfinite(loss_sum):
        ckpt.raise_diverged(state, "non-finite loss")
    return loss_sum / max(count, 1)


def forward_backward(job: Job, batch, samples: int, state: TrainState, group_size: int, sync: bool) -> None:
    """One micro-batch of `samples`: the loss of runner's step or train.step, divided by the group size, backward
    (DDP syncs gradients on the group's last), then added to the running sums on the device."""
    batch = to_device(batch, job.env.device, non_blocking=True)
    model = job.wrapped
    no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with autocast(job):
            if job.step is None:
                x, y = pair(batch)
                out = model(x)
                loss = job.loss_fn(out, y)
            else:
                loss, metrics = call_step(job, model, batch, training=True)
        # no division (and no autograd node for it) without accumulation: on a small model each op shows
        job.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
    if job.step is None:
        add_batch(state.sums, out, y, loss.detach(), samples)
        return
    if state.metric_names is None:  # the run's first step names the metrics
        if "loss" in metrics:
            raise ConfigError("train.step: a metric named 'loss' would replace train_loss and val_loss; rename it")
        state.track_metrics(list(metrics))
    add_step(state.sums, state.metric_names, loss, metrics, samples)


def add_batch(sums: torch.Tensor, out, y, loss: torch.Tensor, weight: int) -> None:
    """Running [loss sum, correct, count] on the device, without reading anything back: `loss` × `weight` (the mean
    loss × the batch's samples, or a sum × 1), added in float64; accuracy only for class-index targets. As few ops
    as that takes: on a small model each costs about as much as a layer."""
    sums[0].add_(loss, alpha=weight)
    if not y.is_floating_point() and out.dim() == y.dim() + 1:  # class scores in dim 1, per sample or per token
        hits = out.argmax(1) == y
        sums[1].add_(hits.sum() if hits.dim() == 1 else hits.flatten(1).double().mean(1).sum())
    sums[2].add_(len(y))


def optimizer_step(job: Job) -> None:
    if job.cfg.train.grad_clip:
        job.scaler.unscale_(job.optimizer)
        params = [p for p in job.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, job.cfg.train.grad_clip)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)


def autocast(job: Job):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.cfg.train.precision)
    if dtype is None:  # building a disabled torch.autocast each step costs more than the step of a tiny model
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
    metrics = {"epoch": state.epoch, "step": state.step, "train_loss": loss_sum / max(count, 1)}
    if job.step is None and (correct or job.data.num_classes):
        metrics["train_acc"] = correct / max(count, 1)
    metrics.update({f"train_{name}": value / max(count, 1) for name, value in zip(names, metric_sums)})
    with events.timers.during("eval"):
        val = evaluate(job, names, launch.agreement)
    if val is None:
        log(f"evaluation of epoch {state.epoch + 1} cut by the stop request; the resumed run evaluates it again",
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


def evaluate(job: Job, names: list[str], agreement: preemption.StopAgreement | None = None) -> dict | None:
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
    loader = make_loader(job.data.val, sampler, batch_size, cfg.data.num_workers, env.device.type == "cuda")
    per_sample = copy.copy(job.loss_fn)
    if hasattr(per_sample, "reduction"):
        per_sample.reduction = "none"  # sum per-sample losses in float64: independent of batching
    sums = torch.zeros(3 + len(names), dtype=torch.float64, device=env.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(job):
        for index, batch in enumerate(loader):
            slow_eval_batch()
            batch = to_device(batch, env.device)
            if job.step is not None:
                loss, metrics = call_step(job, model, batch, training=False)
                add_step(sums, names, loss, metrics, min(batch_size, left - index * batch_size))
            else:
                x, y = pair(batch)
                out = model(x)
                loss = per_sample(out, y)
                if loss.dim() > 1:  # per token (a sequence): each sample's mean, as the training loss weighs them
                    loss = loss.flatten(1).double().mean(1)
                add_batch(sums, out, y, *((loss.double().sum(), 1) if loss.dim() else (loss, len(y))))
            if agreement is not None and index < common and stop_agreed(agreement, settle=index + 1 == common):
                model.train(was_training)
                return None
    model.train(was_training)
    loss_sum, correct, count, *metric_sums = dist.all_sum(sums, env)
    metrics = {"val_loss": loss_sum / max(count, 1)}
    if job.step is None and job.data.num_classes:
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
        if index >= 0:
            log(f"phase {index + 1}/{len(job.phases)}: training {', '.join(job.phases[index].train)}", job.env)
    finetune.set_train_mode(job.model, job.phases, index, head, job.cfg.finetune.freeze_bn)


def show_bar(cfg: RunConfig, env: DistEnv) -> bool:
    return env.is_main and (cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty()))


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

"""What a start puts into the built job besides a checkpoint: `model.init_from` on a fresh start and, with
model.init_optimizer, the run a training script saved (the PyTorch tutorial's dict, a Lightning .ckpt): its
optimizer, scheduler and GradScaler states and the epoch it reached, checked against this job's settings under the
drift rule (runner/drift.py). Allowed optimizer and scheduler changes are applied here, on resume as on
continuation (`apply_changes`). README, "Continue a hand-written run"; docs/design.md.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from . import drift, finetune, weights
from .components import build_optimizer, build_scheduler
from .data import steps_per_epoch
from .console import log, warn
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .job import Job


def load_init_weights(job: Job) -> tuple[int, int]:
    """model.init_from into the built model (the replaced head's weights are neither loaded nor required); with
    model.init_optimizer, continue the run it was saved from. Returns where training starts: (0-based epoch,
    optimizer steps done), (0, 0) unless a run is continued."""
    cfg = job.cfg
    if not cfg.model.init_from:
        return 0, 0
    report, saved = weights.load_run(job.model, cfg.model.init_from, storage_options=cfg.checkpoint.storage_options,
                                     strict=cfg.model.strict, trust_pickle=cfg.model.trust_pickle,
                                     new_head=job.head, prefix=cfg.model.init_prefix,
                                     continuing=cfg.model.init_optimizer)
    log(report, job.env)
    if saved is None:
        return 0, 0
    return continue_saved_run(job, saved)


def continue_saved_run(job: Job, saved: weights.SavedRun) -> tuple[int, int]:
    """Load the optimizer, scheduler and scaler states a training script saved with its weights; return the
    (epoch, step) it reached (README, "Continue a hand-written run"). Settings this job builds differently
    (optimizer hyperparameters, scheduler arguments, precision) are refused unless resume.allow_changes lists them
    (drift.py's rule); allowed, the job's values are used."""
    cfg, env, url = job.cfg, job.env, saved.url
    state = saved.require_optimizer()
    epoch, step, position = continued_position(job, saved)
    finetune.apply_lr_mults(job.optimizer, job.scheduler, job.phases, finetune.phase_at(job.phases, epoch))
    built = [{k: v for k, v in g.items() if k != "params"} for g in job.optimizer.param_groups]  # the job's values
    built_schedule = job.scheduler.state_dict() if job.scheduler is not None else None
    weights.load_optimizer_state(job.optimizer, job.model, state, url)  # first: it checks the groups match
    allowed = list(cfg.resume.allow_changes)
    saved_schedule = saved.scheduler if fits_schedule(job, saved, built_schedule, allowed) else None
    changes = drift.optimizer_changes(state["param_groups"], at_position(job, saved_schedule, epoch) or built)
    if saved_schedule is not None:
        changes += drift.scheduler_changes(saved_schedule, built_schedule, list(cfg.scheduler.args),
                                           state["param_groups"], built)
    if saved.scaler is not None and not job.scaler.is_enabled():
        changes.append(drift.Change("train.precision", "fp16", cfg.train.precision))
    refusal = drift.refusal(changes, allowed, url, what="was saved with other settings than this job's (file → job)",
                            ways_out="set the file's values in the job, or train on with the job's: {allow}")
    if refusal:
        raise CheckpointError(refusal)
    use_job_values(job.optimizer, built, changes)
    loaded = ["optimizer"]
    if saved.scaler is not None and job.scaler.is_enabled():
        job.scaler.load_state_dict(saved.scaler)
        loaded.append("GradScaler")
    if saved_schedule is not None:
        job.scheduler.load_state_dict(saved_schedule)
        if rebuild_schedule(job, changes, job.scheduler.last_epoch):  # the job's schedule where the file's is
            finetune.apply_lr_mults(job.optimizer, job.scheduler, job.phases, finetune.phase_at(job.phases, epoch))
        loaded.append("scheduler")
    elif job.scheduler is not None:
        position += "; " + replay_schedule(job, built, epoch, step, url)
    if saved.scheduler is not None and saved_schedule is None:
        position += "; its scheduler state is not used (resume.allow_changes: scheduler.name)"
    log(f"{position}; {', '.join(loaded)} state loaded, lr {float(job.optimizer.param_groups[-1]['lr']):g}", env)
    if changes:
        log(f"continuing with this job's settings (resume.allow_changes): {drift.describe(changes)}", env)
    return epoch, step


def at_position(job: Job, saved_schedule: dict | None, epoch: int) -> list[dict] | None:
    """The job's groups where the file's schedule is (what a schedule moves, such as OneCycleLR's momentum, compares
    there); None where that cannot be built (no schedule, ReduceLROnPlateau, a schedule too short: refused later)."""
    if saved_schedule is None or isinstance(job.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return None
    try:
        fresh, schedule = schedule_at(job, saved_schedule.get("last_epoch", 0))
    except ValueError:
        return None
    finetune.apply_lr_mults(fresh, schedule, job.phases, finetune.phase_at(job.phases, epoch))
    return [{k: v for k, v in g.items() if k != "params"} for g in fresh.param_groups]


def continued_position(job: Job, saved: weights.SavedRun) -> tuple[int, int, str]:
    """(0-based epoch to train next, optimizer steps done, a log line saying so): the file's `epoch` read as
    model.init_epoch says, times this job's steps per epoch. A 'global_step' that fits the other reading refuses."""
    cfg, url, max_epochs = job.cfg, saved.url, job.cfg.train.max_epochs
    if saved.epoch is None:
        return 0, 0, f"continuing the run in {url}: it saved no 'epoch', so training starts at epoch 1, step 0"
    per_epoch = steps_per_epoch(len(job.data.train), job.env.world_size, cfg.data.batch_size, job.accumulate)
    reading = cfg.model.init_epoch
    done = saved.epoch + 1 if reading == "last_finished" else saved.epoch
    meaning = (f"its 'epoch' {saved.epoch} is the 0-based {reading.replace('_', ' ')} epoch (model.init_epoch: "
               f"{reading}), so {done} epoch(s) are done")
    if saved.global_step is not None and saved.global_step != done * per_epoch:
        other, other_reading = (done - 1, "next") if reading == "last_finished" else (done + 1, "last_finished")
        if saved.global_step == other * per_epoch:
            raise ConfigError(f"{url}: {meaning}, but its 'global_step' {saved.global_step} is {other} epoch(s) of "
                              f"this job's {per_epoch} steps; set model.init_epoch: {other_reading}")
        if job.env.is_main:
            warn(f"{url}: its 'global_step' {saved.global_step} is not {done} epoch(s) of this job's {per_epoch} "
                 "steps (another batch size or data set, or saved mid-epoch); this run counts steps from "
                 f"{done * per_epoch}")
    step = done * per_epoch
    if done >= max_epochs:
        raise ConfigError(f"{url}: {meaning}, and train.max_epochs is {max_epochs}: nothing to train; raise "
                          "train.max_epochs to train on")
    if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
        raise ConfigError(f"{url}: {meaning}, {step} steps of this job, and train.max_steps is "
                          f"{cfg.train.max_steps}: nothing to train; raise train.max_steps to train on")
    return done, step, (f"continuing the run in {url}: {meaning}; training epochs {done + 1}..{max_epochs} "
                        f"(1-based) from step {step} ({per_epoch} per epoch)")


def fits_schedule(job: Job, saved: weights.SavedRun, built: dict | None, allowed: list[str]) -> bool:
    """Whether the file's scheduler state is one of this job's scheduler; if not, the saved schedule is dropped
    only when resume.allow_changes lists scheduler.name."""
    if saved.scheduler is None:
        return False
    if built is not None and schedule_keys(saved.scheduler) == schedule_keys(built):
        return True
    if drift.is_allowed("scheduler.name", allowed):
        return False
    has = f"{job.cfg.scheduler.name}, whose state has {', '.join(schedule_keys(built))}" if built else "not set"
    raise CheckpointError(f"{saved.url} holds the state of a scheduler with {', '.join(schedule_keys(saved.scheduler))}"
                          f"; this job's scheduler.name is {has}; set scheduler.name and scheduler.args to the one "
                          "that saved it, or drop the saved schedule with resume.allow_changes=[scheduler.name]")


def schedule_keys(state: dict) -> list[str]:
    """What tells schedulers apart in their state: the public attributes (not the deprecated verbose flag)."""
    return sorted(k for k in state if not k.startswith("_") and k != "verbose")


def use_job_values(optimizer: torch.optim.Optimizer, built: list[dict], changes: list[drift.Change]) -> None:
    """After a saved optimizer state replaced the groups: runner's group bookkeeping, the scheduler's anchor,
    settings the file lacks and the allowed changes come from the groups this job built; a changed LR keeps the
    file's position in its schedule."""
    changed = {c.key for c in changes}
    for group, own in zip(optimizer.param_groups, built):
        if "optim.lr" in changed:
            own_base = own.get("initial_lr", own["lr"])
            group["lr"] = rescaled_lr(group["lr"], group.get("initial_lr", group["lr"]), own_base)
        for key, value in own.items():
            if (key in ("name", "path", "lr_mult", "initial_lr") or key not in group
                    or (key != "lr" and f"optim.args.{key}" in changed)):
                group[key] = value


def rescaled_lr(lr: float, old_base: float, new_base: float) -> float:
    """An LR moved to a new base LR at the same point of its schedule (its ratio to the base kept); the one rule for
    a changed optim.lr where the schedule itself is not rebuilt (ReduceLROnPlateau: its reductions are kept)."""
    return new_base * lr / old_base if old_base else new_base


def apply_changes(job: Job, changes: list[drift.Change], times: int) -> None:
    """Write allowed config changes into what a checkpoint restored: a change to the optimizer or the schedule means
    the job's new settings where the run is (`rebuild_schedule`: the new schedule after `times` scheduler steps,
    the optimizer state kept). Under ReduceLROnPlateau, whose LR follows metrics, an optimizer change keeps the LR's
    reductions. Everything else the loop reads from the config, so it applies by itself."""
    if rebuild_schedule(job, changes, times):
        return
    optimizer = job.optimizer
    for change in changes:
        if change.key == "optim.lr":
            for group in optimizer.param_groups:
                group["lr"] = rescaled_lr(group["lr"], change.old, change.new)
        elif change.key.startswith("optim.args."):
            arg = change.key.removeprefix("optim.args.").split(".")[0]
            for group in optimizer.param_groups:
                if arg in group and arg in optimizer.defaults:
                    group[arg] = optimizer.defaults[arg]


def replay_schedule(job: Job, built: list[dict], epoch: int, step: int, url: str) -> str:
    """No saved scheduler state: step this job's schedule from its start to where an uninterrupted run would
    have it (epoch steps with scheduler.interval epoch, optimizer steps with step)."""
    scheduler, interval = job.scheduler, job.cfg.scheduler.interval
    times = epoch if interval == "epoch" else step
    name = type(scheduler).__name__
    if times and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise CheckpointError(f"{url} saved no scheduler state, and {name} cannot be brought to epoch {epoch + 1} "
                              "without the metrics it saw; save scheduler.state_dict() in the file (as "
                              "'scheduler_state_dict'), or continue without scheduler.name")
    for group, own in zip(job.optimizer.param_groups, built):
        group["lr"] = own["lr"]  # where this job's schedule starts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": replaying, not training
        for _ in range(times):
            scheduler.step()
    return f"no scheduler state saved: stepped this job's {name} {times} time(s) (scheduler.interval: {interval})"


def rebuild_schedule(job: Job, changes: list[drift.Change], times: int) -> bool:
    """Allowed changes to the optimizer or the schedule mean this job's new settings where the run is, as if it had
    trained with them from the start: build its optimizer hyperparameters and scheduler anew from the config, step
    the schedule `times` times from its start, and write both into the restored optimizer (its state, momentum and
    Adam moments, is kept) and scheduler. Setting arguments on a restored scheduler would not do that: a chainable
    schedule goes on from the current LR, OneCycleLR keeps max_lr in the groups and its phases from __init__.
    Fine-tune multipliers start at 1 here, as in build_job. False (nothing done) when no such change is listed,
    or only optimizer changes under ReduceLROnPlateau: its LR follows metrics, the caller scales it."""
    moved = [c for c in changes if c.key.startswith(("optim.", "scheduler."))]
    plateau = isinstance(job.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not moved or (plateau and all(c.key.startswith("optim.") for c in moved)):
        return False
    what = drift.describe(moved)
    if plateau:
        raise ConfigError(f"{what}: ReduceLROnPlateau cannot be rebuilt where the run is without the metrics it "
                          "saw; resume with its original arguments, or start a new run in another checkpoint.dir")
    try:
        fresh, schedule = schedule_at(job, times)
    except ValueError as e:
        raise ConfigError(f"{what}: the new {job.cfg.scheduler.name} cannot reach the run's position, {times} "
                          f"scheduler step(s) ({e}); resume with values that reach it, or start a new run in "
                          "another checkpoint.dir") from None
    for group, new in zip(job.optimizer.param_groups, fresh.param_groups):
        group.update({k: v for k, v in new.items() if k != "params"})
    if schedule is not None:
        job.scheduler.load_state_dict(schedule.state_dict())
    return True


def schedule_at(job: Job, times: int) -> tuple[torch.optim.Optimizer, object]:
    """This job's optimizer and scheduler built anew from its config over its parameters (no state), the schedule
    stepped `times` times from its start; ValueError where it cannot go that far (OneCycleLR past total_steps)."""
    fresh = build_optimizer(job.cfg.optim, finetune.param_groups(job.model, job.phases, job.head))
    schedule = build_scheduler(job.cfg.scheduler, fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": replaying, not training
        for _ in range(times if schedule is not None else 0):
            schedule.step()
    return fresh, schedule

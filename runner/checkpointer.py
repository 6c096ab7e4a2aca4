"""The save/resume protocol, owned by one object (docs/design.md, "Checkpoints and resume").

The loop calls `start` once, `poll` after every optimizer step, `maybe_save` at step and epoch boundaries,
`emergency_save` when a stop is agreed and `finish` at the end; it never touches the store or the writer.

- A checkpoint.dir holds one lineage (one run, across all its restarts). Every manifest records the run id,
  what started the lineage (`resume.mode`: auto, never or the pinned checkpoint's URL) and its parent.
- Choosing where to resume happens on rank 0 and is broadcast; so are its errors, so every rank fails alike.
- A fresh start (never, or a pinned URL) into a directory that holds another lineage is refused, so no run
  can overwrite, prune or shadow another's checkpoints; running the same command again continues the
  lineage that command started.
- Drift: the checkpoint's resolved config is compared with this start's key by key (runner/drift.py); a
  difference that changes the trajectory is refused unless listed in resume.allow_changes, then applied.
- Rank 0 probes the store and holds its lease before the first step; only the lease holder commits.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from . import __version__, dist, drift, preemption
from .config import RunConfig, manifest_config, to_dict
from .console import log, warn
from .continuation import apply_changes, load_init_weights
from .data import seed_all
from .dist import DistEnv
from .errors import CheckpointError, ConfigError, RunnerError, StorageError, one_line
from .events import EventLog
from .interval import AutoInterval, lineage_history
from .job import Job
from .state import Staging, TrainState, capture, load_bytes, restore, serialize
from .store import (LEASE, RETRY_ATTEMPTS, RETRY_BACKOFF_S, CheckpointStore, Lease, LocalTier, open_checkpoint,
                    bytes_problem, retry_transient, run_id_of, storage_errors, storage_fault)
from .test_hooks import fail_commit

FORMAT = 2           # manifest format; 1 = written before lineages (no run_id), still resumable
WRITER_NICE = 10     # the background writer's CPU priority (Linux nice, per thread)
FENCED = "another run took over the lease on {url}; this launch stops without writing there"


class TrainingDiverged(RunnerError):
    """A non-finite loss or weights: nothing non-finite is ever committed."""
    exit_status = 4


@dataclass(frozen=True)
class Lineage:
    run_id: str
    started_by: str         # "auto", "never", or the URL of the checkpoint the lineage was started from
    parent: str | None      # the checkpoint this lineage started from (a pinned resume), if any


@dataclass(frozen=True)
class Resume:
    url: str
    manifest: dict
    lineage: Lineage
    local: bool = False  # rank 0's node-local copy (checkpoint.local_dir), not the durable store's


def new_run_id() -> str:
    """Sortable by start time, unique across machines."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def lineage_of(manifest: dict) -> Lineage:
    return Lineage(run_id_of(manifest), str(manifest.get("started_by") or "auto"),
                   manifest.get("parent"))


class Checkpointer:
    def __init__(self, cfg: RunConfig, env: DistEnv, events: EventLog):
        self.cfg, self.env, self.events = cfg, env, events
        self.url = cfg.checkpoint_dir
        self.store = CheckpointStore(self.url, cfg.checkpoint.storage_options)
        self.lease: Lease | None = None
        self.lineage: Lineage | None = None
        self.last_save_at = time.monotonic()
        self.last_committed: int | None = None
        self.writer: threading.Thread | None = None
        self.write_ok, self.written_bytes = True, 0
        self.last_save_took_s: float | None = None  # rank 0: blocked + write seconds of the last committed save
        self.broken: str | None = None  # rank 0: why saving can no longer work (fenced out, permanent fault)
        self.created = False  # rank 0 made the local directory (close removes it while still empty)
        self._verified: bytes | None = None  # rank 0: the chosen checkpoint's bytes, read (and checked) once
        self.staging = Staging(reuse=cfg.checkpoint.reuse_buffers)  # host copies of the state, reused per save
        self.sharded = cfg.dist.strategy == "fsdp"  # every rank writes its shards (docs/design.md, "Sharded")
        self.side_group = None  # sharded: the writer threads' own process group
        self.auto: AutoInterval | None = None  # rank 0 with checkpoint.every: auto
        # checkpoint.local_dir: this machine's copies, committed first (docs/design.md, "The node-local tier")
        self.local = LocalTier(cfg.checkpoint.local_dir, self.store.url) if cfg.checkpoint.local_dir else None
        self.saves = 0  # periodic saves of this launch: every durable_every-th goes to the durable store too
        self.tracker_ids: dict[str, str] = {}  # rank 0: the lineage's experiment-tracker runs (runner/trackers.py)

    # --- start --------------------------------------------------------------------------------------------

    def start(self, job: Job, last_step: int) -> TrainState:
        """All ranks: open the store, agree on where to resume, load it (or start a fresh lineage)."""
        dist.from_rank0(self._open, self.env)
        problem = self._unreadable()
        if dist.any_rank([problem is not None], self.env)[0]:
            raise StorageError(problem or f"another rank cannot read {self.url} as rank 0 wrote it: checkpoint.dir "
                                          "must be storage every node reads (an object store or a shared filesystem)")
        found = dist.from_rank0(self._choose, self.env)
        self.lineage = found if isinstance(found, Lineage) else found.lineage
        if self.local is not None and self.env.is_main:
            self.local.keep_only(self.lineage.run_id)
        state = self._fresh(job) if isinstance(found, Lineage) else self._resume(job, found, last_step)
        if self.cfg.checkpoint.every == "auto" and self.env.is_main:
            history = lineage_history(self.cfg.out_dir, self.lineage.run_id, self.events.launch)
            self.auto = AutoInterval(self.cfg.checkpoint, self.events, history)
        return state

    def _open(self) -> None:
        """Rank 0: prove the store works, take its lease, then remove leftovers of interrupted writes."""
        self.created = self.store.local and not os.path.exists(self.store.root)
        self.store.probe()
        self.lease = Lease(self.store.fs, self.store.root, self.store.url,
                           ttl_s=self.cfg.checkpoint.lease_ttl_s)
        self.lease.acquire(should_stop=preemption.requested)  # a stop while waiting ends the wait
        self.lease.start_heartbeat()
        for url in self.store.cleanup_partial():  # safe now: no other writer holds the lease
            warn(f"removed incomplete checkpoint write {url}")

    def _unreadable(self) -> str | None:
        """Every rank reads the lease rank 0 just wrote: a node-local checkpoint.dir fails here, not at resume."""
        if self.env.is_main:
            return None
        try:
            with storage_errors("read", self.url):
                if self.store.fs.exists(f"{self.store.root}/{LEASE}"):
                    return None
        except RunnerError as e:
            return f"rank {self.env.rank}: {e}"
        return (f"rank {self.env.rank} cannot see {self.url} as rank 0 wrote it: checkpoint.dir must be storage "
                "every node reads (an object store or a shared filesystem)")

    def _choose(self) -> Resume | Lineage:
        """Rank 0: the newest valid checkpoint of this directory's lineage (its local copy when that is as new), a
        pinned one, or a new lineage."""
        started_by, pinned = self.cfg.resume.mode, None
        if started_by not in ("auto", "never"):  # a pinned checkpoint, named by its normalized URL
            pinned = open_checkpoint(started_by, self.cfg.checkpoint.storage_options)
            started_by = pinned[1].url
        local = self._local_latest() if self.local is not None and pinned is None else None
        found = local or self.store.read_latest(warn=warn)
        if found is not None:
            info, data = found
            lineage = lineage_of(info.manifest)
            if started_by == "auto" or lineage.started_by == started_by:
                self._verified = data
                return Resume(info.url, info.manifest, lineage, local=local is not None)
            raise CheckpointError(
                f"{self.url} already holds run {lineage.run_id} (newest: {info.url}, step {info.step}); "
                f"resume.mode={self.cfg.resume.mode} would start another run there. Continue it with "
                "resume.mode=auto, or set checkpoint.dir to a new directory for a new run")
        if pinned is None:
            return Lineage(new_run_id(), started_by, None)
        store, info = pinned
        if not info.valid:
            raise CheckpointError(f"resume.mode: {started_by} is not a valid checkpoint ({info.reason}); "
                                  "run `runner ckpt ls` to see valid ones")
        self._verified = store.read(info)
        return Resume(info.url, info.manifest, Lineage(new_run_id(), started_by, info.url))

    def _local_latest(self):
        durable = retry_transient(self.store.list, f"listing {self.url}")
        return self.local.latest(next((info for info in reversed(durable) if info.valid), None))

    def _fresh(self, job: Job) -> TrainState:
        self.events.run_id = self.lineage.run_id
        self.events.emit("fresh")
        epoch, step = load_init_weights(job)  # (0, 0) unless model.init_optimizer continues another tool's run
        log(f"fresh start: run {self.lineage.run_id}, no checkpoint to resume in {self.url}", self.env)
        seed_all(hash((self.cfg.train.seed, self.env.rank)) & 0x7FFF_FFFF)  # per-rank randomness, reproducible
        return TrainState(epoch=epoch, step=step)

    def _resume(self, job: Job, found: Resume, last_step: int) -> TrainState:
        cfg, env = self.cfg, self.env
        changes = self._check_compatible(found)
        data, self._verified = self._verified, None
        peers = []
        if found.local:
            data, peers = self._local_state(data, found)
        store = info = None
        if data is None or "sharded" in found.manifest:  # the other ranks read what rank 0 chose; all, shards
            store, info = open_checkpoint(found.url, cfg.checkpoint.storage_options)
        if data is None:
            data = store.read(info)
        written = found.manifest.get("config") or {}
        legacy_batch = (written.get("data") or {}).get("batch_size", cfg.data.batch_size) * self._saved_world(found)
        state = restore(load_bytes(data, found.url), job.model, job.optimizer, job.scheduler, job.scaler, env,
                        found.url, cfg.train.seed, legacy_batch)
        if "sharded" in found.manifest:
            load_shards(job, store, info)
        if changes:
            apply_changes(job, changes, scheduler_steps(cfg, state))
            log(f"applied config changes (resume.allow_changes): {drift.describe(changes)}", env)
        if found.lineage.parent == found.url:
            log(f"starting run {found.lineage.run_id} from pinned checkpoint {found.url}", env)
        else:
            self.last_committed = state.step
            self.tracker_ids.update(found.manifest.get("trackers") or {})  # a pinned start is another lineage
        self._extend_if_asked(state, found.manifest)
        lost = 0 if found.lineage.parent == found.url else max(0, last_step - state.step)  # pinned: another run's
        self.events.run_id = found.lineage.run_id
        self.events.emit("resume", checkpoint=found.url, step=state.step, lost=lost, peer_ranks=peers)
        log(f"resuming from {found.url}: step {state.step}, epoch {state.epoch + 1}, sample {state.sample_in_epoch} "
            f"of the epoch (written by {self._saved_world(found)} process(es)); {lost} step(s) lost since that "
            "checkpoint", env)
        return state

    def _local_state(self, data: bytes | None, found: Resume) -> tuple[bytes, list[int]]:
        """All ranks: the bytes of rank 0's chosen local copy, and the ranks that got them from rank 0. Rank 0 read
        and verified its own; each other rank takes its machine's copy if it has those bytes, and the ranks whose
        machine has none (another node, a new VM) receive rank 0's over the process group instead of the whole
        job falling back to the durable store (docs/design.md, "The node-local tier")."""
        if not self.env.is_main:
            data = self.local.copy_of(found.url, found.manifest) if self.local is not None else None
        peers = [rank for rank, lacks in enumerate(dist.gather(data is None, self.env)) if lacks]
        if not peers:
            return data, peers
        t0 = time.perf_counter()
        data = share_from_rank0(data, peers, self.env, self.cfg.dist.timeout_s)
        problem = bytes_problem("state.pt", data, found.manifest["files"]["state.pt"]) if self.env.rank in peers else ""
        if dist.any_rank([bool(problem)], self.env)[0]:  # all raise alike, or the others would wait in the next one
            where = f"on rank {self.env.rank} ({problem})" if problem else "on another rank"
            raise CheckpointError(f"the state.pt of {found.url} that rank 0 sent arrived damaged {where}; "
                                  "run the command again")
        log(f"rank(s) {', '.join(map(str, peers))} had no copy of {found.url} on their machine: restored from "
            f"rank 0's ({len(data)} bytes sent in {time.perf_counter() - t0:.2f}s)", self.env)
        return data, peers

    def _check_compatible(self, found: Resume) -> list[drift.Change]:
        """Refuse changes to what trains (one line listing each) unless allowed; return the allowed ones."""
        cfg, env = self.cfg, self.env
        saved_cfg = found.manifest.get("config")
        if not isinstance(saved_cfg, dict):
            warn(f"{found.url} records no config, so changes to the job cannot be checked", env)
            return []
        changes, saved = drift.trajectory_changes(saved_cfg, to_dict(cfg)), self._saved_world(found)
        batch = self._global_batch_change(found, saved_cfg)
        if saved != env.world_size:
            log(f"world size {saved} → {env.world_size}: resuming at the same global sample", env)
        refusal = drift.refusal(changes + ([batch] if batch else []), list(cfg.resume.allow_changes), found.url)
        if refusal and batch and saved != env.world_size:
            refusal += (f"; it was written by {saved} process(es), this run has {env.world_size}: "
                        f"data.global_batch_size={batch.old} keeps the global batch on any number of processes, "
                        "resume.allow_world_size_change=true accepts the change")
        if refusal:
            raise CheckpointError(refusal)
        for change in changes:  # allowed, but the saved state cannot take them
            if change.key in ("optim.name", "scheduler.name") or (change.key == "optim.lr" and not change.old):
                raise ConfigError(f"{change.key} cannot change on resume: the saved state belongs to {change.old}; "
                                  "start a new run in another checkpoint.dir")
        if batch:
            log(f"the global batch changes from {batch.old} to {batch.new}", env)
        return changes

    def _global_batch_change(self, found: Resume, written: dict) -> drift.Change | None:
        """The position is global, so any world size resumes at the exact sample; what may change is the global
        batch (samples per optimizer step), unless data.global_batch_size fixes it. Accepted with another world
        size under resume.allow_world_size_change; on the same one when resume.allow_changes lists the keys that
        changed it (data.batch_size, train.accumulate, data.global_batch_size), as the user wrote them."""
        cfg, env, saved = self.cfg, self.env, self._saved_world(found)
        data, train = written.get("data") or {}, written.get("train") or {}
        was = {"data.global_batch_size": data.get("global_batch_size"),
               "data.batch_size": data.get("batch_size", cfg.data.batch_size),
               "train.accumulate": train.get("accumulate") or 1}
        now = {"data.global_batch_size": cfg.data.global_batch_size, "data.batch_size": cfg.data.batch_size,
               "train.accumulate": cfg.train.accumulate}
        old = was["data.global_batch_size"] or was["data.batch_size"] * saved * was["train.accumulate"]
        new = now["data.global_batch_size"] or now["data.batch_size"] * env.world_size * now["train.accumulate"]
        if old == new:
            return None
        if saved != env.world_size and cfg.resume.allow_world_size_change:
            log(f"the global batch changes from {old} to {new} (resume.allow_world_size_change)", env)
            return None
        moved = [key for key in was if was[key] != now[key]]
        if saved == env.world_size and all(drift.is_allowed(key, list(cfg.resume.allow_changes)) for key in moved):
            log(f"the global batch changes from {old} to {new} ({', '.join(moved)})", env)
            return None
        return drift.Change("data.global_batch_size", old, new)

    @staticmethod
    def _saved_world(found: Resume) -> int:
        return int(found.manifest.get("world_size") or 1)

    def _extend_if_asked(self, state: TrainState, manifest: dict) -> None:
        """A finished run whose max_epochs/max_steps were raised continues the same lineage."""
        train, es = self.cfg.train, self.cfg.train.early_stopping
        stopped_early = bool(es.metric) and state.bad_epochs >= es.patience
        more = state.epoch < train.max_epochs and (train.max_steps is None or state.step < train.max_steps)
        if state.finished and more and not stopped_early:
            state.finished = False
            log(f"extending the finished run {self.lineage.run_id}: now up to {train.max_epochs} epochs"
                + (f" / {train.max_steps} steps" if train.max_steps else ""), self.env)

    # --- saving -------------------------------------------------------------------------------------------

    def poll(self) -> tuple[bool, bool]:
        """After each step, this rank's (save due by wall time, saving is broken); the loop agrees on them across
        ranks. With checkpoint.every: auto, rank 0 measures the step and decides alone."""
        minutes, since = self.cfg.checkpoint.every_minutes, time.monotonic() - self.last_save_at
        due = bool(minutes) and since >= minutes * 60
        if self.auto is not None:
            self.auto.step(self.events.timers.seconds("productive"), self.writer is not None
                           and self.writer.is_alive())
            due = self.auto.due(since)
        if self.lease is not None and self.lease.lost and self.broken is None:
            self.broken = FENCED.format(url=self.url)
        return due, self.broken is not None

    def maybe_save(self, job: Job, state: TrainState, due_now: bool = False, epoch_end: bool = False) -> None:
        """The one cadence rule: agreed wall-time cadence, every_steps, every_epoch, at_end."""
        c = self.cfg.checkpoint
        step_due = bool(c.every_steps) and state.step % c.every_steps == 0
        if due_now or step_due or (epoch_end and c.every_epoch) or (state.finished and c.at_end):
            self.save(job, state)

    def save(self, job: Job, state: TrainState, emergency: bool = False) -> None:
        """All ranks call (RNG and running sums are gathered); rank 0 hands the snapshot to the writer."""
        with self.events.timers.during("stall") as blocked:
            if dist.any_rank([not weights_finite(job.model)], self.env)[0]:
                self.raise_diverged(state, "non-finite weights")
            self.last_save_at = time.monotonic()
            if self.env.is_main or self.sharded:
                self.wait()  # one snapshot at a time: the staging buffers are free again
            if self.sharded:
                target, args = self._write_shards, self._stage_shards(job, state)
            else:
                target, args = self._write, (capture(job.model, job.optimizer, job.scheduler, job.scaler, state,
                                                     self.env, self.staging),)
        if args[0] is None:
            return
        self.saves += not emergency
        every = self.cfg.checkpoint.durable_every
        durable = self.local is None or emergency or state.finished or self.saves % every == 0
        # Serializing, hashing and writing happen there. A daemon thread, so a write hung on a dead server cannot
        # keep a preempted process alive.
        self.writer = threading.Thread(target=target, args=(*args, self._meta(state), emergency, blocked.seconds),
                                       kwargs={"durable": durable}, daemon=True)
        self.writer.start()

    def _stage_shards(self, job: Job, state: TrainState) -> tuple:
        """dist.strategy fsdp, all ranks: a host copy of this rank's shards of the model and optimizer state (DCP's
        state dicts alias the live parameters, which the next step changes), and on rank 0 the rest (scheduler,
        scaler, every rank's RNG and sums, progress) for state.pt."""
        from .store import sharded

        if self.side_group is None and self.env.distributed:  # made once, at the first save, by every rank
            self.side_group = dist.side_group(self.env, self.cfg.dist.timeout_s)
        attempt = dist.broadcast(sharded.new_attempt(), self.env)
        rest = capture(job.model, job.optimizer, job.scheduler, job.scaler, state, self.env, self.staging,
                       weights=False)
        model_state, optimizer_state = get_state_dict(job.model, job.optimizer)
        shards = self.staging.copy({"model": model_state, "optimizer": optimizer_state}, "shards")
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return shards, rest, attempt

    def _write_shards(self, shards: dict, rest: dict | None, attempt: str, meta: dict, emergency: bool,
                      blocked_s: float, durable: bool = True) -> None:
        """Every rank's writer thread: its shards (torch.distributed.checkpoint, hashed as written), rank 0 also
        state.pt; once every rank's files are written, rank 0 commits the manifest listing them all. The
        collectives here use the side group: the training thread's own go on meanwhile."""
        from .store import sharded

        t0, step, env, group = time.perf_counter(), meta["step"], self.env, self.side_group
        if not emergency:
            yield_to_training()
        entries, problem = {}, None
        try:
            entries = sharded.save_shards(self.store, step, attempt, shards, group=group)
            if rest is not None:
                entries.update(sharded.write_file(self.store, step, attempt, "state.pt",
                                                  lambda out: serialize(rest, out)))
        except Exception as e:  # noqa: BLE001 — reported below on every rank; the previous checkpoint stays
            problem = f"rank {env.rank}: {one_line(e)}"
        written = dist.gather((entries, problem), env, group)
        self.write_ok, self.written_bytes = False, sum(e["size"] for files, _ in written for e in files.values())
        if env.is_main:
            problems = [p for _, p in written if p]
            self._commit_shards(step, attempt, {n: e for files, _ in written for n, e in files.items()}, problems,
                                meta)
            if not self.write_ok:
                with contextlib.suppress(Exception):  # else the next start's cleanup removes them
                    sharded.discard_attempt(self.store, step, attempt)
        self.write_ok = dist.broadcast(self.write_ok, env, group)
        self._record(step, blocked_s, time.perf_counter() - t0, emergency)

    def _commit_shards(self, step: int, attempt: str, files: dict, problems: list[str], meta: dict) -> None:
        """Rank 0: the manifest of a sharded save, last, if every rank wrote its part and the lease is still ours."""
        from .store import sharded

        try:
            if problems:
                raise CheckpointError("; ".join(problems))
            if self.lease is not None and not self.lease.still_ours():
                self.broken = FENCED.format(url=self.url)
                raise CheckpointError(self.broken)
            fail_commit(step)
            url = sharded.commit_shards(self.store, step, attempt, files, meta)
        except Exception as e:  # noqa: BLE001 — classified: a permanent storage fault stops saving
            if storage_fault(e) == "permanent" and not problems and self.broken is None:
                self.broken = f"saving to {self.url} cannot work: {e}"
            warn(f"CHECKPOINT FAILED: step {step} was not saved to {self.url}: {e}. The last committed step is "
                 f"{self.last_committed}.")
            return
        self.last_committed, self.write_ok = step, True
        log(f"checkpoint step {step} committed ({len(files)} files from {self.env.world_size} rank(s)): {url}")
        self._prune()

    def _meta(self, state: TrainState) -> dict:
        last = state.history[-1] if state.history else {}
        return {
            "format": FORMAT, "run_id": self.lineage.run_id, "started_by": self.lineage.started_by,
            "parent": self.lineage.parent,
            "step": state.step, "epoch": state.epoch, "sample_in_epoch": state.sample_in_epoch,
            "world_size": self.env.world_size, "finished": state.finished,
            # only measured here: a mid-epoch save must not carry (and compete with) the last epoch's numbers
            "metrics": last if last.get("step") == state.step else {},
            "config": manifest_config(self.cfg),
            "trackers": dict(self.tracker_ids),
            "runner_version": __version__, "torch_version": torch.__version__,
        }

    def before_fork(self) -> None:
        """Let a write in flight finish before DataLoader workers are forked: a fork copies only the forking
        thread, so a lock the writer thread holds at that moment (torch.save's, stdout's) stays locked forever in
        the worker, which then hangs (seen at an epoch end's validation loader in the chaos test)."""
        if self.writer is not None:
            with self.events.timers.during("stall"):
                self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Finish the pending write; False if it failed or did not finish within `timeout` seconds."""
        if self.writer is None:
            return True
        self.writer.join(timeout)
        if self.writer.is_alive():
            return False
        self.writer = None
        return self.write_ok

    def _write(self, staged: dict, meta: dict, emergency: bool, blocked_s: float, durable: bool = True) -> None:
        t0 = time.perf_counter()
        if not emergency:  # training goes on meanwhile; an emergency save is all that is left to do
            yield_to_training()
        try:
            self._commit(staged, meta, emergency, durable)
        finally:
            self._record(meta["step"], blocked_s, time.perf_counter() - t0, emergency)

    def _record(self, step: int, blocked_s: float, write_s: float, emergency: bool) -> None:
        """A save's end, in its writer thread: its event, and what its cost teaches the next ones."""
        if self.write_ok:
            self.last_save_took_s = blocked_s + write_s
            if self.auto is not None and not emergency:
                self.auto.saved(blocked_s, write_s)
        self.events.emit("checkpoint", step=step, bytes=self.written_bytes, blocked_s=blocked_s, write_s=write_s,
                         committed=self.write_ok, emergency=emergency)

    def _commit(self, staged: dict, meta: dict, emergency: bool, durable: bool) -> None:
        step, attempts = meta["step"], 1 if emergency else RETRY_ATTEMPTS
        self.write_ok, self.written_bytes, local_url = False, 0, None

        def write_state(out) -> None:  # streamed into the store; an unserializable value is a permanent fault
            serialize(staged, out)
            self.written_bytes = out.size

        for attempt in range(1, attempts + 1):
            try:
                if self.lease is not None and not self.lease.still_ours():
                    self.broken = FENCED.format(url=self.url)
                    warn(f"CHECKPOINT FAILED: step {step} was not saved: {self.broken}")
                    return
                fail_commit(step)
                if self.local is not None and local_url is None:  # first, and once: retries are the durable copy's
                    local_url = self.local.commit(step, write_state, meta)
                if not durable:
                    log(f"checkpoint step {step} committed on this machine: {local_url} (one in "
                        f"{self.cfg.checkpoint.durable_every} goes to checkpoint.dir)")
                    self.write_ok = True
                    return
                payload = self.local.copy(step) if local_url else write_state
                url = self.store.commit(step, {"state.pt": payload}, meta)
                break
            except Exception as e:  # noqa: BLE001 — classified: a permanent fault is not retried
                permanent = storage_fault(e) == "permanent"
                if permanent or attempt == attempts:
                    then = "" if emergency or permanent else " Training continues; the next save will try again."
                    warn(f"CHECKPOINT FAILED: step {step} was not saved to {self.url} after {attempt} "
                         f"attempt(s): {e}. The last committed step is {self.last_committed}.{then}")
                    if permanent:
                        self.broken = f"saving to {self.url} cannot work: {e}"
                    return
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        self.last_committed = step
        log(f"checkpoint step {step} committed: {url}")
        self.write_ok = True
        self._prune()

    def _prune(self) -> None:
        c = self.cfg.checkpoint
        try:
            for url in self.store.prune(c.keep_last, c.keep_best, c.metric, c.mode, run_id=self.lineage.run_id):
                log(f"pruned {url}")
        except Exception as e:  # noqa: BLE001 — a failed prune costs disk space, not training
            warn(f"pruning {self.url} failed: {e}")

    def raise_broken(self) -> None:
        """All ranks: saving stopped working on rank 0 (fenced out, permanent fault): stop with its reason."""
        reason = dist.broadcast(self.broken, self.env)
        raise StorageError(f"{reason}; the last committed step is {self.last_committed_everywhere()}")

    def raise_diverged(self, state: TrainState, what: str) -> None:
        self.wait()
        last = self.last_committed_everywhere()
        raise TrainingDiverged(
            f"{what} at step {state.step} (epoch {state.epoch + 1}): nothing non-finite was saved; the newest "
            f"checkpoint is step {last}. Lower optim.lr or set train.grad_clip, then resume with "
            "resume.allow_changes=[optim.lr] (or the keys you changed)")

    def last_committed_everywhere(self) -> int | None:
        return dist.broadcast(self.last_committed, self.env)

    # --- stopping -----------------------------------------------------------------------------------------

    def emergency_save(self, job: Job, state: TrainState, end: float) -> int:
        """Stop agreed: commit the step reached by `end` (time.monotonic(), the deadline all ranks agreed on),
        then exit 75. Every rank returns rank 0's outcome (only rank 0 writes).
        """
        with self.events.timers.during("stall"):
            return self._emergency_save(job, state, end)

    def _emergency_save(self, job: Job, state: TrainState, end: float) -> int:
        t0, grace = time.monotonic(), self.cfg.preemption.grace_s
        log(f"{preemption.requested() or 'stop requested by another rank'}: saving step {state.step} "
            f"before exiting ({max(end - t0, 0):.1f}s left)", self.env)
        self.wait(max(end - time.monotonic(), 0.0))  # a periodic write in flight finishes (or fails) first
        # Still writing when the time is up: starting another save would block on it past the grace period.
        busy, done = dist.broadcast((self.writer is not None, self.last_committed == state.step), self.env)
        if not busy and not done:
            self.save(job, state, emergency=True)
            self.wait(max(end - time.monotonic(), 0.0))
        if not dist.broadcast(self.last_committed == state.step, self.env):
            if self.env.is_main:
                what = (f"did not complete within preemption.grace_s={grace:g}"
                        if self.writer is not None else "failed (see the error above)")
                last = "none" if self.last_committed is None else self.last_committed
                warn(f"emergency checkpoint of step {state.step} {what}; the last committed step is {last}; "
                     f"exiting with status {preemption.EMERGENCY_SAVE_FAILED_EXIT}", self.env)
            return preemption.EMERGENCY_SAVE_FAILED_EXIT
        log(f"preempted: step {state.step} committed in {time.monotonic() - t0:.1f}s; exiting with status "
            f"{preemption.PREEMPTED_EXIT}; run the same command to resume", self.env)
        return preemption.PREEMPTED_EXIT

    def finish(self, state: TrainState) -> int:
        """All ranks: wait for the final write; 0 if it (or an earlier save of this step) is committed, else 3."""
        ok = self.wait() and (self.last_committed == state.step or not self.cfg.checkpoint.at_end)
        ok = dist.broadcast(ok, self.env)
        if ok and self.local is not None and self.env.is_main:
            self.local.forget()  # local copies never outlive their run
        if not ok:
            warn(f"the final checkpoint (step {state.step}) was not saved; the last committed step is "
                 f"{self.last_committed}; exiting with status {preemption.EMERGENCY_SAVE_FAILED_EXIT}", self.env)
            return preemption.EMERGENCY_SAVE_FAILED_EXIT
        return 0

    def close(self, timeout: float | None = None) -> None:
        """Always called: a pending write gets `timeout` seconds (a crash must not abandon it), then the lease
        is released."""
        self.wait(timeout)
        if self.lease is not None:
            self.lease.release()
        if self.created:  # a run refused or failed before its first commit leaves no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(self.store.root)


def load_shards(job: Job, store: CheckpointStore, info) -> None:
    """All ranks: the model and optimizer state of a sharded checkpoint into this job's (resharded to its world
    size by torch.distributed.checkpoint; a plain or DDP job gets whole tensors)."""
    from .store import sharded

    model_state, optimizer_state = get_state_dict(job.model, job.optimizer)
    # get_state_dict gives every parameter an optimizer state (a zero step); the checkpoint has states only for
    # those that had trained (finetune.phases freeze the others): load those, and only those become the state.
    saved = {key.split(".", 2)[2] for key in sharded.tensor_shapes(store, info) if key.startswith("optimizer.state.")}
    optimizer_state["state"] = {name: moments for name, moments in optimizer_state["state"].items()
                                if any(f"{name}.{m}" in saved for m in moments)}
    target = {"model": model_state, "optimizer": optimizer_state}
    sharded.load_shards(store, info, target)
    set_model_state_dict(job.model, target["model"])
    set_optimizer_state_dict(job.model, job.optimizer, target["optimizer"], options=StateDictOptions(strict=False))


def share_from_rank0(data: bytes | None, ranks: list[int], env: DistEnv, timeout_s: float) -> bytes | None:
    """All ranks call this: rank 0's `data` on `ranks`, over a gloo group of rank 0 and those ranks only (ranks that
    have the bytes already are not sent them; gloo, so the bytes never need to go through a GPU)."""
    members = [0, *ranks]
    group = tdist.new_group(members, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if env.rank not in members:
        return data
    try:
        size = dist.broadcast(len(data) if env.is_main else None, env, group)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if env.is_main  # writable: no warning
               else torch.empty(size, dtype=torch.uint8))
        tdist.broadcast(buf, src=0, group=group)
        return data if env.is_main else buf.numpy().tobytes()
    finally:
        tdist.destroy_process_group(group)


def yield_to_training() -> None:
    """Lower this (writer) thread's CPU priority, and that of the hashing thread it starts: where cores are
    short, the scheduler then runs the training step first and the write in what is left, instead of slowing
    each step. Linux sets nice per thread; elsewhere this does nothing."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


def weights_finite(model: torch.nn.Module) -> bool:
    """This rank's parameters (its shards, under FSDP) are all finite; the caller agrees over ranks."""
    return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())


def scheduler_steps(cfg: RunConfig, state: TrainState) -> int:
    """How often this job's scheduler has stepped by the run's position: per optimizer step or per finished epoch.
    From the position, not the restored scheduler, so a changed `scheduler.interval` or a scheduler added on resume
    starts where the run is."""
    return state.step if cfg.scheduler.interval == "step" else state.epoch


"""Experiment trackers (metrics.loggers: tensorboard, mlflow, wandb, csv): one tracker run per lineage, rank 0 only.

The loop calls `Trackers` where it logs: `open` once the resumed step is known, `log_step` at log steps, `log_epoch`
at epoch ends, `close` at exit. TensorBoard writes local files (its own writer thread, purge_step on resume). MLflow,
W&B and CSV each run in a `BackgroundTracker`: a thread with a bounded queue, so a tracker that is down or slow is
retried in the background and never blocks training; what it could not deliver is counted and reported in one line.
Training waits for a tracker only twice, both bounded: at the start for MLflow to create its run (so even the first
checkpoint's manifest names it), and before a fork for a call in flight to end (ForkGate).

One tracker run per lineage: the run is found by the id the checkpoint manifest records (Checkpointer._meta) or by
the lineage's run id (an MLflow tag, the W&B run id, the CSV file name), else created. Steps trained again after a
kill are not logged twice: on opening, each tracker says up to which step it already holds each metric, and those
points are skipped. runner's resume is bit-exact, so the point the tracker has for a step is the one this launch
would log: the history equals an uninterrupted run's, live (nothing waits for a checkpoint to commit).
"""
from __future__ import annotations

import contextlib
import csv
import glob
import importlib
import importlib.util
import json
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, manifest_config
from .console import log, warn
from .errors import ConfigError, one_line
from .events import EVENTS, read_events
from .report import build_report
from .tensorboard import TensorBoard, epoch_values

LOGGERS = ("tensorboard", "mlflow", "wandb", "csv")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # logger → import name = extra
QUEUE_POINTS = 10_000   # points held per tracker while it is down; one point is one step's few floats (< 1 KB)
BATCH_POINTS = 100      # points sent in one request (MLflow takes 1000 metrics per batch)
RETRY_S = (1, 2, 5, 10, 30)  # backoff between attempts, the last repeated
CLOSE_TIMEOUT_S = 10.0  # at exit, how long the trackers may take to deliver what is queued
OPEN_WAIT_S = 20.0      # at start, how long training waits for MLflow's first try at creating the run (its id)
FORK_WAIT_S = 15.0      # before a fork, how long it waits for a tracker thread's call (MLflow's HTTP timeout: 10 s)
EVERY_KEY = "*"         # a tracker that knows only its last step for all keys (W&B)


@dataclass
class Point:
    step: int
    values: dict[str, float]
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))


@dataclass
class RunInfo:
    """What opening a tracker run needs: the lineage, the id recorded with it, the config, this launch."""
    lineage: str
    known_id: str | None
    name: str
    out_dir: str
    params: dict[str, str]
    launch: str          # one line: when, where, how this launch started


@dataclass
class RunEnd:
    status: int
    finished: bool
    summary: dict[str, float]
    model_file: str | None
    launch: str


def check_installed(cfg: RunConfig) -> list[str]:
    """The configured loggers, or a one-line ConfigError naming the extra of a missing package."""
    names = list(dict.fromkeys(list(cfg.metrics.loggers) + (["tensorboard"] if cfg.metrics.tensorboard else [])))
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            key = "metrics.loggers" if name in cfg.metrics.loggers else "metrics.tensorboard"
            asks = f"{key} lists {name}" if key == "metrics.loggers" else f"{key} is true"
            raise ConfigError(f"{asks} but the {package} package is not installed; "
                              f"pip install 'runner-train[{name}]' or take it out of {key}")
    return names


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config, secrets redacted as in config.yaml, as `section.key` → text."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    walk("", manifest_config(cfg))
    return out


class Trackers:
    """Rank 0's trackers (enabled=False or no loggers: every call does nothing). Construct before training: a
    missing package fails at once."""

    def __init__(self, cfg: RunConfig, enabled: bool):
        self.cfg = cfg
        names = check_installed(cfg) if enabled else []
        self.tensorboard = TensorBoard(cfg.out_dir, "tensorboard" in names)
        self.remote = [name for name in names if name != "tensorboard"]
        self.background: list[BackgroundTracker] = []
        for name in self.remote:  # importing mlflow or wandb takes seconds: overlap it with the start-up
            if name in PACKAGES:
                threading.Thread(target=import_quietly, args=(PACKAGES[name],), daemon=True).start()
        self.launch = ""

    def open(self, step: int, lineage: str, ids: dict[str, str], launch: str) -> None:
        """Start logging after `step`. `ids` is the lineage's record of tracker run ids (the checkpointer writes
        it into every manifest) and must hold each tracker's id before the first checkpoint commits, or a new VM
        (an empty out_dir) could not find the run: W&B and CSV ids follow from the lineage and are added at once;
        MLflow's is made by its server, so this waits for its first try at opening the run (at most OPEN_WAIT_S:
        one that cannot be reached is retried in the background, and its id lands in a later checkpoint)."""
        self.tensorboard.open(step)
        self.launch = launch
        for name in self.remote:
            info = RunInfo(lineage, ids.get(name), Path(self.cfg.out_dir).name, self.cfg.out_dir,
                           flat_params(self.cfg), launch)
            client = make_client(name, self.cfg)
            if known := client.planned_id(info):
                ids[name] = known
            tracker = BackgroundTracker(name, client, info, ids)
            tracker.start()
            self.background.append(tracker)
        deadline = time.monotonic() + OPEN_WAIT_S
        for tracker in self.background:
            if tracker.name not in ids:
                tracker.tried.wait(max(0.0, deadline - time.monotonic()))

    def log_step(self, step: int, running_loss: float, lr: float) -> None:
        self.tensorboard.log_step(step, running_loss, lr)
        self._put(Point(step, {"train/loss_running": running_loss, "train/lr": lr}))

    def log_epoch(self, metrics: dict) -> None:
        self.tensorboard.log_epoch(metrics)
        self._put(Point(metrics["step"], epoch_values(metrics)))

    def _put(self, point: Point) -> None:
        for tracker in self.background:
            tracker.put(point)

    def close(self, status: int, finished: bool, model=None, step: int | None = None) -> None:
        """Deliver what is queued (at most CLOSE_TIMEOUT_S), the goodput totals and the model when the run is
        finished; report in one line per tracker what was not delivered."""
        self.tensorboard.close()
        if not self.background:
            return
        end = RunEnd(status, finished, goodput(self.cfg.out_dir) if finished else {},
                     model_file(model, self.cfg.out_dir) if finished and self.cfg.metrics.log_model else None,
                     f"{self.launch} → exit {status} at step {step}")
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for tracker in self.background:
            tracker.close(end, deadline)
        self.background = []


def goodput(out_dir: str) -> dict[str, float]:
    """`runner report`'s totals for the lineage, as numbers (goodput/<name>)."""
    try:
        totals = build_report(read_events(Path(out_dir) / EVENTS)).totals()
    except Exception as e:  # a summary for the trackers must never fail the run's exit
        warn(f"no goodput summary for the trackers: {one_line(e)}")
        return {}
    return {f"goodput/{k}": float(v) for k, v in totals.items() if isinstance(v, (int, float)) and v is not None}


def model_file(model, out_dir: str) -> str | None:
    """metrics.log_model: the final weights as <out_dir>/model.safetensors (a sharded model is skipped)."""
    if model is None:
        return None
    from .dist import is_sharded

    if is_sharded(model):
        warn("metrics.log_model: a sharded model is not logged; `runner export` writes it whole")
        return None
    from safetensors.torch import save_model

    path = str(Path(out_dir) / "model.safetensors")
    try:
        save_model(model, path)
    except (OSError, RuntimeError) as e:  # at exit: a failed artifact must not change the exit status
        warn(f"metrics.log_model: cannot write {path}: {one_line(e)}")
        return None
    return path


def launch_line(step: int, lost: int | None, world_size: int, restart: int) -> str:
    how = f"resumed at step {step}" + (f", {lost} step(s) lost" if lost else "") if step else "fresh start"
    return (f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())} on {socket.gethostname()}, world size "
            f"{world_size}, torchrun restart {restart}: {how}")


# --- the background thread ------------------------------------------------------------------------------------

class ForkGate:
    """The checkpoint writer's rule (Checkpointer.before_fork) for the tracker threads: a fork copies only the forking
    thread, so a lock a tracker thread holds at that moment (stdout's, a client's connection pool's, an import's)
    stays locked forever in the child, and a DataLoader worker that touches it hangs. Tracker threads do all their
    work inside `working()`; before any fork of this process the forking thread closes the gate and waits (at most
    FORK_WAIT_S, then forks anyway) until no tracker thread is inside; after the fork it opens the gate again."""

    def __init__(self):
        self.cond = threading.Condition()
        self.busy = self.forks = 0
        self.tracker = threading.local()  # set on a tracker thread inside working()

    @contextlib.contextmanager
    def working(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.forks)
            self.busy += 1
        self.tracker.inside = True
        try:
            yield
        finally:
            self.tracker.inside = False
            with self.cond:
                self.busy -= 1
                self.cond.notify_all()

    def before_fork(self) -> None:
        if getattr(self.tracker, "inside", False):  # a client forking a helper of its own: it cannot wait for itself
            return
        with self.cond:
            self.forks += 1
            idle = self.cond.wait_for(lambda: not self.busy, FORK_WAIT_S)
        if not idle:
            warn(f"a tracker's call still runs after {FORK_WAIT_S:.0f} s; forking the DataLoader workers anyway")

    def after_fork(self) -> None:
        if getattr(self.tracker, "inside", False):
            return
        with self.cond:
            self.forks -= 1
            self.cond.notify_all()


FORK_GATE = ForkGate()
os.register_at_fork(before=FORK_GATE.before_fork, after_in_parent=FORK_GATE.after_fork,
                    after_in_child=FORK_GATE.__init__)  # the child's tracker threads are gone: a fresh gate


def import_quietly(package: str) -> None:
    """Import a tracker's package ahead of its use, off the training thread (an import holds locks too)."""
    with FORK_GATE.working():
        importlib.import_module(package)


class BackgroundTracker:
    """One tracker's client on its own thread. The training thread only puts points in a bounded queue (a full one
    drops the point, counted). The thread opens the run (retrying with backoff while it cannot), then delivers
    points in order, retrying each batch until it goes through or the run closes."""

    def __init__(self, name: str, client, info: RunInfo, ids: dict[str, str], capacity: int = QUEUE_POINTS):
        self.name, self.client, self.info, self.ids = name, client, info, ids
        self.queue: queue.Queue[Point] = queue.Queue(capacity)
        self.dropped: list[int] = []        # steps of points the full queue refused
        self.failed: list[int] = []         # steps of points given up at close
        self.sent = self.skipped = 0
        self.logged: dict[str, int] = {}    # the last step the tracker held per key when it was opened
        self.problem: str | None = None     # the last error, for the report
        self.opened = False
        self.tried = threading.Event()      # the first attempt at opening the run ended (Trackers.open waits)
        self.in_flight: list[Point] = []
        self.closing = threading.Event()
        self.deadline = float("inf")
        self.end: RunEnd | None = None
        self.thread = threading.Thread(target=self._run, name=f"runner-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, point: Point) -> None:
        try:
            self.queue.put_nowait(point)
        except queue.Full:
            self.dropped.append(point.step)

    def close(self, end: RunEnd, deadline: float) -> None:
        self.end, self.deadline = end, deadline
        self.closing.set()
        self.thread.join(max(0.0, deadline - time.monotonic()))
        self._report()

    # the thread

    def _run(self) -> None:
        if not self._retry(self._open):
            self._give_up_queue()
            return
        while not (self.closing.is_set() and self.queue.empty()):
            batch = self._next_batch()
            self.in_flight = batch
            if batch and not self._retry(lambda: self._deliver(batch)):
                self.failed += [p.step for p in batch]
                self.in_flight = []
                self._give_up_queue()
                return
            self.in_flight = []
        if self.end is not None:
            self._retry(lambda: self.client.finish(self.end))

    def _open(self) -> None:
        try:
            run_id, self.logged = self.client.open(self.info)
        finally:
            self.tried.set()
        self.ids[self.name] = run_id  # the next checkpoint's manifest records it
        self.opened = True
        log(f"{self.name}: logging to run {run_id}" + (f" (has steps up to {max(self.logged.values())})"
                                                        if self.logged else ""))

    def _next_batch(self) -> list[Point]:
        try:
            batch = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_POINTS:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _deliver(self, batch: list[Point]) -> None:
        fresh = [Point(p.step, {k: v for k, v in p.values.items() if p.step > self._last(k)}, p.time_ms)
                 for p in batch]
        fresh = [p for p in fresh if p.values]
        self.skipped += len(batch) - len(fresh)
        if fresh:
            self.client.log(fresh)
        self.sent += len(fresh)

    def _last(self, key: str) -> int:
        return max(self.logged.get(key, -1), self.logged.get(EVERY_KEY, -1))

    def _retry(self, attempt) -> bool:
        """Call `attempt` until it succeeds (True) or the run closes past its deadline (False)."""
        for tries in range(1_000_000):
            with FORK_GATE.working():  # a client's call, or a warning, holds locks a forked worker must not inherit
                try:
                    attempt()
                    return True
                except Exception as e:  # a tracker's client raises anything; none of it may reach training
                    if self.problem is None:
                        warn(f"{self.name}: {one_line(e)}; retrying in the background, training goes on")
                    self.problem = one_line(e)
            pause = RETRY_S[min(tries, len(RETRY_S) - 1)]
            if self.closing.is_set():
                pause = min(pause, self.deadline - time.monotonic())
                if pause <= 0:
                    return False
            self.closing.wait(pause)
        return False

    def _give_up_queue(self) -> None:
        while not self.queue.empty():
            self.failed.append(self.queue.get_nowait().step)

    def _report(self) -> None:
        if self.thread.is_alive():  # stuck in a call past the deadline: what is in flight or queued is lost
            self.failed += [p.step for p in self.in_flight]
            self._give_up_queue()
        lost = sorted(self.dropped + self.failed)
        if lost or not self.opened:
            steps = f" (steps {lost[0]}–{lost[-1]})" if lost else ""
            why = f": {self.problem}" if self.problem else ""
            where = "its run was never opened, " if not self.opened else ""
            warn(f"{self.name}: {where}{len(lost)} metric point(s){steps} not delivered"
                 f"{', ' + str(len(self.dropped)) + ' dropped by the full queue' if self.dropped else ''}{why}")


# --- clients: open / log / finish, called on the background thread only ---------------------------------------

def make_client(name: str, cfg: RunConfig):
    return {"mlflow": MLflowClient, "wandb": WandbClient, "csv": CsvClient}[name](cfg)


class MLflowClient:
    """Any tracking URI: metrics.tracking_uri, else MLFLOW_TRACKING_URI, else MLflow's default. The run is tagged
    runner.run_id = the lineage; one runner.launch.<n> tag per launch."""

    LINEAGE_TAG = "runner.run_id"
    LAUNCH_TAG = "runner.launch."

    def __init__(self, cfg: RunConfig):
        self.uri, self.experiment = cfg.metrics.tracking_uri, cfg.metrics.experiment
        self.client: Any = None
        self.run_id: str | None = None
        self.launch_tag: str | None = None

    @staticmethod
    def planned_id(info: RunInfo) -> str | None:
        """The run's id before opening it: the recorded one (a new run's id is made by the server)."""
        return info.known_id

    def open(self, info: RunInfo) -> tuple[str, dict[str, int]]:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # runner retries, in the background
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        run = self._find(info) or self._create(info)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._log_params(run, info.params)
        launches = [k for k in run.data.tags if k.startswith(self.LAUNCH_TAG)]
        self.launch_tag = f"{self.LAUNCH_TAG}{len(launches) + 1}"
        self.client.set_tag(self.run_id, self.launch_tag, info.launch)
        return self.run_id, self._logged(run)

    def _experiment_id(self) -> str:
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _find(self, info: RunInfo):
        if info.known_id:
            return self.client.get_run(info.known_id)
        runs = self.client.search_runs([self._experiment_id()], f"tags.`{self.LINEAGE_TAG}` = '{info.lineage}'",
                                       max_results=1)
        return runs[0] if runs else None

    def _create(self, info: RunInfo):
        run = self.client.create_run(self._experiment_id(), run_name=info.name,
                                     tags={self.LINEAGE_TAG: info.lineage, "runner.out_dir": info.out_dir})
        return self.client.get_run(run.info.run_id)

    def _log_params(self, run, params: dict[str, str]) -> None:
        """New parameters are logged; MLflow keeps a parameter's first value, so one changed on resume
        (resume.allow_changes) is a runner.changed.<key> tag."""
        from mlflow.entities import Param, RunTag

        have = run.data.params
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        changed = [RunTag(f"runner.changed.{k}", f"{have[k]} → {v}"[:5000]) for k, v in params.items()
                   if k in have and have[k] != v[:6000]]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _logged(self, run) -> dict[str, int]:
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in run.data.metrics}

    def log(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, p.time_ms, p.step) for p in points for k, v in p.values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, end: RunEnd) -> None:
        from mlflow.entities import Metric

        self.client.set_tag(self.run_id, self.launch_tag, end.launch)
        if end.summary:
            now = int(time.time() * 1000)
            step = int(end.summary.get("goodput/final_step") or 0)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in end.summary.items()])
        if end.model_file:
            self.client.log_artifact(self.run_id, end.model_file, artifact_path="model")
        status = "FINISHED" if end.status == 0 else "KILLED" if end.status == 75 else "FAILED"  # 75: preempted
        self.client.set_terminated(self.run_id, status=status)


class WandbClient:
    """W&B with its own settings from the environment (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR …);
    metrics.experiment names the project. The run id is the lineage's, so every launch resumes it. Offline, each
    launch writes a directory offline-run-*-<id> (`wandb sync` uploads them as the one run); what they hold is read
    back to skip steps already logged."""

    def __init__(self, cfg: RunConfig):
        self.project = cfg.metrics.experiment
        self.dir = os.environ.get("WANDB_DIR") or cfg.out_dir
        # W&B writes its .wandb file every 15 s: a SIGKILL would lose up to that much, and resuming needs it on disk
        self.flush_s = float(os.environ.get("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "1"))
        self.run: Any = None

    @staticmethod
    def planned_id(info: RunInfo) -> str:
        return info.known_id or wandb_id(info.lineage)

    def open(self, info: RunInfo) -> tuple[str, dict[str, int]]:
        import wandb

        run_id = self.planned_id(info)
        self.run = wandb.init(id=run_id, resume="allow", project=self.project or None, name=info.name,
                              dir=self.dir, config=info.params, allow_val_change=True,
                              tags=[launch_tag(info.launch)],
                              settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off"),
                                                      x_transaction_log_flush_interval=self.flush_s))
        if self.run.settings.mode == "offline" or os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            logged = offline_logged(self.dir, run_id)
        else:  # the server's history: W&B's next step
            logged = {EVERY_KEY: self.run.starting_step - 1} if self.run.resumed else {}
        return run_id, logged

    def log(self, points: list[Point]) -> None:
        for point in points:
            self.run.log(point.values, step=point.step)

    def finish(self, end: RunEnd) -> None:
        import wandb

        if end.summary:
            self.run.summary.update(end.summary)
        if end.model_file:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_file(end.model_file)
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if end.status in (0, 75) else end.status)  # 75: preempted, resumed later


def wandb_id(lineage: str) -> str:
    return "runner-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in lineage.lower())


def launch_tag(launch: str) -> str:
    """A W&B tag (at most 64 characters) naming the launch by its start time."""
    return "launch " + launch.split(" on ")[0]


WANDB_BLOCK, WANDB_HEADER = 32768, 7  # a .wandb file: LevelDB log blocks after a 7-byte header


def wandb_records(path: str):
    """The protobuf records of one .wandb file (a torn tail, from a kill, ends the scan)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = Path(path).read_bytes(), WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:
            return
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # a torn record
                return
            yield record


def wandb_history(folder: str, run_id: str) -> list[dict]:
    """Every history row of the offline run `run_id` under `folder`, in launch order: {key: value, '_step': n}."""
    rows = []
    for path in sorted(glob.glob(f"{folder}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def offline_logged(folder: str, run_id: str) -> dict[str, int]:
    logged: dict[str, int] = {}
    for row in wandb_history(folder, run_id):
        for key in row:
            if not key.startswith("_"):
                logged[key] = max(logged.get(key, -1), int(row["_step"]))
    return logged


class CsvClient:
    """<out_dir>/trackers/<lineage>.csv: step,name,value rows, one file per lineage, appended by every launch."""

    FIELDS = ("step", "name", "value")

    def __init__(self, cfg: RunConfig):
        self.folder = Path(cfg.out_dir) / "trackers"
        self.path: Path | None = None

    @staticmethod
    def planned_id(info: RunInfo) -> str:
        return info.known_id or f"{info.lineage}.csv"

    def open(self, info: RunInfo) -> tuple[str, dict[str, int]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.planned_id(info)
        self.path = self.folder / name
        logged: dict[str, int] = {}
        if self.path.exists():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("value") not in (None, "") and row["step"].isdigit():  # not a torn line
                        logged[row["name"]] = max(logged.get(row["name"], -1), int(row["step"]))
            if not self.path.read_bytes().endswith(b"\n"):  # a killed launch's torn line: start a new one
                with open(self.path, "a") as f:
                    f.write("\n")
        else:
            self.path.write_text(",".join(self.FIELDS) + "\n")
        return name, logged

    def log(self, points: list[Point]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for point in points:
                writer.writerows((point.step, k, repr(v)) for k, v in point.values.items())

    def finish(self, end: RunEnd) -> None:
        if end.summary:
            self.log([Point(int(end.summary.get("goodput/final_step") or 0), end.summary)])

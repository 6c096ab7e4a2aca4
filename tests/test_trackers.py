"""metrics.loggers: one tracker run per lineage across kills, a preemption and torchrun restarts, with the history of
an uninterrupted run point for point; a tracker that is down never changes or stops training.

MLflow against a real `mlflow server` (sqlite backend store, conftest.mlflow_server), W&B in offline mode read back
from its own run files, the CSV logger from its file. The job: 2 ranks under torchrun, 16 steps per epoch, 2 epochs,
a log step every 2 steps, a checkpoint every 4.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import finish, last_step, wait_until
from helpers import assert_tensors_equal, free_port, launched, newest_state, torchrun_cmd, write_job
from runner import cli, trackers
from runner.config import load_config

mlflow = pytest.importorskip("mlflow", reason="pip install 'runner-train[mlflow]'")
pytest.importorskip("wandb", reason="pip install 'runner-train[wandb]'")
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

JOB = {
    "model": {"name": "cnn", "args": {"width": 8, "dropout": 0.2}},
    "data": {"name": "synthetic", "args": {"size": 512, "val_size": 64}, "batch_size": 16},
    "optim": {"name": "AdamW", "lr": 0.01},
    "scheduler": {"name": "StepLR", "args": {"step_size": 10, "gamma": 0.5}, "interval": "step"},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain", "log_every_steps": 2},
    "checkpoint": {"every_steps": 4},
}
STEPS = 32
# (hook, step, the step MLflow must hold before the kill): the kills lose steps 5-7 and 13-15, of which the log
# steps 6 and 14 were delivered; the SIGTERM at step 20 stops at 21 (one step later, agreed by both ranks)
KILLS = (("RUNNER_TEST_HANG_AT_STEP", 7, 6), ("RUNNER_TEST_HANG_AT_STEP", 15, 14))
SIGTERM_AT = 20
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def tracked_job(folder: Path, name: str, uri: str) -> Path:
    return write_job(folder, name, base=JOB, metrics={"loggers": ["mlflow", "wandb", "csv"], "tracking_uri": uri,
                                                      "experiment": f"{name}-{folder.name}"})


def only_run(uri: str, job: Path):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_config(job).metrics.experiment)
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL) if experiment else []
    return client, runs


def mlflow_history(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                     key=lambda m: (m.step, m.timestamp))]
            for key in run.data.metrics if not key.startswith("goodput/")}


def mlflow_has_step(uri: str, job: Path, step: int) -> bool:
    client, runs = only_run(uri, job)
    return bool(runs) and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id,
                                                                                   "train/loss_running"))


def wandb_last_step(out_dir: Path) -> int:
    """The last log step in W&B's files: W&B writes a step's row once the next step is logged, so one behind."""
    return max((step for step, _ in wandb_curves(str(out_dir))[1].get("train/loss_running", [])), default=0)


def run_to_end(job: Path, log: Path, **env) -> str:
    with launched(torchrun_cmd("train", job), log, **WANDB_ENV, **env) as agent:
        out = finish(agent, log)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server):
    """(reference job, interrupted job): the same job uninterrupted, and SIGKILLed twice, SIGTERMed once and
    finished, each launch a 2-rank torchrun."""
    folder = tmp_path_factory.mktemp("trackers")
    reference = tracked_job(folder, "reference", mlflow_server)
    run_to_end(reference, folder / "reference.txt")
    job = tracked_job(folder, "interrupted", mlflow_server)
    out_dir, log = folder / "interrupted", folder / "interrupted.txt"
    for launch, (hook, step, delivered) in enumerate(KILLS, 1):
        with launched(torchrun_cmd("train", job), log, **WANDB_ENV, **{hook: step}) as agent:
            wait_until(lambda: last_step(out_dir) >= step and mlflow_has_step(mlflow_server, job, delivered)
                       and len(glob.glob(f"{out_dir}/wandb/offline-run-*")) == launch
                       and wandb_last_step(out_dir) >= delivered - 2,
                       f"step {step} trained, step {delivered} in MLflow, {delivered - 2} in W&B's file", agent, log)
    with launched(torchrun_cmd("train", job), log, **WANDB_ENV, RUNNER_TEST_SIGNAL_AT_STEP=SIGTERM_AT) as agent:
        finish(agent, log)
    assert agent.returncode != 0
    run_to_end(job, log)
    _, manifest = newest_state(out_dir / "checkpoints")
    assert manifest["finished"] and manifest["step"] == STEPS, log.read_text()[-3000:]
    return reference, job


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_one_run_per_lineage_with_the_uninterrupted_history(runs, mlflow_server):
    reference, job = runs
    ref_client, [ref_run] = only_run(mlflow_server, reference)
    client, found = only_run(mlflow_server, job)
    assert len(found) == 1, [r.info.run_id for r in found]  # four launches, one MLflow run
    run = found[0]
    history, expected = mlflow_history(client, run), mlflow_history(ref_client, ref_run)
    assert sorted(history) == sorted(expected) and "train/loss_running" in history and "epoch/val_loss" in history
    for key in expected:
        assert history[key] == expected[key], key  # same steps, same values, nothing twice
    assert [s for s, _ in history["train/loss_running"]] == list(range(2, STEPS + 1, 2))

    params = run.data.params
    assert params["optim.lr"] == "0.01" and params["model.name"] == "cnn" and params["train.max_epochs"] == "2"
    assert params.keys() == ref_run.data.params.keys()
    launches = {k: v for k, v in run.data.tags.items() if k.startswith("runner.launch.")}
    assert sorted(launches) == [f"runner.launch.{n}" for n in (1, 2, 3, 4)], launches
    assert "fresh start" in launches["runner.launch.1"] and "exit" not in launches["runner.launch.1"]  # killed
    assert "resumed at step 4, 3 step(s) lost" in launches["runner.launch.2"]
    assert "resumed at step 12, 3 step(s) lost" in launches["runner.launch.3"]
    assert re.search(r"→ exit 75 at step 21$", launches["runner.launch.3"]), launches
    assert launches["runner.launch.4"].endswith(": resumed at step 21 → exit 0 at step 32"), launches
    assert run.info.status == "FINISHED"
    assert run.data.metrics["goodput/launches"] == 4 and 0 < run.data.metrics["goodput/effective_ratio"] < 1
    _, manifest = newest_state(Path(load_config(job).out_dir) / "checkpoints")
    assert manifest["trackers"]["mlflow"] == run.info.run_id  # known before the first commit (Trackers.open)
    assert run.data.tags["runner.run_id"] == manifest["run_id"]


def wandb_curves(out_dir: str) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """The offline run ids under out_dir/wandb, and each metric's (step, value) list across every launch's file."""
    ids = {re.sub(r"^offline-run-\d{8}_\d{6}-", "", Path(d).name) for d in glob.glob(f"{out_dir}/wandb/offline-run-*")}
    curves: dict[str, list[tuple[int, float]]] = {}
    for run_id in ids:
        for row in trackers.wandb_history(out_dir, run_id):
            for key, value in row.items():
                if not key.startswith("_"):
                    curves.setdefault(key, []).append((row["_step"], value))
    return ids, curves


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wandb_offline_and_csv_one_run_with_the_uninterrupted_history(runs):
    reference, job = runs
    out_dir, ref_dir = load_config(job).out_dir, load_config(reference).out_dir
    ids, curves = wandb_curves(out_dir)
    _, expected = wandb_curves(ref_dir)
    assert len(ids) == 1 and len(glob.glob(f"{out_dir}/wandb/offline-run-*")) == 4  # one run, written by 4 launches
    assert sorted(curves) == sorted(expected) and "epoch/val_acc" in curves
    for key in expected:
        assert curves[key] == expected[key], key
    _, manifest = newest_state(Path(out_dir) / "checkpoints")
    assert ids == {trackers.wandb_id(manifest["run_id"])} and manifest["trackers"]["wandb"] in ids

    def csv_curves(folder):
        [path] = glob.glob(f"{folder}/trackers/*.csv")
        rows = [line.split(",") for line in Path(path).read_text().splitlines()[1:]]
        return {(name, int(step), float(value)) for step, name, value in rows if not name.startswith("goodput/")}, \
            len([r for r in rows if not r[1].startswith("goodput/")])
    (got, count), (want, _) = csv_curves(out_dir), csv_curves(ref_dir)
    assert got == want and count == len(want)  # no row twice


# --- a tracker that is down ---------------------------------------------------------------------------------------

SMALL = {**JOB, "data": {"name": "synthetic", "args": {"size": 256, "val_size": 64}, "batch_size": 32},
         "train": {**JOB["train"], "max_epochs": 2}}  # 1 process: 8 steps per epoch, a log step every 2


@pytest.fixture
def quick(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith(("RUNNER_TEST_", "MLFLOW_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(trackers, "CLOSE_TIMEOUT_S", 3.0)


def train_in_process(folder: Path, name: str, **metrics) -> dict:
    job = write_job(folder, name, base=SMALL, **({"metrics": metrics} if metrics else {}))
    assert cli.main(["train", str(job)]) == 0
    return newest_state(folder / name / "checkpoints")[0]


@pytest.mark.slow
def test_unreachable_tracker_changes_nothing_and_says_what_was_lost(tmp_path, quick, capsys):
    plain = train_in_process(tmp_path, "plain")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracked = train_in_process(tmp_path, "down", loggers=["mlflow"], tracking_uri=down)
    assert_tensors_equal(tracked["model"], plain["model"])
    err = capsys.readouterr().err
    assert re.search(r"mlflow: its run was never opened, 10 metric point\(s\) \(steps 2–16\) not delivered", err), err


@pytest.mark.slow
def test_tracker_going_away_mid_run(tmp_path, quick, mlflow_server, monkeypatch, capsys):
    from fault_helpers import CuttableProxy

    plain = train_in_process(tmp_path, "plain")
    proxy = CuttableProxy(("127.0.0.1", int(mlflow_server.rsplit(":", 1)[1])))
    monkeypatch.setenv("RUNNER_TEST_SLOW_EVAL_S", "3")  # epoch 1's evaluation (6 s) leaves time to cut the server
    job = write_job(tmp_path, "cut", base=SMALL, metrics={"loggers": ["mlflow"], "tracking_uri": proxy.url,
                                                          "experiment": f"cut-{tmp_path.name}"})

    def cut_after_epoch_one_logged():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not mlflow_has_step(mlflow_server, job, 8):
            time.sleep(0.1)
        proxy.cut()
    cutter = threading.Thread(target=cut_after_epoch_one_logged, daemon=True)
    cutter.start()
    assert cli.main(["train", str(job)]) == 0
    cutter.join()
    assert_tensors_equal(newest_state(tmp_path / "cut" / "checkpoints")[0]["model"], plain["model"])
    client, [run] = only_run(mlflow_server, job)
    delivered = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss_running"))
    assert 8 <= delivered[-1] < 16 and delivered == list(range(2, delivered[-1] + 1, 2))  # cut in epoch 1's eval
    err = capsys.readouterr().err
    lost = re.search(r"mlflow: (\d+) metric point\(s\) \(steps (\d+)–16\) not delivered: ", err)
    assert lost and int(lost[2]) <= delivered[-1] + 2, err  # from the first point it missed to the last step


def test_flat_params_redact_secrets_and_a_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    job = write_job(tmp_path, "p", base=SMALL, data={"args": {"api_token": "hunter2"}},
                    metrics={"loggers": ["mlflow"]})
    params = trackers.flat_params(load_config(job))
    assert params["data.args.api_token"] == "<redacted>" and params["optim.lr"] == "0.01"
    assert json.loads(params["metrics.loggers"]) == ["mlflow"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without it finds
    assert cli.main(["train", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'runner-train[mlflow]'" in err and "metrics.loggers" in err
    assert not (tmp_path / "p").exists()  # nothing started


@pytest.mark.slow
def test_a_new_vm_reopens_the_run_the_first_checkpoint_names(tmp_path, quick, mlflow_server, monkeypatch):
    """A launch that crashes at step 7 (one checkpoint, step 4, committed moments after the start), then a new VM:
    an empty out_dir but the checkpoint store. The same command reopens the MLflow run by the id in the manifest
    (its lineage tag is removed first, so nothing else can find it), and the history is the uninterrupted run's."""
    def tracked(name):
        return write_job(tmp_path, name, base=SMALL, metrics={"loggers": ["mlflow"], "tracking_uri": mlflow_server,
                                                              "experiment": f"{name}-{tmp_path.name}"})
    reference = tracked("reference")
    assert cli.main(["train", str(reference)]) == 0
    job, out_dir = tracked("vm"), tmp_path / "vm"
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "7")  # steps 5-7 are lost, step 6 already in MLflow
    with pytest.raises(RuntimeError, match="injected test fault"):
        cli.main(["train", str(job)])
    client, [run] = only_run(mlflow_server, job)
    _, manifest = newest_state(out_dir / "checkpoints")
    assert manifest["step"] == 4 and manifest["trackers"] == {"mlflow": run.info.run_id}
    client.delete_tag(run.info.run_id, trackers.MLflowClient.LINEAGE_TAG)
    for entry in out_dir.iterdir():  # a new VM: nothing of the old one but the checkpoint store
        if entry.name != "checkpoints":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    monkeypatch.delenv("RUNNER_TEST_FAIL_AT_STEP")
    assert cli.main(["train", str(job)]) == 0

    client, [run] = only_run(mlflow_server, job)  # one run across both machines
    _, [ref_run] = only_run(mlflow_server, reference)
    assert mlflow_history(client, run) == mlflow_history(client, ref_run)  # steps and values, none twice
    launches = sorted(k for k in run.data.tags if k.startswith("runner.launch."))
    assert launches == ["runner.launch.1", "runner.launch.2"] and trackers.MLflowClient.LINEAGE_TAG not in run.data.tags
    assert "resumed at step 4" in run.data.tags["runner.launch.2"] and run.info.status == "FINISHED"


@pytest.mark.slow
def test_log_model_logs_the_trained_weights_as_an_mlflow_artifact(tmp_path, quick, mlflow_server):
    from safetensors.torch import load_file

    job = write_job(tmp_path, "model", base=SMALL, metrics={"loggers": ["mlflow"], "tracking_uri": mlflow_server,
                                                            "experiment": f"model-{tmp_path.name}", "log_model": True})
    assert cli.main(["train", str(job)]) == 0
    client, [run] = only_run(mlflow_server, job)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    logged = load_file(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path)))
    state, manifest = newest_state(tmp_path / "model" / "checkpoints")
    assert manifest["finished"] and manifest["step"] == 16
    assert_tensors_equal(logged, state["model"])  # the final checkpoint's weights, every tensor


class LockProbe(torch.utils.data.Dataset):
    """One sample: whether the DataLoader worker, a fork, could take `lock` (a lock held at the fork stays held)."""

    def __init__(self, lock):
        self.lock = lock

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.lock.acquire(timeout=3)


def test_dataloader_workers_never_fork_inside_a_tracker_call(one_thread):
    """A client call holds a lock (as MLflow's holds its connection pool's, or a warning stdout's) for a second;
    a DataLoader forked meanwhile waits for the call to end, so its worker finds the lock free instead of hanging."""
    held, inside = threading.Lock(), threading.Event()

    class HoldingClient:  # only the lock is made up: the thread, the fork and the loader are runner's and torch's
        def open(self, info):
            return "run", {}

        def log(self, points):
            with held:
                inside.set()
                time.sleep(1)

        def finish(self, end):
            pass

    tracker = trackers.BackgroundTracker("holding", HoldingClient(), trackers.RunInfo("l", None, "n", ".", {}, ""),
                                         {})
    tracker.start()
    tracker.put(trackers.Point(2, {"train/loss_running": 1.0}))
    assert inside.wait(30)
    loader = torch.utils.data.DataLoader(LockProbe(held), batch_size=None, num_workers=1)
    assert list(loader) == [True]  # the worker took the lock: it was forked after the call released it
    tracker.close(trackers.RunEnd(0, True, {}, None, ""), time.monotonic() + 5)
    assert tracker.sent == 1 and not tracker.thread.is_alive()

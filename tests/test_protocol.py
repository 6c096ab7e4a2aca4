"""The save/resume protocol as a user meets it through `runner train`: run lineage, pinned resumes, stops on the
last step, config drift, fail-fast stores, retention ranking, non-finite losses, secrets, extending a finished
run, and one writer per store, as README, "Checkpoints and resume" and docs/design.md, "Checkpoints and resume"
state them. Each test checks a rule whose breach lost or hid checkpoints, or trained something other than what was
printed.

All in process (cli.main) on a tiny synthetic job: 8 optimizer steps per epoch.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import assert_tensors_equal, launched, merge, newest_state, runner_cmd, write_job
from helpers import train_in_process as train
from runner.store import CheckpointStore

JOB = {
    "model": {"name": "cnn", "args": {"width": 8}},
    "data": {"name": "synthetic", "args": {"size": 256, "val_size": 64}, "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
}
STEPS_PER_EPOCH = 8


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith("RUNNER_TEST_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore never probes the metadata address


def one_line_error(err: str, code, status: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == status and len(lines) >= 1 and lines[-1].startswith("runner: error: "), err
    return lines[-1]


def steps_in(store) -> list[int]:
    return [i.step for i in CheckpointStore(str(store)).list() if i.valid]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. lineage: a second run never destroys or hides the first --------------------------------------------

def test_fresh_start_in_another_runs_store_is_refused_and_loses_nothing(tmp_path, capsys):
    job = write_job(tmp_path, "a", base=JOB, checkpoint={"keep_last": 2})
    code, out, err = train(job, capsys=capsys)
    assert code == 0, err
    store = tmp_path / "a" / "checkpoints"
    assert steps_in(store) == [8, 16]
    code, out, _ = train(job, capsys=capsys)
    assert code == 0 and "already finished at step 16" in out and "resume.mode=never" not in out
    before = files_of(store)
    code, out, err = train(job, "resume.mode=never", capsys=capsys)
    line = one_line_error(err, code)
    assert "step-000000016" in line and "resume.mode=auto" in line and "checkpoint.dir" in line
    assert files_of(store) == before and "epoch 1" not in out


def test_same_never_command_continues_its_own_lineage(tmp_path, capsys, monkeypatch):
    job = write_job(tmp_path, "b", base=JOB, checkpoint={"every_steps": 4})
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "10")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    code, out, _ = train(job, "resume.mode=never", capsys=capsys)
    assert str(code).startswith("crash") and "fresh start: run" in out
    run_id = out.split("fresh start: run ")[1].split(",")[0]
    code, out, err = train(job, "resume.mode=never", capsys=capsys)  # the same command: resumes, not fresh
    assert code == 0, err
    assert "resuming from" in out and "step-000000008: step 8" in out and "fresh start" not in out
    _, manifest = newest_state(tmp_path / "b" / "checkpoints")
    assert manifest["run_id"] == run_id and manifest["started_by"] == "never" and manifest["format"] == 2


# --- 2. a pinned resume is a starting point, not a loop ----------------------------------------------------

def test_pinned_resume_starts_a_new_lineage_that_the_same_command_continues(tmp_path, capsys, monkeypatch):
    a = write_job(tmp_path, "a", base=JOB, checkpoint={"every_steps": 4, "keep_last": 0})
    assert train(a, capsys=capsys)[0] == 0
    a_store = tmp_path / "a" / "checkpoints"
    a_before = files_of(a_store)
    pinned = f"{a_store}/step-000000004"
    b = write_job(tmp_path, "b", base=JOB, checkpoint={"every_steps": 2, "keep_last": 1},
                  resume={"mode": pinned})
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "9")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    code, out, _ = train(b, capsys=capsys)
    assert str(code).startswith("crash") and f"resuming from {pinned}: step 4" in out
    code, out, err = train(b, capsys=capsys)  # the same command again: B's own newest, not the pinned step
    assert code == 0, err
    assert "step-000000008: step 8" in out and f"resuming from {pinned}" not in out
    assert files_of(a_store) == a_before  # retention in B (keep_last 1) never touched A
    _, manifest = newest_state(tmp_path / "b" / "checkpoints")
    assert manifest["parent"] == pinned and manifest["started_by"] == pinned


def test_pinning_a_step_into_its_own_store_is_refused(tmp_path, capsys):
    a = write_job(tmp_path, "a", base=JOB, checkpoint={"every_steps": 4, "keep_last": 0})
    assert train(a, capsys=capsys)[0] == 0
    store = tmp_path / "a" / "checkpoints"
    before = files_of(store)
    code, _, err = train(a, f"resume.mode={store}/step-000000004", capsys=capsys)
    assert "another run there" in one_line_error(err, code) and files_of(store) == before


# --- 3. a stop exactly on the max_steps step ----------------------------------------------------------------

def test_stop_on_the_max_steps_step_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    ref = write_job(tmp_path, "ref", base=JOB, train={"max_steps": 5})
    assert train(ref, capsys=capsys)[0] == 0
    job = write_job(tmp_path, "cut", base=JOB, train={"max_steps": 5})
    monkeypatch.setenv("RUNNER_TEST_SIGNAL_AT_STEP", "5")
    code, out, _ = train(job, capsys=capsys)
    assert code == 75 and "preempted: step 5 committed" in out
    monkeypatch.delenv("RUNNER_TEST_SIGNAL_AT_STEP")
    code, out, err = train(job, capsys=capsys)
    assert code == 0 and "done: 5 steps" in out, out + err
    (got, manifest), (want, _) = newest_state(tmp_path / "cut" / "checkpoints"), \
        newest_state(tmp_path / "ref" / "checkpoints")
    assert manifest["finished"] and manifest["step"] == 5
    for section in ("model", "optimizer"):
        assert_tensors_equal(got[section], want[section], section)
    assert got["progress"]["history"] == want["progress"]["history"]


# --- 4./5. config drift: refused key by key, applied when allowed; harmless keys never block ----------------

@pytest.fixture
def interrupted(tmp_path, capsys, monkeypatch):
    """A run stopped at step 6 (checkpoint at step 4), with a per-step scheduler."""
    job = write_job(tmp_path, "d", base=JOB, checkpoint={"every_steps": 4},
                    scheduler={"name": "StepLR", "args": {"step_size": 3, "gamma": 0.5}, "interval": "step"})
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "6")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    assert str(train(job, capsys=capsys)[0]).startswith("crash")
    return job


def test_trajectory_changes_are_refused_listing_each_key(interrupted, tmp_path, capsys):
    store = tmp_path / "d" / "checkpoints"
    before = files_of(store)
    code, out, err = train(interrupted, "optim.lr=0.5", "train.accumulate=2", "train.loss=nll",
                           "train.precision=bf16", "scheduler.args.step_size=5", "optim.args.weight_decay=0.1",
                           capsys=capsys)
    line = one_line_error(err, code)
    for text in ("optim.lr 0.01 → 0.5", "data.global_batch_size 32 → 64", "train.loss", "train.precision",
                 "scheduler.args.step_size 3 → 5", "optim.args.weight_decay", "resume.allow_changes"):
        assert text in line, line
    assert files_of(store) == before and "epoch 1" not in out


def test_allowed_changes_are_applied_and_logged(interrupted, tmp_path, capsys):
    code, out, err = train(interrupted, "optim.lr=0.5", "scheduler.args.step_size=5",
                           "resume.allow_changes=[optim.lr,scheduler.args.step_size]", capsys=capsys)
    assert code == 0, err
    assert "applied config changes" in out and "optim.lr 0.01 → 0.5" in out
    state, manifest = newest_state(tmp_path / "d" / "checkpoints")
    # The new schedule where the run is: StepLR(step_size 5, gamma 0.5) from the new base 0.5, as if the run had used
    # it from the start (README, "Config drift"): halved at steps 5, 10 and 15.
    assert state["scheduler"]["step_size"] == 5 and manifest["config"]["optim"]["lr"] == 0.5
    assert math.isclose(state["optimizer"]["param_groups"][0]["lr"], 0.5 * 0.5 ** 3)
    metrics = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["lr"] == state["optimizer"]["param_groups"][0]["lr"]


def test_harmless_changes_never_block(interrupted, tmp_path, capsys):
    code, out, err = train(interrupted, "data.num_workers=2", "data.eval_batch_size=16", "dist.timeout_s=60",
                           "checkpoint.keep_last=5", capsys=capsys)
    assert code == 0 and "resuming from" in out, err


# --- 6./7. fail fast: bad values and bad stores before any training -----------------------------------------

def test_date_in_data_args_is_refused_before_training(tmp_path, capsys):
    job = write_job(tmp_path, "j", base=JOB, data={"args": {"start": "DATE"}})
    job.write_text(job.read_text().replace("DATE", "2024-06-01"))  # unquoted: YAML reads a date
    assert isinstance(yaml.safe_load(job.read_text())["data"]["args"]["start"], datetime.date)
    code, out, err = train(job, capsys=capsys)
    assert "data.args.start" in one_line_error(err, code) and "epoch 1" not in out


def test_unwritable_store_fails_before_the_first_step(tmp_path, capsys):
    job = write_job(tmp_path, "j", base=JOB)
    code, out, err = train(job, "checkpoint.dir=/proc/nope", capsys=capsys)
    assert "/proc/nope" in one_line_error(err, code) and "epoch 1" not in out


def test_s3_without_credentials_fails_before_the_first_step(tmp_path, capsys, monkeypatch, s3_server):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    job = write_job(tmp_path, "j", base=JOB, checkpoint={"dir": "s3://no-creds/run", "storage_options": {
        "endpoint_url": s3_server, "skip_instance_cache": True}})
    code, out, err = train(job, capsys=capsys)
    line = one_line_error(err, code)
    assert "s3://no-creds/run" in line and "credentials" in line.lower() and "Traceback" not in err
    assert "epoch 1" not in out


def test_a_final_checkpoint_that_fails_does_not_exit_0(tmp_path, capsys, monkeypatch):
    import runner.checkpointer as checkpointer

    monkeypatch.setattr(checkpointer, "RETRY_BACKOFF_S", 0.01)
    job = write_job(tmp_path, "j", base=JOB, train={"max_epochs": 1})
    monkeypatch.setenv("RUNNER_TEST_FAIL_COMMIT_STEP", str(STEPS_PER_EPOCH))
    code, out, err = train(job, capsys=capsys)
    assert code == 3 and "CHECKPOINT FAILED: step 8" in err and "final checkpoint (step 8) was not saved" in err


# --- 8. retention ranks by real, fresh, finite measurements --------------------------------------------------

def test_misspelled_checkpoint_metric_fails_before_any_pruning(tmp_path, capsys):
    job = write_job(tmp_path, "j", base=JOB, checkpoint={"keep_best": 1, "keep_last": 1, "metric": "val_accuracy"})
    code, out, err = train(job, capsys=capsys)
    line = one_line_error(err, code)
    assert "checkpoint.metric" in line and "val_accuracy" in line and "val_acc" in line


def test_mid_epoch_checkpoints_carry_no_stale_metrics(tmp_path, capsys):
    job = write_job(tmp_path, "j", base=JOB, checkpoint={"every_steps": 3, "keep_last": 0})
    assert train(job, capsys=capsys)[0] == 0
    infos = {i.step: i.manifest for i in CheckpointStore(str(tmp_path / "j" / "checkpoints")).list()}
    assert infos[3]["metrics"] == {} and infos[9]["metrics"] == {}
    assert infos[8]["metrics"]["step"] == 8 and infos[16]["metrics"]["step"] == 16


# --- 11. init_from is read only by a fresh start --------------------------------------------------------------

def test_resume_does_not_reread_init_from(tmp_path, capsys, monkeypatch):
    pre = write_job(tmp_path, "pre", base=JOB, train={"max_epochs": 1})
    assert train(pre, capsys=capsys)[0] == 0
    weights = tmp_path / "pretrained"
    (tmp_path / "pre" / "checkpoints").rename(weights)
    job = write_job(tmp_path, "ft", base=JOB, model={"init_from": str(weights)}, checkpoint={"every_steps": 4},
                    finetune={"head": {"module": "head", "num_classes": 10}})
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "6")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    code, out, _ = train(job, capsys=capsys)
    assert str(code).startswith("crash") and "loaded" in out
    for path in sorted(weights.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    weights.rmdir()
    code, out, err = train(job, capsys=capsys)
    assert code == 0 and "resuming from" in out and "step 4" in out, err


# --- 12. more ranks than samples ------------------------------------------------------------------------------

def test_more_processes_than_training_samples_is_refused(tmp_path):
    from runner.config import load_config
    from runner.dist import DistEnv
    from runner.errors import ConfigError
    from runner.job import build_job

    cfg = load_config(write_job(tmp_path, "w", base=merge(JOB, {"data": {"args": {"size": 3, "val_size": 2}}})))
    with pytest.raises(ConfigError, match="3 sample.*8 processes"):
        build_job(cfg, DistEnv(0, 0, 8, torch.device("cpu")))


def test_padding_gives_every_rank_the_same_number_of_samples():
    from runner.data import ShardedSampler

    lengths = {len(ShardedSampler(3, rank, 8, 0, True, pad=True)) for rank in range(8)}
    assert lengths == {1}
    lengths = {len(ShardedSampler(5, rank, 16, 0, True, pad=True)) for rank in range(16)}
    assert lengths == {1}


# --- 15. raising max_epochs continues a finished run ---------------------------------------------------------

def test_raising_max_epochs_extends_a_finished_run_to_the_same_weights(tmp_path, capsys):
    straight = write_job(tmp_path, "straight", base=JOB)
    assert train(straight, capsys=capsys)[0] == 0
    job = write_job(tmp_path, "ext", base=JOB, train={"max_epochs": 1})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=2", capsys=capsys)
    assert code == 0 and "extending the finished run" in out and "done: 16 steps, 2 epochs" in out, out + err
    got, _ = newest_state(tmp_path / "ext" / "checkpoints")
    want, _ = newest_state(tmp_path / "straight" / "checkpoints")
    for section in ("model", "optimizer"):
        assert_tensors_equal(got[section], want[section], section)


# --- 16. a non-finite loss never displaces a finite checkpoint ------------------------------------------------

def test_non_finite_loss_stops_and_keeps_the_finite_checkpoints(tmp_path, capsys):
    job = write_job(tmp_path, "nan", base=JOB, optim={"name": "SGD", "lr": 1.0e+30},
                    checkpoint={"every_steps": 1, "keep_last": 1})
    code, out, err = train(job, capsys=capsys)
    line = one_line_error(err, code, status=4)
    assert "non-finite" in line and "nothing non-finite was saved" in line
    state, manifest = newest_state(tmp_path / "nan" / "checkpoints")
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# --- 17. secrets are never printed or stored ------------------------------------------------------------------

def test_storage_secrets_are_redacted_in_log_config_and_manifests(tmp_path, capsys, s3_store_url):
    url, options = s3_store_url
    secret = "SECRETVALUE-9f8e7d"
    job = write_job(tmp_path, "sec", base=JOB, train={"max_epochs": 1}, checkpoint={
        "dir": url, "storage_options": {**options, "key": "testing", "secret": "testing", "token": secret}})
    code, out, err = train(job, capsys=capsys)
    assert code == 0, err
    assert secret not in out + err and secret not in (tmp_path / "sec" / "config.yaml").read_text()
    store = CheckpointStore(url, options)
    for info in store.list():
        assert secret not in json.dumps(info.manifest)
        assert info.manifest["config"]["checkpoint"]["storage_options"]["endpoint_url"] == options["endpoint_url"]


# --- 18. one writer per store ---------------------------------------------------------------------------------

def test_a_second_writer_waits_for_the_lease_and_never_deletes_a_write_in_progress(tmp_path, capsys):
    job = write_job(tmp_path, "lease", base=JOB, train={"max_epochs": 50},
                    checkpoint={"every_steps": 2, "lease_ttl_s": 3})
    log = tmp_path / "first.log"
    with launched(runner_cmd("train", job), log, RUNNER_TEST_SLOW_COMMIT_S=2) as first:
        store = tmp_path / "lease" / "checkpoints"
        deadline = time.monotonic() + 120
        while not list(store.glob(".tmp-*")):  # the first run is in the middle of a (slowed) write
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        code, out, err = train(job, capsys=capsys)
        line = one_line_error(err, code)
        assert "being written by another run" in line and f"pid {first.pid}" in line
        assert time.monotonic() - t0 >= 3  # it waited for the lease to lapse, which the live writer renews
        assert "removed incomplete checkpoint write" not in err
        first.send_signal(signal.SIGTERM)  # the first run stops as it would when preempted
        assert first.wait(120) == 75, log.read_text()
    assert "preempted: step" in log.read_text()

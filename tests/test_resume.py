"""Resume end to end: bit-exact mid-epoch resume (1 process and 2-rank torchrun), corrupt checkpoints,
a real S3 server, retention, refusals, finished runs, leftovers, and loading a GPU-written state on CPU.

Runs A (uninterrupted) are module fixtures shared by several tests; every other test works on a copy
of their stores, so the expensive training happens as few times as possible.
"""
from __future__ import annotations

import io
import re
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch

from helpers import (assert_tensors_equal, job_folder, merge, newest_state, ok, run_cli,  # noqa: F401
                     run_torchrun, write_job)
from runner import cli
from runner.store import MANIFEST, CheckpointStore
from runner.data import ShardedSampler

SIZE = 512  # training samples: 16 steps per epoch on 1 rank, 8 on 2 (batch 32 per rank)
DATA = {"name": "recording_data:build", "args": {"augment": True, "size": SIZE, "val_size": 128}}

# 1 process: DataLoader workers, a per-step scheduler, a checkpoint every 3 steps (16 is the epoch end).
SINGLE = {
    "data": {**DATA, "num_workers": 2},
    "scheduler": {"name": "StepLR", "args": {"step_size": 10, "gamma": 0.7}, "interval": "step"},
    "checkpoint": {"every_steps": 3, "keep_last": 0},
}
SINGLE_STEPS = [3, 6, 9, 12, 15, 16, 18, 21, 24, 27, 30, 32]
SINGLE_FAIL, SINGLE_RESUME = 26, 24  # fails at epoch 2, batch 10; resumes at batch 8 of epoch 2

# 2 ranks: no workers (6 processes on 2 cores would be slow), another scheduler, a checkpoint every 3 steps.
DDP = {
    "data": {**DATA, "num_workers": 0},
    "scheduler": {"name": "ExponentialLR", "args": {"gamma": 0.95}, "interval": "step"},
    "checkpoint": {"every_steps": 3, "keep_last": 0},
}
DDP_STEPS = [3, 6, 8, 9, 12, 15, 16]
DDP_FAIL, DDP_RESUME = "13:1", 12  # rank 1 fails at epoch 2, batch 5; resumes at batch 4 of epoch 2

RESUMED = re.compile(r"resuming from (\S+): step (\d+), epoch (\d+), sample (\d+) of the epoch")
ONE_THREAD = {"OMP_NUM_THREADS": 1}  # 2 shared cores: more intra-op threads only oversubscribe them
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def new_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def step_dirs(url: str, options: dict | None = None) -> list[str]:
    """Names directly under a store, listed with fsspec itself (not through CheckpointStore)."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return []


def snapshot(url: str, options: dict | None = None) -> dict:
    """Every file under a store with its bytes: 'nothing deleted or changed' compares two of these."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return {p[len(root):]: fs.cat_file(p) for p in sorted(fs.find(root))}


def names(steps) -> list[str]:
    return [f"step-{s:09d}" for s in steps]


def copy_store(src: Path, url: str, options: dict | None = None) -> None:
    """Copy a local store to `url` on any backend, file by file."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = f"{root}/{path.relative_to(src).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(target, path.read_bytes())


def train_a(folder: Path, name: str, sections: dict, nproc: int = 1) -> SimpleNamespace:
    job = write_job(job_folder(folder), name, **sections)
    proc = run_torchrun("train", job, nproc=nproc) if nproc > 1 else run_cli("train", job, env=ONE_THREAD)
    out = ok(proc)
    state, manifest = newest_state(folder / name / "checkpoints")
    return SimpleNamespace(job=job, out=out, store=folder / name / "checkpoints", state=state,
                           manifest=manifest, metrics=(folder / name / "metrics.jsonl").read_text())


@pytest.fixture(scope="module")
def single_a(tmp_path_factory):
    """Run A, one process, never interrupted."""
    return train_a(tmp_path_factory.mktemp("single"), "a", SINGLE)


@pytest.fixture(scope="module")
def ddp_a(tmp_path_factory):
    """Run A, 2 ranks under torchrun, never interrupted."""
    return train_a(tmp_path_factory.mktemp("ddp"), "a", DDP, nproc=2)


def resumed_at(out: str, world_size: int = 1) -> tuple[str, int, int, int]:
    """(url, step, epoch, batch in epoch) from the relaunch's "resuming from" line (which gives the epoch's
    global sample position: batch × 32 × world size)."""
    found = RESUMED.findall(out)
    assert len(found) == 1, out[-3000:]
    url, step, epoch, sample = found[0]
    assert int(sample) % (32 * world_size) == 0, out[-3000:]
    return url, int(step), int(epoch), int(sample) // (32 * world_size)


def assert_same_run(a: SimpleNamespace, b_state: dict, b_manifest: dict, b_metrics: str) -> None:
    """Bit-identical final state (model, optimizer, scheduler, RNG of every rank, progress) and history."""
    for section in ("model", "optimizer", "scheduler"):
        assert_tensors_equal(a.state[section], b_state[section], section)
    assert_tensors_equal(a.state, b_state, "state")
    assert b_state["progress"]["history"] == a.state["progress"]["history"]
    assert len(a.state["progress"]["history"]) == 2 and b_state["progress"]["finished"]
    assert b_manifest["metrics"] == a.manifest["metrics"] and b_manifest["step"] == a.manifest["step"]
    assert b_metrics == a.metrics


def assert_skipped_consumed(record_dir: Path, world_size: int, batch: int) -> None:
    """The resumed process(es) loaded exactly the rest of epoch 2's shard, none of its consumed samples."""
    size = SIZE
    for rank in range(world_size):
        loaded = [int(v) for p in record_dir.glob(f"rank{rank}-*.txt") for v in p.read_text().split()]
        sampler = ShardedSampler(size, rank, world_size, seed=0, shuffle=True, pad=True)
        sampler.set_epoch(1)
        shard = sampler.shard()
        consumed, rest = shard[:batch * 32], shard[batch * 32:]
        assert consumed and not set(loaded) & set(consumed), f"rank {rank} re-loaded consumed samples"
        assert sorted(loaded) == sorted(rest), f"rank {rank} did not load exactly the rest of the epoch"


def checkpoint_section(request, tmp_path, backend: str) -> tuple[str, dict, dict]:
    """(store url, storage options, env for the children) of an empty store on `backend`."""
    if backend == "s3":
        url, options = request.getfixturevalue("s3_store_url")
        return url, options, S3_ENV
    return str(tmp_path / "ckpt"), {}, {}


# --- 1. bit-exact mid-epoch resume ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_single_process_mid_epoch_resume_is_bit_exact(single_a, request, tmp_path, backend):
    assert step_dirs(str(single_a.store)) == names(SINGLE_STEPS)  # cadence: every 3 steps + epoch ends
    url, options, env = checkpoint_section(request, tmp_path, backend)
    # B: the same job on `backend`, saving every 8 steps (fewer writes; saving must not perturb training),
    # keeping the last 2 and the best 1 by val_loss. The mode is picked so that the best is epoch 1's
    # checkpoint (step 16), not one of the last two, whichever way this run's val_loss moved.
    history = single_a.state["progress"]["history"]
    mode = "max" if history[0]["val_loss"] > history[1]["val_loss"] else "min"
    retention = {"keep_last": 2, "keep_best": 1, "metric": "val_loss", "mode": mode}
    job = write_job(job_folder(tmp_path), "b", **merge(SINGLE, {
        "checkpoint": {"dir": url, "storage_options": options, "every_steps": 8, **retention}}))
    env = {**env, **ONE_THREAD, "RUNNER_TEST_FAIL_AT_STEP": SINGLE_FAIL, "RUNNER_TEST_FAULT_ONCE": tmp_path / "fired"}
    first = run_cli("train", job, env={**env, "RECORD_DIR": new_dir(tmp_path / "rec1")})
    assert first.returncode == 1 and f"injected test fault at step {SINGLE_FAIL}" in first.stderr, first.stderr[-4000:]
    record = new_dir(tmp_path / "rec2")
    out = ok(run_cli("train", job, env={**env, "RECORD_DIR": record}))  # the same command again
    ckpt_url, step, epoch, batch = resumed_at(out)
    assert (step, epoch, batch) == (SINGLE_RESUME, 2, SINGLE_RESUME - 16) and ckpt_url.endswith(
        names([SINGLE_RESUME])[0])
    assert_skipped_consumed(record, 1, batch)
    state, manifest = newest_state(url, options)
    assert_same_run(single_a, state, manifest, (tmp_path / "b" / "metrics.jsonl").read_text())
    # 4. Retention: the last 2 and the best 1 remain, nothing else (listed with fsspec).
    assert step_dirs(url, options) == names([16, 24, 32])
    if backend == "s3":  # `runner ckpt ls s3://… -o endpoint_url=…` in a child process
        listing = ok(run_cli("ckpt", "ls", url, "-o", f"endpoint_url={options['endpoint_url']}", env=S3_ENV))
        rows = [re.split(r"\s{2,}", line.strip()) for line in listing.splitlines()[1:]]
        assert [(r[0], r[-1]) for r in rows] == [("16", f"valid, best val_loss ({mode})"), ("24", "valid"),
                                                 ("32", "valid")], listing  # the kept best is marked


@pytest.mark.slow
def test_two_rank_torchrun_mid_epoch_resume_is_bit_exact(ddp_a, tmp_path):
    assert step_dirs(str(ddp_a.store)) == names(DDP_STEPS)
    assert ddp_a.manifest["world_size"] == 2 and len(ddp_a.state["ranks"]) == 2
    job = write_job(job_folder(tmp_path), "b", **DDP)
    env = {"RUNNER_TEST_FAIL_AT_STEP": DDP_FAIL, "RUNNER_TEST_FAULT_ONCE": tmp_path / "fired"}
    first = run_torchrun("train", job, env={**env, "RECORD_DIR": new_dir(tmp_path / "rec1")})
    first_out = first.stdout + first.stderr
    assert first.returncode != 0 and "injected test fault at step 13 on rank 1" in first_out, first_out[-4000:]
    record = new_dir(tmp_path / "rec2")
    out = ok(run_torchrun("train", job, env={**env, "RECORD_DIR": record}))
    _, step, epoch, batch = resumed_at(out, world_size=2)
    assert (step, epoch, batch) == (DDP_RESUME, 2, DDP_RESUME - 8), first_out[-4000:]
    assert_skipped_consumed(record, 2, batch)
    state, manifest = newest_state(tmp_path / "b" / "checkpoints")
    assert_same_run(ddp_a, state, manifest, (tmp_path / "b" / "metrics.jsonl").read_text())


# --- 2. corrupt checkpoints ------------------------------------------------------------------------------

def _truncate(fs, d):
    fs.pipe_file(f"{d}/state.pt", fs.cat_file(f"{d}/state.pt")[:-100])


def _flip_byte(fs, d):
    data = bytearray(fs.cat_file(f"{d}/state.pt"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{d}/state.pt", bytes(data))


def _drop_manifest(fs, d):
    fs.rm_file(f"{d}/{MANIFEST}")


def _drop_state(fs, d):  # the manifest now points at a missing file
    fs.rm_file(f"{d}/state.pt")


def verify_rows(argv: list[str], capsys) -> tuple[int, dict[int, str]]:
    """Exit code of `runner ckpt verify …` (in process) and its table as {step: status}."""
    code = cli.main(["ckpt", "verify", *argv])
    text = capsys.readouterr().out
    rows = {int(line.split()[0]): line for line in text.splitlines() if line.split()[:1] != ["step"]
            and line[:1].isdigit() and "verified" not in line}
    return code, rows


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_corrupt_newest_checkpoints_are_skipped_with_a_warning(single_a, request, tmp_path, backend, capsys):
    url, options, env = checkpoint_section(request, tmp_path, backend)
    copy_store(single_a.store, url, options)
    fs, root = fsspec.core.url_to_fs(url, **options)
    damage = {32: _truncate, 30: _flip_byte, 27: _drop_manifest, 24: _drop_state}
    for step, how in damage.items():
        how(fs, f"{root}/{names([step])[0]}")
    store_urls = {s: f"{CheckpointStore(url, options).url}/{names([s])[0]}" for s in SINGLE_STEPS}
    o = ["-o", f"endpoint_url={options['endpoint_url']}"] if options else []

    code, rows = verify_rows([url, *o], capsys)
    assert code == 1
    assert {s for s, line in rows.items() if "INVALID" in line} == set(damage), rows
    assert "sha256 mismatch" in rows[30] and "manifest missing" in rows[27] and "state.pt: missing" in rows[24]
    for step in (32, 30):  # one checkpoint: non-zero when bad, zero when good
        code, rows = verify_rows([store_urls[step], *o], capsys)
        assert code == 1 and "INVALID" in rows[step]
    code, rows = verify_rows([store_urls[21], *o], capsys)
    assert code == 0 and rows[21].endswith("valid")

    job = write_job(job_folder(tmp_path), "b", **merge(SINGLE, {"checkpoint": {"dir": url,
                                                                               "storage_options": options}}))
    proc = run_cli("train", job, env={**env, **ONE_THREAD})
    ok(proc)
    assert re.search(rf"skipping checkpoint {re.escape(store_urls[32])}: state.pt: size \d+ != \d+", proc.stderr)
    assert f"skipping checkpoint {store_urls[30]}: state.pt: sha256 mismatch" in proc.stderr
    assert f"removed incomplete checkpoint write {store_urls[27]}" in proc.stderr  # no manifest: not a checkpoint
    assert f"skipping checkpoint {store_urls[24]}: state.pt: missing" in proc.stderr
    assert resumed_at(proc.stdout) == (store_urls[21], 21, 2, 5)  # mid-epoch
    # …and from there it still ends bit-identical to the run that never failed.
    state, manifest = newest_state(url, options)
    assert_same_run(single_a, state, manifest, (tmp_path / "b" / "metrics.jsonl").read_text())


# --- 5. refusals; 6. finished runs and leftovers; 8. GPU-written state on CPU (all in process: cheap) --------

def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("runner: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def single_copy(single_a, tmp_path, one_thread):
    """A's job file and a private copy of its store (tests may damage it)."""
    store = tmp_path / "ckpt"
    shutil.copytree(single_a.store, store)
    job = write_job(job_folder(tmp_path), "c", **merge(SINGLE, {"checkpoint": {"dir": str(store)}}))
    return job, str(store)


@pytest.mark.parametrize("change", ["model.args.width=16", "data.batch_size=16", "train.seed=1"])
def test_incompatible_config_is_refused_and_nothing_deleted(single_copy, capsys, change):
    job, store = single_copy
    before = snapshot(store)
    code, out, err = in_process(["train", job, change], capsys)
    key, _, value = change.partition("=")
    assert_one_line_error(code, err, "step-000000032", "another config", f"{key} ", f"→ {value}",
                          "resume.allow_changes=[", f"{key}]" if key != "data.batch_size" else f"{key},")
    assert "epoch 1" not in out and snapshot(store) == before


@pytest.mark.slow  # its fixture ddp_a is a torchrun run
def test_other_world_size_is_refused_unless_allowed(ddp_a, tmp_path, capsys, one_thread):
    store = tmp_path / "ckpt"
    shutil.copytree(ddp_a.store, store)
    job = write_job(job_folder(tmp_path), "c", **merge(DDP, {"checkpoint": {"dir": str(store)}}))
    before = snapshot(str(store))
    code, out, err = in_process(["train", job], capsys)  # 1 process, checkpoint written by 2
    assert_one_line_error(code, err, "global batch", "64 → 32", "written by 2 process(es), this run has 1",
                          "resume.allow_world_size_change=true")
    assert snapshot(str(store)) == before
    code, out, err = in_process(["train", job, "resume.allow_world_size_change=true"], capsys)
    assert code == 0 and "training already finished at step 16" in out, out + err  # accepted (and finished)
    assert snapshot(str(store)) == before


class RunsCodeOnLoad:
    """Unpickling this calls open(marker, 'w'): the file appears iff the loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_code_in_state_is_refused_not_executed(single_copy, tmp_path, capsys):
    job, store_url = single_copy
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({"model": RunsCodeOnLoad(marker), "progress": {"step": 99}}, buf)
    store = CheckpointStore(store_url)
    meta = {k: v for k, v in store.latest_valid().manifest.items() if k not in ("files", "step", "committed_at")}
    bad = store.commit(99, {"state.pt": buf.getvalue()}, meta)  # a committed checkpoint with a valid manifest
    assert store.verify(bad).valid
    before = snapshot(store_url)
    code, out, err = in_process(["train", job], capsys)
    assert_one_line_error(code, err, bad, "refused to load state.pt")
    code, out, err = in_process(["ckpt", "inspect", bad], capsys)
    assert_one_line_error(code, err, bad, "refused to load state.pt")
    assert not marker.exists() and snapshot(store_url) == before


def test_finished_run_exits_0_and_leftover_temp_dirs_are_removed(single_copy, capsys):
    job, store = single_copy
    leftover = Path(store) / ".tmp-step-000000040-0123abcd"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"half a write")
    code, out, _ = in_process(["ckpt", "ls", store], capsys)
    assert code == 0 and ".tmp" not in out and "40" not in [line.split()[0] for line in out.splitlines()]
    before = snapshot(store)
    code, out, err = in_process(["train", job], capsys)
    assert code == 0 and "training already finished at step 32" in out, out + err
    assert "epoch 1 step" not in out and "committed" not in out  # no training, no saving
    assert f"removed incomplete checkpoint write {leftover}" in err and not leftover.exists()
    assert snapshot(store) == {k: v for k, v in before.items() if ".tmp-" not in k}


def as_if_saved_on_cuda(data: bytes) -> bytes:
    """Rewrite a torch.save archive so that every storage claims to live on cuda:0.

    The pickle (protocol 2, no frames) names each storage's location as the string 'cpu'; a file written on
    a GPU says 'cuda:0' there. The tensor bytes themselves are the same. Runner writes its archives without
    torch's per-record CRC32 (sha256 covers them), which zipfile insists on: save it again with CRC32 first.
    """
    with_crc = io.BytesIO()
    torch.save(torch.load(io.BytesIO(data), weights_only=True), with_crc)
    src, out = zipfile.ZipFile(with_crc), io.BytesIO()
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            blob = src.read(item)
            if item.filename.endswith("/data.pkl"):
                assert cpu in blob
                blob = blob.replace(cpu, cuda)
            dst.writestr(item.filename, blob)
    return out.getvalue()


def test_state_written_on_gpu_resumes_on_cpu(single_copy, capsys):
    job, store_url = single_copy
    store = CheckpointStore(store_url)
    newest = store.latest_valid()
    gpu_bytes = as_if_saved_on_cuda(store.read(newest))
    if not torch.cuda.is_available():  # the rewritten file really asks for a GPU…
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(io.BytesIO(gpu_bytes), weights_only=True)
    meta = {k: v for k, v in newest.manifest.items() if k not in ("files", "step", "committed_at")}
    url = store.commit(32, {"state.pt": gpu_bytes}, meta)  # replaces the newest checkpoint
    code, out, err = in_process(["train", job], capsys)  # …and resume maps it to the CPU first
    assert code == 0 and f"resuming from {url}: step 32" in out and "already finished" in out, out + err
    code, out, err = in_process(["ckpt", "inspect", url], capsys)
    assert code == 0 and "head.weight: (10, 16) float32" in out, out + err


def test_a_crash_still_commits_the_checkpoint_being_written(tmp_path, monkeypatch, one_thread):
    """The entry point flushes a pending save when training dies: the step-2 write, slowed down, is still
    in flight when step 3 raises; it must be committed before the exception leaves train()."""
    job = write_job(job_folder(tmp_path), "c", **merge(SINGLE, {"data": {"num_workers": 0},
                                                                  "checkpoint": {"every_steps": 2}}))
    monkeypatch.setenv("RUNNER_TEST_SLOW_COMMIT_S", "1")
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "3")
    with pytest.raises(RuntimeError, match="injected test fault at step 3"):
        cli.main(["train", str(job)])
    assert step_dirs(str(tmp_path / "c" / "checkpoints")) == names([2])


# --- cadence ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train, every_steps, saved", [
    ({"max_epochs": 2}, 16, [16, 32]),                   # every_steps landing on epoch ends
    ({"max_epochs": 2, "max_steps": 24}, 8, [8, 16, 24]),  # …and on the step where max_steps stops the run
])
def test_every_steps_alone_saves_on_epoch_ends_and_the_last_step(tmp_path, capsys, one_thread, train, every_steps,
                                                                 saved):
    """every_epoch and at_end off: only the step cadence decides (16 steps per epoch)."""
    job = write_job(tmp_path, "c", data={"name": "synthetic", "args": {"size": SIZE, "val_size": 32}},
                    train=train, checkpoint={"every_steps": every_steps, "every_epoch": False, "at_end": False,
                                             "keep_last": 0})
    code, out, err = in_process(["train", job], capsys)
    assert code == 0, out + err
    assert step_dirs(str(tmp_path / "c" / "checkpoints")) == names(saved)


def test_a_state_written_when_history_numbered_epochs_from_0_reads_as_the_log_numbers_them():
    """metrics.jsonl, the log and `ckpt ls` number epochs from 1; a checkpoint written before its history did (no
    "history_epochs_from" in its progress) is renumbered on restore, so the resumed run's metrics.jsonl has one
    numbering."""
    from runner.dist import DistEnv
    from runner.state import Staging, TrainState, capture, restore

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    history = [{"epoch": 1, "step": 4, "train_loss": 0.5}, {"epoch": 2, "step": 8, "train_loss": 0.4}]
    saved = capture(model, optimizer, None, scaler, TrainState(epoch=2, step=8, history=history), env, Staging())
    assert restore(saved, model, optimizer, None, scaler, env, "new", 0, 1).history == history
    old = {**saved, "progress": {k: v for k, v in saved["progress"].items() if k != "history_epochs_from"}}
    old["progress"]["history"] = [{**r, "epoch": r["epoch"] - 1} for r in history]
    restored = restore(old, model, optimizer, None, scaler, env, "old", 0, 1)
    assert restored.history == history and restored.history_epochs_from == 1

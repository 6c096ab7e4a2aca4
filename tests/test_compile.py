"""train.compile (README, "Compiled training"; docs/design.md, "Compiled training"): a compiled run resumes
bit-identically after SIGKILL and SIGTERM (1 process and 2-rank torchrun), its checkpoints are the plain model's,
compile on or off is a free change on resume, and the compile cache travels with the checkpoints (a new machine,
an S3 store) and is ignored with one warning when it is corrupt or was built elsewhere.

Run A (compiled, uninterrupted) is a module fixture; later runs point TORCHINDUCTOR_CACHE_DIR at a copy of its
cache (a user's own setting, which runner keeps), so that only the tests about the cache compile from nothing.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import (assert_tensors_equal, kill_everything, launched, merge, newest_state, ok, run_cli, runner_cmd,
                     run_torchrun, text_corpus, torchrun_cmd, write_job)
from runner.compiler import ARCHIVE, CACHE, CompileCache, pack, signature
from runner.config import load_config
from runner.dist import DistEnv
from runner.events import EventLog
from runner.job import build_job
from runner.loop import enter_phase
from runner.store import MANIFEST, CheckpointStore, sharded

COMPILED = {"train": {"compile": True}, "checkpoint": {"every_steps": 10, "keep_last": 0}}
KILL_AT, RESUME_AT = 57, 50  # epoch 2 of 45-step epochs; the last checkpoint before it
KILL_AT_2, RESUME_AT_2 = 33, 30  # 2 ranks: 23-step epochs
ONE_THREAD = {"OMP_NUM_THREADS": 1}
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# An MLP on 200 samples: batches of 32 and an epoch's last one of 8.
MLP = {"model": {"name": "mlp", "args": {"hidden": [32]}},
       "data": {"name": "synthetic", "args": {"shape": [8], "num_classes": 3, "size": 200, "val_size": 40},
                "batch_size": 32},
       "optim": {"name": "AdamW", "lr": 0.01},
       "train": {"max_epochs": 3, "seed": 0, "progress": "plain"},
       "checkpoint": {"every_steps": 3, "keep_last": 0}}
# Sharded on 2 ranks: 240 windows of 16 tokens, 2 × 4 × 2 accumulated a step, 15 steps an epoch.
FSDP_GPT = {"model": {"name": "gpt", "args": {"layers": 2, "heads": 2, "width": 32, "dropout": 0.1}},
            "data": {"name": "text", "batch_size": 4, "args": {"context": 16}},
            "optim": {"name": "AdamW", "lr": 3.0e-3},
            "train": {"max_epochs": 2, "accumulate": 2, "seed": 0, "progress": "plain"},
            "dist": {"strategy": "fsdp"}, "preemption": {"notice": "off"}}
KILL_AT_FSDP, RESUME_AT_FSDP = 25, 20


def events(out_dir: Path, event: str) -> list[dict]:
    lines = (out_dir / "events.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def train_a(folder: Path, nproc: int = 1, job: dict = COMPILED) -> SimpleNamespace:
    """Run A: write_job(**job), uninterrupted."""
    job = write_job(folder, "a", **job)
    out = ok(run_torchrun("train", job, nproc=nproc) if nproc > 1 else run_cli("train", job, env=ONE_THREAD))
    state, manifest = final_state(folder / "a" / "checkpoints")
    return SimpleNamespace(job=job, out=out, dir=folder / "a", state=state, manifest=manifest,
                           metrics=(folder / "a" / "metrics.jsonl").read_text())


@pytest.fixture(scope="module")
def single_a(tmp_path_factory):
    return train_a(tmp_path_factory.mktemp("compiled"))


@pytest.fixture(scope="module")
def ddp_a(tmp_path_factory):
    return train_a(tmp_path_factory.mktemp("compiled-ddp"), nproc=2)


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory) -> dict:
    corpus = text_corpus(tmp_path_factory.mktemp("corpus"), 4_280)
    return {"base": merge(FSDP_GPT, {"data": {"args": {"path": corpus}}}), **COMPILED}


@pytest.fixture(scope="module")
def fsdp_a(tmp_path_factory, fsdp_job):
    return train_a(tmp_path_factory.mktemp("compiled-fsdp"), nproc=2, job=fsdp_job)


def final_state(ckpt_dir: Path) -> tuple[dict, dict]:
    """newest_state, with a sharded checkpoint's model and optimizer gathered whole from every rank's shards."""
    state, manifest = newest_state(ckpt_dir)
    if sharded.SHARDED in manifest:
        store = CheckpointStore(str(ckpt_dir))
        info = store.latest_valid()
        state = {**state, **{part: sharded.read_full(store, info, part) for part in ("model", "optimizer")}}
    return state, manifest


def warm_cache(a: SimpleNamespace, tmp_path: Path) -> dict:
    """The environment of a run that finds A's compiled kernels in its own (user-set) cache directory."""
    target = tmp_path / "inductor-cache"
    shutil.copytree(a.dir / CACHE / "rank-0", target)
    return {**ONE_THREAD, "TORCHINDUCTOR_CACHE_DIR": target}


def assert_same_run(a: SimpleNamespace, out_dir: Path) -> None:
    state, manifest = final_state(out_dir / "checkpoints")
    for section in ("model", "optimizer", "scheduler"):
        assert_tensors_equal(a.state[section], state[section], section)
    assert_tensors_equal(a.state, state, "state")
    assert state["progress"]["finished"] and manifest["step"] == a.manifest["step"]
    assert (out_dir / "metrics.jsonl").read_text() == a.metrics


def wait_for_step(out_dir: Path, step: int, proc, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int((out_dir / "last_step").read_text()) >= step:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_at(cmd: list[str], out_dir: Path, log: Path, step: int, **env) -> None:
    """Run `cmd` until step `step` (where it hangs), then SIGKILL every process of it."""
    with launched(cmd, log, RUNNER_TEST_HANG_AT_STEP=step, **env) as proc:
        wait_for_step(out_dir, step, proc)
        kill_everything(proc)


# --- exact resume ----------------------------------------------------------------------------------------------

def killed(a: SimpleNamespace, tmp_path: Path, nproc: int, step: int, job: dict = COMPILED) -> tuple[Path, dict]:
    """A's job (write_job(**job)) run again as B with A's kernels at hand, SIGKILLed after `step`: (B's job file,
    its environment)."""
    job = write_job(tmp_path, "b", **job)
    env = warm_cache(a, tmp_path)
    cmd = torchrun_cmd("train", job) if nproc > 1 else runner_cmd("train", job)
    kill_at(cmd, tmp_path / "b", tmp_path / "b1.log", step, **env)
    return job, env


def train(job: Path, env: dict, nproc: int = 1) -> str:
    return ok(run_torchrun("train", job, env=env, nproc=nproc) if nproc > 1 else run_cli("train", job, env=env))


def killed_and_resumed(a: SimpleNamespace, tmp_path: Path, nproc: int, step: int, job: dict = COMPILED) -> str:
    """killed, then the same command; its output."""
    return train(*killed(a, tmp_path, nproc, step, job), nproc)


@pytest.mark.slow
def test_compiled_run_resumes_bit_identically_after_sigkill(single_a, tmp_path):
    assert not any("_orig_mod" in key for key in single_a.state["model"])  # the plain module's keys
    assert events(single_a.dir, "compiled")[-1]["compilations"] > 0  # it did compile
    out = killed_and_resumed(single_a, tmp_path, 1, KILL_AT)
    assert f"resuming from {tmp_path / 'b' / 'checkpoints'}/step-{RESUME_AT:09d}" in out, out[-3000:]
    assert_same_run(single_a, tmp_path / "b")


@pytest.mark.slow
def test_compiled_run_stopped_by_sigterm_loses_no_step_and_ends_identical(single_a, tmp_path):
    job = write_job(tmp_path, "b", **COMPILED)
    env = warm_cache(single_a, tmp_path)
    stopped = run_cli("train", job, env={**env, "RUNNER_TEST_SIGNAL_AT_STEP": KILL_AT})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    out = ok(run_cli("train", job, env=env))
    assert f"step-{KILL_AT:09d}: step {KILL_AT}," in out and "; 0 step(s) lost" in out, out[-3000:]
    assert_same_run(single_a, tmp_path / "b")


@pytest.mark.slow
def test_two_rank_compiled_run_resumes_bit_identically_after_sigkill(ddp_a, tmp_path):
    assert ddp_a.manifest["world_size"] == 2
    out = killed_and_resumed(ddp_a, tmp_path, 2, KILL_AT_2)
    assert f"step-{RESUME_AT_2:09d}" in out, out[-3000:]
    assert_same_run(ddp_a, tmp_path / "b")


@pytest.mark.slow
def test_compile_is_a_free_change_on_resume_both_ways(single_a, tmp_path):
    """A compiled run's checkpoint resumes eagerly, and an eager run's resumes compiled: the drift rule lets it
    (float rounding, like train.device), and the state is the plain module's either way."""
    eager = write_job(tmp_path, "eager", train={"max_epochs": 1}, checkpoint={"dir": str(tmp_path / "e")})
    ok(run_cli("train", eager, env=ONE_THREAD))
    out = ok(run_cli("train", eager, "train.max_epochs=2", "train.compile=true", env=warm_cache(single_a, tmp_path)))
    assert "resuming from" in out and "done: 90 steps" in out, out[-3000:]
    shutil.copytree(single_a.dir / "checkpoints", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / f"step-{90:09d}")  # resume A's step-80 checkpoint eagerly, to the end
    again = write_job(tmp_path, "again", checkpoint={"dir": str(tmp_path / "c")})
    out = ok(run_cli("train", again, env=ONE_THREAD))
    assert "resuming from" in out and "step-000000080" in out and "done: 90 steps" in out, out[-3000:]


@pytest.mark.slow
def test_automatic_dynamic_shapes_resume_within_the_documented_tolerance(tmp_path):
    """README, "Compiled training": with `dynamic: null` a resumed process may compile another kernel for a shape
    than the uninterrupted one did (which graph a shape gets depends on the shapes seen before), so the promise is
    float rounding, not bits: weights within 1e-4 relative. An MLP on 200 samples: batches of 32 and a last one of 8,
    so the second shape turns the batch dimension dynamic in one process and not yet in the other."""
    base = merge(MLP, {"train": {"compile": {"dynamic": None}}})
    env = {**ONE_THREAD, "TORCHINDUCTOR_CACHE_DIR": tmp_path / "inductor-cache"}
    ok(run_cli("train", write_job(tmp_path, "a", base=base), env=env))
    job = write_job(tmp_path, "b", base=base)
    crashed = run_cli("train", job, env={**env, "RUNNER_TEST_FAIL_AT_STEP": 10})  # epoch 2: resumes from step 9
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    ok(run_cli("train", job, env=env))
    a, _ = newest_state(tmp_path / "a" / "checkpoints")
    b, _ = newest_state(tmp_path / "b" / "checkpoints")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_max_autotune_resumes_bit_identically_on_a_cpu_even_without_the_compile_cache(tmp_path):
    """README, "Compiled training": on a CPU a training matmul has one candidate kernel (inductor's C++ GEMM
    template needs constant weights, as in inference), so max-autotune picks the same kernels in every launch.
    The resumed process here compiles from nothing: an empty local cache and the store's copy removed."""
    job = {"base": merge(MLP, {"data": {"args": {"size": 192, "val_size": 32}}}),  # one shape: fewer compiles
           "train": {"compile": {"mode": "max-autotune"}, "max_epochs": 2}}  # 6 steps an epoch
    a = train_a(tmp_path, job=job)
    b, _ = killed(a, tmp_path, 1, 10, job)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / CACHE, ignore_errors=True)
    out = train(b, {**ONE_THREAD, "TORCHINDUCTOR_CACHE_DIR": tmp_path / "empty"})
    assert f"step-{9:09d}" in out, out[-3000:]  # mid-epoch 2
    assert events(tmp_path / "b", "compile_cache")[-1]["source"] == "none"
    assert events(tmp_path / "b", "compiled")[-1]["graph_cache_misses"] > 0  # it compiled (and autotuned) again
    assert_same_run(a, tmp_path / "b")


# --- what is compiled ------------------------------------------------------------------------------------------

def test_in_one_process_runner_compiles_its_step_as_one_graph_and_leaves_the_model_plain(tmp_path):
    """Forward, loss and correct count in one graph (no eager ops around the model's call), the module not
    compiled in place, and the same loss as the eager step to float rounding."""
    from torch._dynamo.utils import counters

    job = build_job(load_config(write_job(tmp_path, base=MLP, **COMPILED)), DistEnv(0, 0, 1, torch.device("cpu")))
    x, y = map(torch.stack, zip(*(job.data.train[i] for i in range(32))))
    eager_loss, (eager_correct, _) = job.step_fn(job.model, (x, y), True)
    torch._dynamo.reset()
    counters.clear()
    enter_phase(job, -1)
    loss, (correct, samples) = job.step_fn(job.model, (x, y), True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert job.model._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in job.model.state_dict())
    torch.testing.assert_close(loss, eager_loss)
    assert correct == eager_correct and samples == 32
    loss.backward()
    assert all(p.grad is not None for p in job.model.parameters())


# --- under fsdp ------------------------------------------------------------------------------------------------

def test_under_fsdp_each_block_is_compiled_on_its_own_and_the_root_is_not(tmp_path, fsdp_job):
    """torchtitan's order: the blocks compiled before FSDP shards them, the root (embeddings, head) eager."""
    job = build_job(load_config(write_job(tmp_path, **fsdp_job)), DistEnv(0, 0, 1, torch.device("cpu")))
    enter_phase(job, -1)
    assert [b._compiled_call_impl is not None for b in job.model.blocks] == [True, True]
    assert job.model._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in job.model.state_dict())


@pytest.mark.slow
def test_two_rank_fsdp_compiled_run_resumes_bit_identically_after_sigkill(fsdp_a, fsdp_job, tmp_path):
    assert fsdp_a.manifest["world_size"] == 2 and sharded.SHARDED in fsdp_a.manifest
    assert not any("_orig_mod" in key for key in fsdp_a.state["model"])
    assert events(fsdp_a.dir, "compiled")[-1]["compilations"] > 0
    out = killed_and_resumed(fsdp_a, tmp_path, 2, KILL_AT_FSDP, fsdp_job)
    assert f"step-{RESUME_AT_FSDP:09d}" in out, out[-3000:]
    assert_same_run(fsdp_a, tmp_path / "b")


# --- the compile cache -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_cache_travels_to_a_new_machine_through_s3(single_a, s3_store_url, tmp_path):
    """A has compiled everything; a "new machine" (an empty out_dir, so an empty local cache) resumes A's run
    from an S3 store holding A's checkpoints and cache: it extracts the cache before its first step and the
    compiler finds every graph there (no graph compiled again)."""
    url, options = s3_store_url
    fs = CheckpointStore(url, options).fs
    a_store = single_a.dir / "checkpoints"
    for name in (CACHE, f"step-{90:09d}"):  # A's cache and its last checkpoint, file by file
        for path in (a_store / name).iterdir():
            fs.pipe_file(f"{url.split('://', 1)[1]}/{name}/{path.name}", path.read_bytes())
    data = (a_store / CACHE / ARCHIVE).read_bytes()
    job = write_job(tmp_path, "new", **merge(COMPILED, {"checkpoint": {"dir": url, "storage_options": options}}))
    out = ok(run_cli("train", job, "train.max_epochs=3", env={**ONE_THREAD, **S3_ENV}))
    assert "compile cache: " in out and f"from {url}/{CACHE}" in out, out[-3000:]
    restored = events(tmp_path / "new", "compile_cache")[-1]
    assert restored["source"] == "store" and restored["files"] > 0 and restored["bytes"] == len(data)
    compiled = events(tmp_path / "new", "compiled")[-1]
    assert compiled["graph_cache_hits"] > 0 and compiled["graph_cache_misses"] == 0, compiled
    report = json.loads(ok(run_cli("report", str(tmp_path / "new"), "--json")))
    launch = report["launches"][-1]
    assert launch["compile_s"] > 0 and launch["start"] == "resumed"


def unset_inductor_cache_dir(monkeypatch) -> None:
    """As if the user set none (torch's default counts as unset); restored after the test, since CompileCache
    points the variable at runner's folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())


def cache_with(tmp_path: Path, problem: str) -> CompileCache:
    """A CompileCache over a real local store whose cache archive has `problem`, and an empty local cache."""
    source = tmp_path / "kernels"
    (source / "fxgraph").mkdir(parents=True)
    (source / "fxgraph" / "entry").write_bytes(b"graph")
    store = CheckpointStore(str(tmp_path / "ckpt"))
    sig = signature(torch.device("cpu"))
    if problem == "other torch":
        sig = {**sig, "torch": "2.0.0"}
    store.commit_side(CACHE, {ARCHIVE: pack(source)}, {"signature": sig})
    if problem == "corrupt":
        archive = tmp_path / "ckpt" / CACHE / ARCHIVE
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 1
        archive.write_bytes(bytes(data))
    cfg = load_config(write_job(tmp_path, "job", train={"compile": True}))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cache = CompileCache(cfg, env, store, EventLog(tmp_path / "events.jsonl", True))
    cache.clock.close()  # nothing compiles here
    return cache


@pytest.mark.parametrize("problem, said", [("corrupt", "sha256 mismatch"),
                                           ("other torch", "built for another setup: torch 2.0.0 (here")])
def test_a_bad_compile_cache_is_ignored_with_one_warning(tmp_path, monkeypatch, capsys, problem, said):
    unset_inductor_cache_dir(monkeypatch)
    cache = cache_with(tmp_path, problem)
    cache.restore()  # never raises: the run compiles from scratch
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "not using the compile cache" in warnings[0] and said in warnings[0], warnings
    assert not (cache.local / "fxgraph" / "entry").exists()
    assert events(tmp_path, "compile_cache")[-1]["source"] == "none"


def test_a_good_compile_cache_fills_an_empty_local_cache_and_a_warm_one_is_kept(tmp_path, monkeypatch):
    unset_inductor_cache_dir(monkeypatch)
    cache = cache_with(tmp_path, "none")
    assert cache.local == tmp_path / "job" / CACHE / "rank-0"
    cache.restore()
    assert (cache.local / "fxgraph" / "entry").read_bytes() == b"graph"
    (cache.local / "fxgraph" / "entry").write_bytes(b"newer")  # a warm local cache wins over the store's
    cache.restore()
    assert (cache.local / "fxgraph" / "entry").read_bytes() == b"newer"
    assert [e["source"] for e in events(tmp_path, "compile_cache")] == ["store", "local"]


def test_a_cache_archive_cannot_write_outside_the_cache_directory(tmp_path, monkeypatch, capsys):
    """The archive holds compiled code, so it is trusted like the store; still, a path outside the cache
    directory or a link is refused (tarfile's "data" filter), with one warning."""
    import io
    import tarfile

    unset_inductor_cache_dir(monkeypatch)
    cache = cache_with(tmp_path, "none")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    cache.store.commit_side(CACHE, {ARCHIVE: buffer.getvalue()}, {"signature": signature(torch.device("cpu"))})
    cache.restore()
    assert not (tmp_path / "job" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert "cannot extract it" in capsys.readouterr().err


def test_compile_cache_is_not_a_checkpoint(tmp_path):
    """The side directory beside the checkpoints is invisible to listing, retention and clean-up."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.commit(5, {"state.pt": b"x"}, {})
    store.commit_side(CACHE, {ARCHIVE: b"kernels"}, {"signature": {}})
    assert [i.step for i in store.list()] == [5]
    assert store.cleanup_partial() == [] and store.prune(keep_last=1) == []
    assert json.loads((tmp_path / "ckpt" / CACHE / MANIFEST).read_text())["files"][ARCHIVE]["size"] == 7
    assert store.read_side(CACHE, ARCHIVE)[1] == b"kernels"


# --- the switch ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, enabled, mode", [(True, True, None), (False, False, None),
                                                  ({"mode": "max-autotune"}, True, "max-autotune"),
                                                  ({"enabled": False, "mode": "max-autotune"}, False, "max-autotune")])
def test_train_compile_takes_a_switch_or_a_mapping(tmp_path, value, enabled, mode):
    cfg = load_config(write_job(tmp_path, train={"compile": value}))
    assert (cfg.train.compile.enabled, cfg.train.compile.mode) == (enabled, mode)
    assert cfg.train.compile.dynamic is False  # one static graph per shape: the condition for exact resume


def test_train_compile_names_a_bad_key(tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile.mode"):
        load_config(write_job(tmp_path, train={"compile": {"mode": "fastest"}}))
    with pytest.raises(ConfigError, match="'train.compile' sets both mode and options"):
        load_config(write_job(tmp_path, train={"compile": {"mode": "default", "options": {"max_autotune": True}}}))
    with pytest.raises(ConfigError, match="unknown key 'train.compile.modes'"):
        load_config(write_job(tmp_path, train={"compile": {"modes": "default"}}))

"""Resuming sharded (dist.strategy: fsdp) runs, real torchrun on CPU with gloo: what a user relies on when a
sharded job dies or is moved (README, "Models larger than one process"; docs/design.md, "Sharded checkpoints").

- A job SIGKILLed while its ranks write a checkpoint (shards written, no manifest yet) resumes with the same command
  from the previous complete checkpoint, the interrupted attempt is removed, and it ends bit for bit where an
  uninterrupted run ends: model, optimizer state, scheduler, every rank's RNG, metrics.jsonl.
- The same holds for a user's own transformer class named in the job file, sharded by `dist.fsdp_blocks`.
- A run moved 4 → 2 → 3 ranks with a fixed `data.global_batch_size` trains every sample exactly once, in the
  uninterrupted order, and follows the uninterrupted loss curve (to the order of reductions).
- The same bit-exact resume with `checkpoint.dir` on an S3-protocol server, where no leftover object survives.
- A freeze-then-fine-tune plan under fsdp: frozen parameters keep their initial values bit for bit, train once
  unfrozen, and a kill in the frozen phase resumes across the phase boundary to the uninterrupted weights.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from fault_helpers import assert_store_sound, last_step, text, wait_until
from helpers import (assert_tensors_equal, consumed, epoch_order, job_folder, kill_everything, merge, ok, run_torchrun,
                     start, text_corpus, torchrun_cmd, write_job)
from runner.store import CheckpointStore, sharded
from runner.store.manifest import MANIFEST, stored_object

pytestmark = pytest.mark.slow

# 4,280 bytes of text: 240 training windows of 16 tokens (a multiple of every global batch below: no padding on
# any world size) and 26 validation windows.
CORPUS_BYTES, TRAIN_SAMPLES, CONTEXT = 4_280, 240, 16
GPT = {"name": "gpt", "args": {"layers": 2, "heads": 2, "width": 32, "dropout": 0.1}}
COMMON = {
    "optim": {"name": "AdamW", "lr": 3.0e-3},
    "train": {"max_epochs": 2, "grad_clip": 1.0, "log_every_steps": 5, "seed": 0, "progress": "plain"},
    "dist": {"strategy": "fsdp", "timeout_s": 60},
    "preemption": {"notice": "off"},
}
# 2 ranks × 4 samples × 2 accumulated = 16 a step: 15 steps an epoch, 30 in all.
TWO_RANKS = merge(COMMON, {
    "model": GPT,
    "data": {"name": "text", "batch_size": 4, "args": {"context": CONTEXT}},
    "scheduler": {"name": "CosineAnnealingLR", "interval": "step", "args": {"T_max": 30}},
    "train": {"accumulate": 2},
    "checkpoint": {"every_steps": 4, "keep_last": 0},
})
# A global batch of 24 (2 per rank, accumulated 3 × on 4 ranks, 6 × on 2, 4 × on 3): 10 steps an epoch, 30 in all.
# No dropout: its randomness is per rank, so it would differ on another world size.
FOUR_RANKS = merge(COMMON, {
    "model": merge(GPT, {"args": {"dropout": 0.0}}),
    "data": {"name": "recording_data:build", "batch_size": 2, "global_batch_size": 24, "num_workers": 0,
             "args": {"source": "text", "context": CONTEXT}},
    "scheduler": {"name": "CosineAnnealingLR", "interval": "step", "args": {"T_max": 30}},
    "train": {"max_epochs": 3},
    "checkpoint": {"every_steps": 3, "keep_last": 0},
})
STEPS_4 = 10  # optimizer steps per epoch of FOUR_RANKS, on any world size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"), CORPUS_BYTES)


def job_file(folder: Path, name: str, base: dict, corpus: str, **changes) -> Path:
    job_folder(folder)
    return write_job(folder, name, base=merge(base, {"data": {"args": {"path": corpus}}}), **changes)


def final_state(url, options: dict | None = None, step: int | None = None) -> tuple[dict, dict]:
    """(state, manifest) of the newest valid checkpoint (or that of `step`), fully verified: the model and
    optimizer tensors gathered whole in this process (as `runner export` does), with rank 0's state.pt
    (scheduler, every rank's RNG and running sums)."""
    store = CheckpointStore(str(url), options)
    info = store.latest_valid() if step is None else next(i for i in store.list() if i.step == step)
    assert info is not None and sharded.SHARDED in info.manifest, info
    assert store.verify(info).valid, store.verify(info).reason
    rest = torch.load(io.BytesIO(store.read(info)), weights_only=True)
    state = {"model": sharded.read_full(store, info, "model"), "optimizer": sharded.read_full(store, info, "optimizer"),
             "scheduler": rest["scheduler"], "ranks": rest["ranks"]}
    assert state["model"] and state["optimizer"]
    return state, info.manifest


def assert_same_end(out_dir: Path, reference: dict, url=None, options: dict | None = None) -> None:
    """The run in out_dir ended bit for bit where the uninterrupted `reference` did (its state, its metrics)."""
    state, manifest = final_state(url or out_dir / "checkpoints", options)
    assert manifest["finished"] and manifest["step"] == reference["step"], manifest["step"]
    for section in ("model", "optimizer", "scheduler", "ranks"):
        assert_tensors_equal(state[section], reference["state"][section], section)
    assert (out_dir / "metrics.jsonl").read_text() == reference["metrics"]


def uninterrupted(job: Path, nproc: int) -> dict:
    out = ok(run_torchrun("train", job, nproc=nproc))
    out_dir = job.with_suffix("")
    state, manifest = final_state(out_dir / "checkpoints")
    assert manifest["world_size"] == nproc and len([n for n in manifest["files"] if n.endswith(".distcp")]) == nproc
    return {"state": state, "step": manifest["step"], "metrics": (out_dir / "metrics.jsonl").read_text(),
            "out_dir": out_dir, "log": out}


def killed_after_commit(job: Path, nproc: int, step_at_least: int, log: Path, **env) -> None:
    """Launch the job, SIGKILL every process of it once a checkpoint of `step_at_least` or later is committed."""
    proc = start(torchrun_cmd("train", job, nproc=nproc), log, **env)
    try:
        wait_until(lambda: any(int(s) >= step_at_least for s in re.findall(r"checkpoint step (\d+) committed",
                                                                           text(log))),
                   f"a checkpoint of step {step_at_least} or later", proc, log)
    finally:
        kill_everything(proc)


def resumed_step(out: str) -> int:
    found = re.findall(r"resuming from \S+/step-(\d+): step (\d+)", out)
    assert len(found) == 1, out[-3000:]
    return int(found[0][1])


@pytest.fixture(scope="module")
def straight4(tmp_path_factory, corpus):
    """The uninterrupted 4-rank run of FOUR_RANKS."""
    folder = tmp_path_factory.mktemp("straight4")
    return uninterrupted(job_file(folder, "job", FOUR_RANKS, corpus), 4)


# --- 1. SIGKILL during a sharded write --------------------------------------------------------------------------

def test_a_kill_while_the_ranks_write_a_checkpoint_resumes_from_the_previous_one_bit_for_bit(tmp_path, corpus,
                                                                                            straight4):
    """4 ranks; every commit pauses after all ranks' shards are written, before the manifest
    (RUNNER_TEST_SLOW_COMMIT_S). SIGKILL to every process during step 6's pause: step 3 stays the newest
    checkpoint, the same command removes the interrupted attempt and resumes from step 3."""
    job = job_file(tmp_path, "job", FOUR_RANKS, corpus)
    ckpt, log = tmp_path / "job" / "checkpoints", tmp_path / "killed.log"

    def shards_without_manifest():
        for attempt in ckpt.glob(".tmp-step-000000006-*"):
            try:
                names = {p.name for p in attempt.iterdir()}
            except FileNotFoundError:  # renamed into place (committed) or removed meanwhile: the wait fails
                continue
            if MANIFEST not in names and "state.pt" in names and any(n.startswith("dcp-") for n in names) and \
                    len([n for n in names if n.endswith(".distcp")]) == 4:
                return attempt
        return None

    proc = start(torchrun_cmd("train", job, nproc=4), log, RUNNER_TEST_SLOW_COMMIT_S=4)
    try:
        wait_until(lambda: "checkpoint step 3 committed" in text(log), "step 3 committed", proc, log)
        interrupted = wait_until(shards_without_manifest, "step 6's shards written, its manifest not", proc, log)
    finally:
        kill_everything(proc)  # SIGKILL to every process of the job, in the pause before step 6's manifest
    assert "checkpoint step 6 committed" not in text(log)
    assert interrupted.exists() and not (interrupted / MANIFEST).exists() and not (ckpt / "step-000000006").exists()
    attempt = re.fullmatch(r"\.tmp-step-000000006-([0-9a-f]+)", interrupted.name).group(1)
    store = CheckpointStore(str(ckpt))
    assert store.latest_valid().step == 3  # the interrupted write is no checkpoint

    out = ok(run_torchrun("train", job, nproc=4))
    assert f"removed incomplete checkpoint write {store._url(interrupted.name)}" in out, out[-3000:]
    assert resumed_step(out) == 3 and int(re.search(r"; (\d+) step\(s\) lost", out).group(1)) >= 3, out[-3000:]
    assert not interrupted.exists() and not list(ckpt.glob(".tmp-*"))
    assert not [p for p in ckpt.rglob("*") if attempt in p.name]  # nothing of the interrupted attempt is left
    assert [i.step for i in assert_store_sound(str(ckpt)) if i.valid] == [3, 6, 9, 10, 12, 15, 18, 20, 21, 24, 27,
                                                                          30]
    assert_same_end(tmp_path / "job", straight4)


# --- 3. 4 → 2 → 3 ranks -----------------------------------------------------------------------------------------

def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_four_then_two_then_three_ranks_consume_every_sample_once_and_follow_the_curve(tmp_path, corpus, straight4):
    """4 ranks stopped mid-epoch 1 (SIGTERM to rank 1), resumed resharded on 2 and stopped mid-epoch 2, resumed on 3
    to the end: each epoch's samples are its uninterrupted order, each once; the loss curve is the 4-rank one."""
    job = job_file(tmp_path, "job", FOUR_RANKS, corpus)
    records = [tmp_path / f"rec{i}" for i in range(3)]
    for r in records:
        r.mkdir()
    # the signal lands after step 3 on rank 1; the ranks agree on it one step later
    first = run_torchrun("train", job, nproc=4, env={"RECORD_DIR": records[0], "RUNNER_TEST_SIGNAL_AT_STEP": "3:1"})
    assert "preempted: step 4 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_torchrun("train", job, nproc=2, env={"RECORD_DIR": records[1], "RUNNER_TEST_SIGNAL_AT_STEP": "14:1"})
    out = second.stdout + second.stderr
    assert "preempted: step 15 committed" in out, out[-3000:]
    assert "world size 4 → 2" in out and "step 4, epoch 1, sample 96 of the epoch (written by 4 process(es))" in out
    assert "global batch 24 (2 per rank × 6 accumulated)" in out, out[-3000:]
    third = ok(run_torchrun("train", job, nproc=3, env={"RECORD_DIR": records[2]}))
    assert "world size 2 → 3" in third and "step 15, epoch 2, sample 120 of the epoch (written by 2" in third
    assert "global batch 24 (2 per rank × 4 accumulated)" in third and f"done: {3 * STEPS_4} steps, 3 epochs" in third

    launches = [consumed(records[0], 4), consumed(records[1], 2), consumed(records[2], 3)]
    assert [len(x) for x in launches] == [96, 144 + 120, 120 + 240]
    epochs = [launches[0] + launches[1][:144], launches[1][144:] + launches[2][:120], launches[2][120:]]
    for epoch, indices in enumerate(epochs):
        assert indices == epoch_order(TRAIN_SAMPLES, epoch), f"epoch {epoch + 1} is not the uninterrupted order"
        assert sorted(indices) == list(range(TRAIN_SAMPLES))

    want, got = history(straight4["out_dir"]), history(tmp_path / "job")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [10, 20, 30]
    worst = 0.0
    for a, b in zip(want, got):
        for key in ("train_loss", "val_loss", "lr"):
            worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))  # the cosine's lr ends at 0
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (key, a, b)
    state, manifest = final_state(tmp_path / "job" / "checkpoints")
    assert manifest["world_size"] == 3
    weights = max((state["model"][k] - v).abs().max().item() for k, v in straight4["state"]["model"].items())
    print(f"4 → 2 → 3 ranks: largest relative difference of train_loss/val_loss/lr {worst:.2e}, of weights "
          f"{weights:.2e} (absolute)")
    for name, tensor in straight4["state"]["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-5)


# --- 2. a user's transformer, sharded by dist.fsdp_blocks -------------------------------------------------------

# A decoder of the user's own, not runner's gpt: its layers in an nn.Sequential (no nn.ModuleList, so only
# dist.fsdp_blocks makes each Layer a unit), a bare nn.Parameter for positions, hand-written attention with dropout.
# With UNITS_DIR set, each rank records the classes of its root and layers at the first forward: fully_shard
# turns a module it shards into FSDP<Class>.
USER_MODEL = '''
import math
import os

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width),
                                nn.Dropout(dropout))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(w, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        y = self.drop(scores.softmax(-1)) @ v
        x = x + self.out(y.transpose(1, 2).reshape(b, n, w))
        return x + self.ff(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, num_classes, context, width=32, heads=2, layers=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(num_classes, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.layers = nn.Sequential(*(Layer(width, heads, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, num_classes)
        self.recorded = False

    def forward(self, idx):
        if not self.recorded and os.environ.get("UNITS_DIR"):
            path = os.path.join(os.environ["UNITS_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
            with open(path, "w") as f:
                f.write(" ".join([type(self).__name__] + [type(m).__name__ for m in self.layers]))
            self.recorded = True
        x = self.layers(self.embed(idx) + self.pos[: idx.shape[1]])
        return self.unembed(self.norm(x)).transpose(1, 2).contiguous()
'''


def test_a_user_transformer_sharded_by_its_block_class_resumes_bit_for_bit(tmp_path, corpus):
    (tmp_path / "tiny_lm.py").write_text(USER_MODEL)
    base = merge(TWO_RANKS, {"model": {"name": "tiny_lm:TinyLM", "args": {"context": CONTEXT, "dropout": 0.1}},
                             "dist": {"fsdp_blocks": ["Layer"]}})
    straight = uninterrupted(job_file(tmp_path, "straight", base, corpus), 2)
    job = job_file(tmp_path, "job", base, corpus)
    units = tmp_path / "units"
    units.mkdir()
    killed_after_commit(job, 2, 8, tmp_path / "killed.log", UNITS_DIR=units)  # mid-epoch 1 (15 steps an epoch)
    assert [(units / f"rank{r}.txt").read_text() for r in range(2)] == ["FSDPTinyLM FSDPLayer FSDPLayer"] * 2
    out = ok(run_torchrun("train", job))
    assert 8 <= resumed_step(out) < straight["step"], out[-3000:]
    assert "layers.0.qkv.weight" in straight["state"]["model"] and "pos" in straight["state"]["model"]
    assert_same_end(tmp_path / "job", straight)


# --- 4. on an S3-protocol server --------------------------------------------------------------------------------

def objects(fs, root: str) -> dict[str, set[str]]:
    """{step directory: names of its objects} under a store on S3, listed with s3fs itself."""
    fs.invalidate_cache()
    found: dict[str, set[str]] = {}
    for path in fs.find(root):
        folder, _, name = path[len(root) + 1:].rpartition("/")
        if folder:
            found.setdefault(folder, set()).add(name)
    return found


def test_a_sharded_run_on_s3_killed_while_writing_resumes_bit_for_bit_and_leaves_no_stray_object(
        tmp_path, corpus, s3_store_url):
    """checkpoint.dir on the moto S3 server: SIGKILL while step 8's shards are uploaded and its manifest is not;
    the same command resumes from step 4 to the end of an uninterrupted run of the same job on a local directory
    (where checkpoints go does not change what trains)."""
    import s3fs

    url, options = s3_store_url
    straight = uninterrupted(job_file(tmp_path, "straight", TWO_RANKS, corpus), 2)
    job = job_file(tmp_path, "job", TWO_RANKS, corpus,
                   checkpoint={"dir": url, "storage_options": {"endpoint_url": options["endpoint_url"]}})
    fs, root = s3fs.S3FileSystem(**options), url.removeprefix("s3://")
    log = tmp_path / "killed.log"

    def uploaded_without_manifest():
        names = objects(fs, root).get("step-000000008", set())
        return MANIFEST not in names and any(n.startswith("state.") for n in names) and \
            len([n for n in names if n.endswith(".distcp")]) == 2 and names

    proc = start(torchrun_cmd("train", job), log, RUNNER_TEST_SLOW_COMMIT_S=4)
    try:
        wait_until(lambda: "checkpoint step 4 committed" in text(log), "step 4 committed", proc, log)
        names = wait_until(uploaded_without_manifest, "step 8's shards uploaded, its manifest not", proc, log, poll=0.2)
    finally:
        kill_everything(proc)
    attempt = next(n for n in names if n.startswith("dcp-")).removeprefix("dcp-").removesuffix(".metadata")
    assert MANIFEST not in objects(fs, root)["step-000000008"]
    assert CheckpointStore(url, options).latest_valid().step == 4

    out = ok(run_torchrun("train", job))
    assert f"removed incomplete checkpoint write {url}/step-000000008" in out and resumed_step(out) == 4, out[-3000:]
    store = CheckpointStore(url, options)
    for folder, found in objects(fs, root).items():  # every object is a committed checkpoint's
        info = store.info(f"{url}/{folder}")
        assert info.valid, (folder, info.reason)
        assert found == {MANIFEST} | {stored_object(n, e) for n, e in info.manifest["files"].items()}, folder
        assert not [n for n in found if attempt in n], folder
    assert_same_end(tmp_path / "job", straight, url, options)


# --- 5. freeze, then fine-tune everything -------------------------------------------------------------------------

FINETUNE = merge(TWO_RANKS, {"finetune": {"phases": [{"epochs": 1, "train": ["blocks.1"]}, {"train": ["all"]}]},
                             "checkpoint": {"every_steps": 5}})


@pytest.fixture(scope="module")
def straight_finetune(tmp_path_factory, corpus):
    """The uninterrupted 2-rank run of FINETUNE, and the initial weights (train.seed) every rank started from."""
    from runner.components import build_model
    from runner.config import ModelConfig

    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in build_model(ModelConfig(**GPT), 256, (CONTEXT,)).state_dict().items()}
    straight = uninterrupted(job_file(tmp_path_factory.mktemp("finetune"), "straight", FINETUNE, corpus), 2)
    assert "phase 1/2: training blocks.1" in straight["log"] and "phase 2/2: training all" in straight["log"]
    return straight, initial


def test_frozen_parameters_keep_their_initial_values_bit_for_bit_then_train(straight_finetune):
    """Epoch 1 trains only the last block, epoch 2 everything: the checkpoint at the end of epoch 1 holds every
    other parameter exactly as initialized; after epoch 2 every parameter has moved."""
    straight, initial = straight_finetune
    frozen_end, manifest = final_state(straight["out_dir"] / "checkpoints", step=15)
    assert manifest["epoch"] == 1 and manifest["sample_in_epoch"] == 0
    trained = [k for k in initial if k.startswith("blocks.1.")]
    frozen = [k for k in initial if k not in trained]
    assert trained and frozen and frozen_end["model"].keys() == initial.keys()
    assert [k for k in frozen if not torch.equal(frozen_end["model"][k], initial[k])] == []
    assert [k for k in trained if torch.equal(frozen_end["model"][k], initial[k])] == []
    assert [k for k in initial if torch.equal(straight["state"]["model"][k], initial[k])] == []  # all trained


def test_a_kill_in_the_frozen_phase_resumes_across_the_phase_change_bit_for_bit(tmp_path, corpus, straight_finetune):
    """SIGKILL in epoch 1 (frozen phase; newest checkpoint step 10, whose optimizer state covers only the last
    block): the same command resumes through the phase change to the uninterrupted end."""
    straight, _ = straight_finetune
    job = job_file(tmp_path, "job", FINETUNE, corpus)
    log = tmp_path / "killed.log"
    proc = start(torchrun_cmd("train", job), log, RUNNER_TEST_HANG_AT_STEP="13")  # rank 0 stops after step 13
    try:
        wait_until(lambda: last_step(tmp_path / "job") >= 13, "step 13", proc, log)
    finally:
        kill_everything(proc)  # SIGKILL to every process, in the frozen phase
    assert "checkpoint step 10 committed" in text(log) and "phase 2/2" not in text(log)
    out = ok(run_torchrun("train", job))
    assert resumed_step(out) == 10 and "phase 1/2: training blocks.1" in out and "phase 2/2: training all" in out
    assert_same_end(tmp_path / "job", straight)

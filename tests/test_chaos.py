"""Chaos (README, "Preemption and fault tolerance"; docs/design.md, "Checkpoints and resume"): a driver SIGKILLs
a 2-rank torchrun job again and again and relaunches it itself.

The job runs under `torchrun --max-restarts=0` in its own session; the driver plays the cluster. Each kill
picks a victim at random (the agent, rank 0 or rank 1), SIGKILLs it, then SIGKILLs every other process of
the job, its workers' process groups included (a dead VM takes everything), and waits until all are gone.
Kill moments, at random: during start-up (imports, rendezvous, resume), a few steps into training, or inside
a checkpoint write (a `.tmp-step-*` directory exists in the store; RUNNER_TEST_SLOW_COMMIT_S holds the write
open between the data file and the manifest).

Asserted: after every kill the store holds nothing that lists as valid but fails verification, and a write
killed midway never became the newest valid checkpoint; every relaunch resumes exactly the newest valid
checkpoint (verified by the driver before the relaunch, and again when the relaunch names it); the job
finishes with weights, optimizer and scheduler bit-identical to an uninterrupted run.

CHAOS_KILLS=N (default 5) asks for more kills; when the job finishes before they are spent, a new round
starts in a fresh directory (same job, same reference). FAULT_SEED=N replays a run.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from fault_helpers import (JOB, assert_same_final_state, assert_store_sound, last_step, reference, resumed,
                           seeded_rng, text, workers_by_rank)
from helpers import kill_everything, start, torchrun_cmd, write_job
from runner.store import CheckpointStore

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("CHAOS_KILLS") or 5)
SLOW_COMMIT_S = 0.5
CHAOS_JOB = {"checkpoint": {"every_steps": 3, "keep_last": 2}}
LAUNCH_LIMIT_S = 240  # a launch that neither gets killed nor finishes by then is a hang


def kill_plan(rng, n: int) -> list[str]:
    """At least 40% of the kills land inside a checkpoint write; the rest anywhere."""
    writes = math.ceil(0.4 * n)
    plan = ["write"] * writes + [rng.choice(["write", "steps", "startup"]) for _ in range(n - writes)]
    rng.shuffle(plan)
    return plan


def writes_in_flight(ckpt: Path, old: set[str] = frozenset()) -> list[Path]:
    """Temp dirs of checkpoint writes, except `old` ones (left by a killed launch, until cleanup removes them)."""
    try:
        return [p for p in ckpt.iterdir() if p.name.startswith(".tmp-step-") and p.name not in old]
    except OSError:
        return []


@pytest.mark.timeout(300 + 40 * KILLS)  # ~15 s per kill here (a relaunch imports torch 3 times), and a final run
def test_chaos_kills_never_lose_the_run(tmp_path_factory, tmp_path, capsys):
    ref = reference(tmp_path_factory, 2)
    rng = seeded_rng("chaos")
    plan = kill_plan(rng, KILLS)
    kills, resumes, rounds = [], [], 0
    t_start = time.monotonic()
    while plan or rounds == 0:
        rounds += 1
        folder = tmp_path / f"round{rounds}"
        folder.mkdir()
        job = write_job(folder, "job", base=JOB, **CHAOS_JOB)
        out_dir, ckpt = folder / "job", folder / "job" / "checkpoints"
        store = CheckpointStore(str(ckpt))
        expected = None  # the checkpoint the next launch must resume (None: a fresh start)
        for launch in range(1, 1000):
            log = folder / f"launch{launch}.txt"
            kind = plan[0] if plan else None
            launched_ns = time.time_ns()
            proc = start(torchrun_cmd("train", job), log, RUNNER_TEST_SLOW_COMMIT_S=SLOW_COMMIT_S)
            try:
                hit = watch(proc, log, out_dir, ckpt, store, expected, kind, rng, launched_ns)
                if hit is not None:
                    victim, name = pick_victim(proc, rng)
                    reached = last_step(out_dir) if fresh(out_dir, launched_ns) else None
                    kill_everything(proc, first=victim)
            finally:
                kill_everything(proc)  # whatever happened: nothing of this launch survives it
            out = text(log)
            check_resume(out, expected, launch, resumes, out_dir)
            if hit is None:  # ran to the end
                assert proc.returncode == 0, out[-3000:]
                break
            plan.pop(0)
            # The whole job is dead. What must the next launch resume? Every valid-looking one must verify.
            assert_store_sound(str(ckpt))
            expected = store.latest_valid()
            inside = [p.name for p in hit if p.exists()]  # the write we aimed at is still a temp dir: killed inside
            for name_ in inside:
                assert expected is None or expected.step < int(name_.split("-")[2]), (name_, expected)
            kills.append({"round": rounds, "launch": launch, "moment": kind, "victim": name, "step": reached,
                          "inside_write": inside[0].split("-")[2].lstrip("0") if inside else "-",
                          "newest_valid": expected.step if expected else None})
        assert_same_final_state(ckpt, ref)
    elapsed = time.monotonic() - t_start
    assert len(kills) >= KILLS and any(k["inside_write"] != "-" for k in kills), kills
    with capsys.disabled():
        print(f"\nchaos: {len(kills)} kills, {len(resumes)} resumes, {rounds} round(s), {elapsed:.0f}s")
        for k in kills:
            reached = "before its first step" if k["step"] is None else f"at step {k['step']:3d}"
            print(f"  kill round {k['round']} launch {k['launch']}: {k['moment']:7s} {k['victim']:5s} {reached}; "
                  f"inside write of step {k['inside_write']:>3s}; newest valid after: {k['newest_valid']}")
        for r in resumes:
            print(f"  resume launch {r['launch']}: step {r['step']}, {r['lost']} step(s) lost")


def watch(proc, log: Path, out_dir: Path, ckpt: Path, store: CheckpointStore, expected, kind: str | None, rng,
          launched_ns: int):
    """Wait for this launch's kill moment (returns the temp dirs of writes in flight, maybe []), or for the
    launch to end (returns None). Meanwhile, when the launch names the checkpoint it resumes, verify it.

    Moments: `startup` a random time into the launch (it may still be importing, meeting, resuming or already
    training); `steps` 2-8 steps past the resumed step; `write` inside the 1st, 2nd or 3rd checkpoint write
    of this launch (so that some writes commit and the job moves on between kills).
    """
    base = expected.step if expected else 0
    seen = {p.name for p in writes_in_flight(ckpt)}  # left by the killed launch until cleanup removes them
    startup_at = time.monotonic() + rng.uniform(0.5, 8.0)
    steps_at = base + rng.randint(2, 8)
    nth_write, writes = rng.randint(1, 3), 0
    checked = False
    deadline = time.monotonic() + LAUNCH_LIMIT_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"launch hangs\n{text(log)[-3000:]}"
        if not checked and (found := resumed(text(log))):
            url = found[0][0]
            info = store.verify(url)  # still there: pruning needs two newer commits, each >= SLOW_COMMIT_S
            assert info.valid, f"resumed {url}, which fails verification: {info.reason}"
            checked = True
        if kind == "startup" and time.monotonic() >= startup_at:
            return []
        if kind == "steps" and fresh(out_dir, launched_ns) and last_step(out_dir) >= steps_at:
            return []
        if kind == "write" and (tmp := writes_in_flight(ckpt, seen)):
            writes += 1
            if writes == nth_write:
                return tmp
            seen |= {p.name for p in tmp}
        time.sleep(0.02)
    return None


def fresh(out_dir: Path, since_ns: int) -> bool:
    """out_dir/last_step was written by this launch (not left over from the previous one)."""
    try:
        return (out_dir / "last_step").stat().st_mtime_ns >= since_ns
    except OSError:
        return False


def pick_victim(proc, rng) -> tuple[int, str]:
    """The agent, rank 0 or rank 1 (the agent when that worker does not exist yet)."""
    ranks = workers_by_rank(proc.pid)
    choice = rng.choice(["agent", "rank0", "rank1"])
    if choice == "agent" or int(choice[-1]) not in ranks:
        return proc.pid, "agent"
    return ranks[int(choice[-1])], choice


def check_resume(out: str, expected, launch: int, resumes: list, out_dir: Path) -> None:
    """A launch that got as far as choosing a checkpoint chose `expected` (or started fresh without one)."""
    found = resumed(out)
    if expected is None:
        assert not found, f"launch {launch} resumed {found} but no checkpoint was valid\n{out[-3000:]}"
        return
    if "training already finished" in out:
        return
    if not found:
        assert "fresh start" not in out, f"launch {launch} started fresh; expected {expected.url}\n{out[-3000:]}"
        return  # killed before it chose
    (url, step, lost), = found
    assert (url, step) == (expected.url, expected.step), f"launch {launch} resumed {url}, expected {expected.url}"
    resumes.append({"launch": launch, "step": step, "lost": lost})

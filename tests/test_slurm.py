"""launch/slurm.sbatch on a real one-node SLURM cluster (slurm_cluster.py): the time-limit notice requeues the job
and it resumes losing nothing, ending bit-identical to an uninterrupted run; an operator's SIGTERM commits the
step reached and ends the job. Skipped, with the reason, where SLURM is not installed (.ci/run installs it).

The notice is sent with `scancel --batch --signal=USR1`, which is what `#SBATCH --signal=B:USR1@120` does at the
time limit (minute-grained and up to a minute early, so not usable in a test), once a checkpoint exists.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import slurm_cluster
from fault_helpers import JOB, assert_same_final_state, last_step, reference, resumed, text, wait_until
from helpers import REPO, child_env, newest_state, write_job
from runner.store import CheckpointStore

pytestmark = pytest.mark.slow

RECIPE = REPO / "launch" / "slurm.sbatch"
TIMEOUT = 200  # one job, submit to end, requeue included


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if reason := slurm_cluster.missing():
        pytest.skip(reason)
    with slurm_cluster.cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ref2(tmp_path_factory) -> Path:
    return reference(tmp_path_factory, 2)


def submit(slurm, job: Path, log: Path) -> str:
    """The recipe on the CPU node: 2 processes, the GPU defaults overridden as the recipe's header says."""
    env = child_env(NPROC=2, OMP_NUM_THREADS=1, RUNNER_TEST_SLOW_COMMIT_S=0.2,
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return slurm.client("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
                        f"--output={log}", f"--chdir={REPO}", str(RECIPE), str(job), env=env).strip()


def wait_for_checkpoint(out_dir: Path, log: Path, steps: int) -> None:
    store = CheckpointStore(str(out_dir / "checkpoints"))
    wait_until(lambda: last_step(out_dir) >= steps and store.latest_valid(), f"step {steps} and a checkpoint",
               log=log, timeout=TIMEOUT)


def wait_for_end(slurm, job_id: str, log: Path) -> dict[str, str]:
    """The job's fields once it has ended and every process of it is gone (a cancelled job is CANCELLED at
    once, while its steps are still saving; squeue lists it as completing until they are gone)."""
    def ended():
        fields = slurm.job(job_id)
        done = fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        return fields if done and not slurm.client("squeue", "-h", "-j", job_id).strip() else None
    return wait_until(ended, f"job {job_id} to end", log=log, timeout=TIMEOUT, poll=0.5)


def committed(out: str) -> int:
    steps = re.findall(r"preempted: step (\d+) committed", out)
    assert len(steps) == 1, out[-3000:]
    return int(steps[0])


def test_time_limit_notice_requeues_and_the_job_resumes_bit_identical(slurm, ref2, tmp_path):
    job = write_job(tmp_path, "job", base=JOB, checkpoint={"every_steps": 2})
    out_dir, log = tmp_path / "job", tmp_path / "slurm.out"
    job_id = submit(slurm, job, log)
    wait_for_checkpoint(out_dir, log, 4)
    slurm.client("scancel", "--batch", "--signal=USR1", job_id)
    fields = wait_for_end(slurm, job_id, log)
    out = text(log)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), out[-3000:]
    step = committed(out)
    assert f"requeueing job {job_id}" in out
    url = CheckpointStore(str(out_dir / "checkpoints"))._url(f"step-{step:09d}")
    assert resumed(out) == [(url, step, 0)], out[-3000:]
    assert_same_final_state(out_dir / "checkpoints", ref2)


@pytest.mark.parametrize("scancel, state", [(("--signal=TERM",), "FAILED"), ((), "CANCELLED")],
                         ids=["scancel --signal=TERM", "scancel"])
def test_operator_stop_commits_the_step_reached_and_ends_the_job(slurm, tmp_path, scancel, state):
    """`scancel --signal=TERM` signals the steps only; plain `scancel` signals the batch shell too, whose trap
    keeps it alive until the steps have committed. Neither requeues: the operator asked for a stop."""
    job = write_job(tmp_path, "job", base=JOB, checkpoint={"every_steps": 2})
    out_dir, log = tmp_path / "job", tmp_path / "slurm.out"
    job_id = submit(slurm, job, log)
    wait_for_checkpoint(out_dir, log, 4)
    slurm.client("scancel", *scancel, job_id)
    fields = wait_for_end(slurm, job_id, log)
    out = text(log)
    # Ended for good: the script has exited without a requeue.
    assert (fields["JobState"], fields["Restarts"]) == (state, "0"), out[-3000:]
    assert "requeueing" not in out
    step = committed(out)
    _, manifest = newest_state(out_dir / "checkpoints")
    assert manifest["step"] == step == last_step(out_dir) and not manifest["finished"]

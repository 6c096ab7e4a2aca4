"""Test-only fault hooks, off unless their environment variable is set (the fault-tolerance tests use them).

RUNNER_TEST_FAIL_AT_STEP="STEP[:RANK]"   raise after optimizer step STEP on RANK (default 0)
RUNNER_TEST_HANG_AT_STEP="STEP[:RANK]"   sleep forever after that step (a hung peer)
RUNNER_TEST_HOLD_GIL_AT_STEP="STEP[:RANK]" sleep forever in a C call that keeps the GIL (no Python thread runs)
RUNNER_TEST_SIGNAL_AT_STEP="STEP[:RANK]" send SIGTERM to this process after that step (a stop that lands
                                          exactly on a given step)
RUNNER_TEST_FAIL_COMMIT_STEP=STEP        the checkpoint writer's commit of that step raises a transient OSError
RUNNER_TEST_COUNT_SYNCS=PATH            count runner's own host reads of tensors and blocking collectives per
                                          optimizer step; written to PATH.rank{RANK}.json at exit
RUNNER_TEST_FAULT_ONCE=PATH              fire only if PATH does not exist yet, then create it
                                          (so a restarted job does not fail again)
RUNNER_TEST_SLOW_COMMIT_S=SECONDS        pause between a checkpoint's data files and its manifest (store/directory.py;
                                          for sharded checkpoints store/sharded.py commit_shards, on rank 0 once
                                          every rank's shards are written: a kill then leaves shards, no manifest)
RUNNER_TEST_SLOW_EVAL_S=SECONDS          pause before each evaluation batch (a long evaluation)
RUNNER_TEST_DUMP_WEIGHTS=DIR             when training ends, every rank saves its model's state_dict to
                                          DIR/rank{RANK}.pt (only rank 0 writes checkpoints; the
                                          distributed tests compare the ranks' weights)
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

_step = 0  # the optimizer step the loop last reported (inject_fault), for RUNNER_TEST_COUNT_SYNCS


STEP_FAULTS = (("RUNNER_TEST_FAIL_AT_STEP", "fail"), ("RUNNER_TEST_HANG_AT_STEP", "hang"),
               ("RUNNER_TEST_HOLD_GIL_AT_STEP", "hold_gil"), ("RUNNER_TEST_SIGNAL_AT_STEP", "signal"))


def planned_faults(rank: int) -> dict[int, list[tuple[str, str]]]:
    """The step faults set for this rank, {step: [(variable, action)]}: read once per start, as the environment
    lookups would cost a few µs every step."""
    planned: dict[int, list[tuple[str, str]]] = {}
    for var, action in STEP_FAULTS:
        at, _, rank_spec = os.environ.get(var, "").partition(":")
        if at and int(rank_spec or 0) == rank:
            planned.setdefault(int(at), []).append((var, action))
    return planned


def inject_fault(step: int, rank: int, planned: dict[int, list[tuple[str, str]]]) -> None:
    global _step
    _step = step
    for var, action in planned.get(step, ()):
        if not _first_time():
            continue
        if action == "fail":
            raise RuntimeError(f"injected test fault at step {step} on rank {rank} ({var})")
        if action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if action == "hold_gil":
            import ctypes

            ctypes.PyDLL(None).sleep(3600)  # PyDLL: libc's sleep, called without releasing the GIL
        while True:
            time.sleep(3600)


def slow_eval_batch() -> None:
    """RUNNER_TEST_SLOW_EVAL_S: each evaluation batch takes that much longer."""
    seconds = os.environ.get("RUNNER_TEST_SLOW_EVAL_S")
    if seconds:
        time.sleep(float(seconds))


def fail_commit(step: int) -> None:
    """RUNNER_TEST_FAIL_COMMIT_STEP: the writer's commit of `step` fails as an unreachable store would."""
    if os.environ.get("RUNNER_TEST_FAIL_COMMIT_STEP") == str(step):
        raise OSError(errno.EIO, f"injected storage fault committing step {step}")


def _first_time() -> bool:
    marker = os.environ.get("RUNNER_TEST_FAULT_ONCE")
    if not marker:
        return True
    if Path(marker).exists():
        return False
    Path(marker).touch()
    return True


def dump_weights(model, env) -> None:
    """RUNNER_TEST_DUMP_WEIGHTS=DIR: this rank's final weights to DIR/rank{RANK}.pt."""
    folder = os.environ.get("RUNNER_TEST_DUMP_WEIGHTS")
    if not folder:
        return
    import torch

    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(folder) / f"rank{env.rank}.pt")


def count_host_syncs(rank: int) -> None:
    """RUNNER_TEST_COUNT_SYNCS=PATH: count, per optimizer step, the host reads of tensors (item, tolist, bool,
    float, int) and the blocking collectives that runner's own code makes (torch's own calls are not counted);
    written to PATH.rank{RANK}.json at exit as {step: {"file:function what": count}}."""
    path = os.environ.get("RUNNER_TEST_COUNT_SYNCS")
    if not path:
        return
    import atexit
    import json
    import sys
    from collections import Counter, defaultdict

    import torch
    import torch.distributed as tdist

    here = str(Path(__file__).resolve().parent)
    counts: dict[int, Counter] = defaultdict(Counter)

    def counted(owner, name: str, blocking=lambda *a, **k: True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(here) and blocking(*args, **kwargs):
                counts[_step][f"{Path(caller.co_filename).name}:{caller.co_name} {name}"] += 1
            return real(*args, **kwargs)
        setattr(owner, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counted(torch.Tensor, name)
    for name in ("all_reduce", "broadcast", "all_gather", "barrier"):
        counted(tdist, name, lambda *a, async_op=False, **k: not async_op)
    for name in ("all_gather_object", "broadcast_object_list"):
        counted(tdist, name)
    atexit.register(lambda: Path(f"{path}.rank{rank}.json").write_text(
        json.dumps({step: dict(c) for step, c in sorted(counts.items())})))

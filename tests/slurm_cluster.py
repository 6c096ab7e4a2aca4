"""A one-node SLURM cluster on this machine for the SLURM recipe's tests (test_slurm.py): munged, slurmctld and
slurmd from Debian's slurm-wlm and munge packages, run as root with every file (slurm.conf, munge key, sockets,
state, logs) under one temp dir and every port on 127.0.0.1. No cgroups: proctrack/linuxproc, task/none.

Clients find the cluster through SLURM_CONF (cluster.env); the munge socket is named in slurm.conf's AuthInfo, so
nothing here uses or disturbs a SLURM or munge installation of the machine.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
# A requeued job may start again after AuthInfo's cred_expire (default 120 s); 10 s keeps the test short.
REQUEUE_DELAY_S = 10


def missing() -> str | None:
    """Why this machine cannot run the cluster (one line), or None."""
    absent = [name for name in DAEMONS + CLIENTS if not shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin")]
    if absent:
        return (f"SLURM not installed ({', '.join(absent)} missing): "
                "apt-get install slurm-wlm munge (as .ci/run does)")
    if os.geteuid() != 0:
        return "the SLURM test cluster runs slurmctld/slurmd as root; run the test as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin") or name


class Cluster:
    """Started daemons (by pid) and the environment a client (sbatch, scancel...) needs to reach them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname()
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        path = self.folder / f"{daemon}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def client(self, *args: str, check: bool = True, env: dict | None = None) -> str:
        """A SLURM client command's stdout, run in `env` (default: ours) with SLURM_CONF; on failure (with
        `check`) an AssertionError with its stderr. sbatch passes its whole environment on to the job."""
        proc = subprocess.run([_which(args[0]), *args[1:]], env={**(env or self.env), "SLURM_CONF": str(self.conf)},
                              capture_output=True, text=True, timeout=60)
        assert not check or proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
        return proc.stdout

    def start(self) -> None:
        key = self.folder / "munge" / "munge.key"
        key.parent.mkdir(mode=0o700)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = key.parent / "munge.socket"
        # --force: munged refuses some root-owned temp dirs (sticky /tmp above) without it.
        self._spawn("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                    f"--log-file={self.folder / 'munged.log'}", f"--pid-file={key.parent / 'munged.pid'}",
                    f"--seed-file={key.parent / 'munged.seed'}")
        self._wait(socket_path.exists, "munged's socket", "munged")
        self._write_conf(socket_path)
        for daemon in ("slurmctld", "slurmd"):
            (self.folder / daemon).mkdir()
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: self.client("scontrol", "ping", check=False).find("UP") >= 0, "slurmctld", "slurmctld")
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.client("sinfo", "-h", "-N", "-o", "%t", check=False).strip() == "idle",
                   "the node to be idle", "slurmd")

    def _write_conf(self, munge_socket: Path) -> None:
        node = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True)
        hardware = node.stdout.splitlines()[0].split(None, 1)[1]  # "CPUs=2 Boards=1 ... RealMemory=24105"
        state = self.folder
        self.conf.write_text("\n".join([
            "ClusterName=runnertest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY_S}",
            f"StateSaveLocation={state / 'slurmctld'}",
            f"SlurmdSpoolDir={state / 'slurmd'}",
            f"SlurmctldPidFile={state / 'slurmctld.pid'}",
            f"SlurmdPidFile={state / 'slurmd.pid'}",
            f"SlurmctldLogFile={state / 'slurmctld.log'}",
            f"SlurmdLogFile={state / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            # The main scheduler's periodic pass (default 60 s) starts a requeued job once its delay is over.
            "SchedulerParameters=sched_interval=2",
            f"NodeName={self.node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, daemon: str, *args: str) -> None:
        log = open(self.folder / f"{daemon}.out", "ab")
        self.procs.append(subprocess.Popen([_which(daemon), *args], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def _wait(self, predicate, what: str, daemon: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            proc = self.procs[-1]
            if proc.poll() is not None or time.monotonic() > deadline:
                out = (self.folder / f"{daemon}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SLURM test cluster: no {what} ({daemon} exit {proc.poll()}): "
                                   f"{out}{self.log(daemon)}")
            time.sleep(0.2)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, ExitCode...) of a job, running or ended."""
        fields = self.client("scontrol", "show", "job", "-o", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def stop(self) -> None:
        """Cancel every job (slurmstepd and the job's processes outlive slurmd), then SIGTERM the daemons this
        cluster started, newest first, and SIGKILL what is left after 20 s."""
        if self.procs and self.procs[-1].poll() is None:
            with contextlib.suppress(Exception):
                self.client("scancel", "--user=root")
                deadline = time.monotonic() + 90  # KillWait (30 s) and more
                while self.client("squeue", "-h") and time.monotonic() < deadline:
                    time.sleep(0.5)
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def cluster(folder: Path):
    """A running one-node cluster whose files live in `folder`; its daemons are stopped on the way out."""
    c = Cluster(folder)
    try:
        c.start()
        yield c
    finally:
        c.stop()

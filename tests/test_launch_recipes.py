"""The recipes that cannot run here (no cloud, no Kubernetes) are checked offline: they parse, and they have
the fields runner relies on."""
from __future__ import annotations

import subprocess

import yaml

from helpers import REPO


def test_skypilot_recipe_relaunches_on_spot_with_checkpoints_in_a_bucket():
    recipe = yaml.safe_load((REPO / "launch" / "skypilot.yaml").read_text())
    assert recipe["resources"]["use_spot"] is True and recipe["resources"]["job_recovery"]["strategy"]
    assert recipe["envs"]["CHECKPOINT_DIR"].startswith("s3://")
    run = recipe["run"]
    assert "-m runner train" in run and "checkpoint.dir=" in run and "--shutdown-timeout=40" in run


def test_kubernetes_recipe_gives_the_emergency_save_time():
    job = yaml.safe_load((REPO / "launch" / "kubernetes-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[0] == "torchrun" and "--shutdown-timeout=40" in command
    assert pod["terminationGracePeriodSeconds"] > 40  # above torchrun's own, which is above grace_s (25 s)
    assert pod["restartPolicy"] == "Never"


def test_shell_recipes_parse():
    for name in ("spot-vm.sh", "torchrun-single-node.sh", "torchrun-multi-node.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / name)], check=True)

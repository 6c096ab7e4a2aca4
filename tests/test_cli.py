"""The `runner` command: summary, help, the console script, and end-to-end runs of the examples."""
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.models import SmallCNN
from helpers import REPO, TINY_JOB, newest_state, ok, run, run_cli, table_row, write_job

ONE_THREAD = {"OMP_NUM_THREADS": 1}  # the machine's 2 cores are shared; more threads only oversubscribe


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_summary_prints_layers_shapes_counts_and_memory_without_training(tmp_path):
    job = write_job(tmp_path, finetune={"head": {"module": "head", "num_classes": 10},
                                        "phases": [{"epochs": 1, "train": ["head"]}, {"train": ["all"]}]})
    out = ok(run_cli("summary", job, env=ONE_THREAD))
    width = TINY_JOB["model"]["args"]["width"]
    assert table_row(out, "features.0")[:3] == ["features.0", "Conv2d", f"[-1, {width}, 8, 8]"]  # 8×8 digits
    assert table_row(out, "features.6")[:3] == ["features.6", "MaxPool2d", f"[-1, {2 * width}, 4, 4]"]
    assert table_row(out, "head")[:3] == ["head", "Linear", "[-1, 10]"]  # 10 digit classes
    model = SmallCNN(num_classes=10, in_channels=1, width=width)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert table_row(out, "head")[3] == f"{head:,}"
    assert f"total params: {total:,}" in out
    assert f"trainable params: {total:,}" in out and "frozen params: 0" in out
    assert f"parameter memory: {total * 4 / 2**20:.2f} MB" in out
    # the fine-tune plan: what each phase trains and freezes
    assert re.search(rf"phase 1 \(epoch 0\): trains head .* trainable {head:,} / frozen {total - head:,}", out)
    assert re.search(rf"phase 2 \(epochs 1-end\): trains all .* trainable {total:,} / frozen 0", out)
    assert not (tmp_path / "job").exists()  # nothing trained, no outputs written


def test_python_m_runner_and_the_console_script_are_the_same_command(tmp_path):
    script = Path(sys.executable).parent / "runner"
    assert script.exists(), f"{script} missing: `pip install -e .` installs the `runner` console script"

    def both(*args):
        module = run_cli(*args, env=ONE_THREAD)
        console = run([str(script), *map(str, args)], env=ONE_THREAD)
        return module, console

    # commands that do not import torch, to stay quick: help, a real ckpt command, a usage error
    cases = [("--help",), ("train", "--help"), ("ckpt", "--help"), ("ckpt", "ls", tmp_path / "none"), ()]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda args: both(*args), cases))
    for args, (module, console) in zip(cases, results):
        assert (module.returncode, module.stdout, module.stderr) == \
               (console.returncode, console.stdout, console.stderr), args
    help_ = results[0][0]
    assert help_.returncode == 0 and help_.stdout.startswith("usage: runner")
    assert all(cmd in help_.stdout for cmd in ("train", "summary", "ckpt"))
    assert "overrides" in results[1][0].stdout
    listing = results[3][0]
    assert listing.returncode == 0 and "no checkpoints under" in listing.stdout
    assert results[4][0].returncode == 2  # no command: usage error


def test_digits_demo_reaches_95_percent(tmp_path):
    """examples/digits.yaml end to end through the CLI, fewer epochs than the demo; the bar stays 95%."""
    epochs = 2
    out_dir = tmp_path / "digits"
    out = ok(run_cli("train", REPO / "examples" / "digits.yaml", f"train.max_epochs={epochs}",
                     f"out_dir={out_dir}", env=ONE_THREAD, timeout=240))
    h = history(out_dir)
    assert len(h) == epochs and h[-1]["val_acc"] >= 0.95, h
    assert len(re.findall(r"^\[runner\] epoch \d+ step", out, re.M)) == epochs  # plain logs: not a terminal
    _, manifest = newest_state(out_dir / "checkpoints")
    assert manifest["metrics"]["val_acc"] == h[-1]["val_acc"] and manifest["finished"]


def test_user_model_example_runs_from_another_folder(tmp_path):
    """examples/user_model: `mymodels:TinyNet` imports because the CLI adds the job file's folder to sys.path."""
    out_dir = tmp_path / "user_model"
    ok(run_cli("train", REPO / "examples" / "user_model" / "job.yaml", "train.max_epochs=1", f"out_dir={out_dir}",
               env=ONE_THREAD, cwd=tmp_path))
    h = history(out_dir)
    assert len(h) == 1 and h[0]["val_acc"] > 0.5  # one epoch; chance is 0.1
    state, manifest = newest_state(out_dir / "checkpoints")
    assert manifest["config"]["model"]["name"] == "mymodels:TinyNet"
    assert state["model"]["head.weight"].shape[0] == 10  # num_classes from the dataset

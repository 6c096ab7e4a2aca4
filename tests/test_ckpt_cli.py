"""`runner ckpt ls|verify|inspect` on checkpoints written by a real (tiny, in-process) training run."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from helpers import ok, run_cli, write_job
from runner import cli

# 3 steps of 128 samples, one epoch; every_minutes so small that every step is due (the wall-time cadence).
JOB = {
    "data": {"name": "synthetic", "args": {"size": 384, "val_size": 64}, "batch_size": 128},
    "train": {"max_epochs": 1},
    "checkpoint": {"every_minutes": 0.00001, "keep_last": 0},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores
    try:
        assert cli.main(["train", str(write_job(folder, "job", **JOB))]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "job" / "checkpoints"


@pytest.fixture
def copy(store, tmp_path):
    """A private copy of the store, for tests that damage it."""
    return shutil.copytree(store, tmp_path / "ckpt")


def step(store, n: int):
    return store / f"step-{n:09d}"


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def table(text: str) -> dict[int, list[str]]:
    """{step: [epoch, time, size, metrics, status]} from an ls/verify table (columns split on 2+ spaces)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0].isdigit() and len(cells) == 6:
            rows[int(cells[0])] = cells[1:]
    return rows


def test_ls_shows_step_epoch_time_size_metrics_valid(store):
    out = ok(run_cli("ckpt", "ls", store))  # the real entry point, in a child process
    header = out.splitlines()[0].split()
    assert header == ["step", "epoch", "time", "(UTC)", "size", "metrics", "status"]
    rows = table(out)
    assert sorted(rows) == [1, 2, 3]  # every step: the every_minutes cadence (3 is also the epoch end)
    for epoch, when, size, metrics, status in rows.values():
        assert epoch == "1" and status == "valid"  # all in epoch 1, as the log numbers it (step 3 ends it)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when) and re.fullmatch(r"[\d.]+ KiB", size)
    assert rows[1][3] == "-" and rows[2][3] == "-"  # no epoch finished yet: no metrics
    assert all(f"{key}=" in rows[3][3] for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"))


def test_ls_reports_why_a_checkpoint_is_invalid_and_never_lists_temp_dirs(copy, capsys):
    state = step(copy, 1) / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    (step(copy, 2) / "MANIFEST.json").unlink()
    (copy / ".tmp-step-000000004-deadbeef").mkdir()
    code, out, _ = main(capsys, "ckpt", "ls", copy)
    rows = table(out)
    assert code == 0 and sorted(rows) == [1, 2, 3] and ".tmp" not in out
    assert re.fullmatch(r"INVALID: state.pt: size \d+ != \d+", rows[1][4])
    assert rows[2][4] == "INVALID: manifest missing" and rows[3][4] == "valid"


def test_verify_exit_codes(copy, tmp_path, capsys):
    code, out, _ = main(capsys, "ckpt", "verify", copy)
    assert code == 0 and "3 checkpoint(s) verified, 0 invalid" in out
    state = step(copy, 2) / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    state.write_bytes(bytes(data))
    code, out, _ = main(capsys, "ckpt", "ls", copy)
    assert table(out)[2][4] == "valid"  # ls is the cheap check (sizes), verify hashes
    code, out, _ = main(capsys, "ckpt", "verify", copy)
    assert code == 1 and table(out)[2][4] == "INVALID: state.pt: sha256 mismatch"
    assert "3 checkpoint(s) verified, 1 invalid" in out
    code, out, _ = main(capsys, "ckpt", "verify", step(copy, 2))
    assert code == 1 and list(table(out)) == [2]
    code, out, _ = main(capsys, "ckpt", "verify", step(copy, 3))
    assert code == 0 and "1 checkpoint(s) verified, 0 invalid" in out
    code, out, _ = main(capsys, "ckpt", "verify", tmp_path / "empty")
    assert code == 0 and "no checkpoints under" in out  # nothing invalid
    code, out, err = main(capsys, "ckpt", "verify", step(copy, 7))
    assert code == 2 and err.count("\n") == 1 and "no checkpoint at" in err and "step-000000007" in err


def test_inspect_prints_manifest_and_tensor_shapes(store, capsys):
    code, out, _ = main(capsys, "ckpt", "inspect", step(store, 3))
    assert code == 0
    head, _, tensors = out.partition("\n\n[model]\n")
    position, _, manifest_text = head.partition("\n")
    manifest = json.loads(manifest_text)
    assert position == "position: step 3, end of epoch 1, written by 1 process(es)"
    assert manifest == json.loads((step(store, 3) / "MANIFEST.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["finished"]
    assert {"state.pt"} == set(manifest["files"]) and manifest["config"]["model"]["args"]["width"] == 8
    lines = {line.strip() for line in tensors.splitlines()}
    assert {"head.weight: (10, 16) float32", "head.bias: (10,) float32", "features.0.weight: (8, 1, 3, 3) float32",
            "features.1.running_mean: (8,) float32", "features.1.num_batches_tracked: () int64"} <= lines
    assert "[optimizer]" in lines and "state.0.exp_avg: (8, 1, 3, 3) float32" in lines
    assert "param_groups.0.lr: 0.01" in lines


def test_inspect_of_something_else_is_a_one_line_error(store, capsys):
    code, _, err = main(capsys, "ckpt", "inspect", store)
    assert code == 2 and err.count("\n") == 1 and "does not name a checkpoint directory" in err

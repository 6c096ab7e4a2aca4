"""`runner export`: trained weights → .pt state_dict, .safetensors and ONNX that reproduce the model's outputs."""
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.cli import model_from_job
from runner.config import load_config
from runner.weights import load_pretrained
from helpers import newest_state, ok, run_cli, write_job


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    job = write_job(folder, train={"max_epochs": 1})
    ok(run_cli("train", job))
    cfg = load_config(job)
    model = model_from_job(cfg)[0]
    state, _ = newest_state(cfg.checkpoint_dir)
    model.load_state_dict(state["model"])
    return job, model.eval(), folder


@pytest.mark.slow  # with its `trained` fixture, ~20 s
def test_state_dict_and_safetensors_round_trip(trained):
    job, model, folder = trained
    for name in ("weights.pt", "weights.safetensors"):
        out = folder / name
        assert "exported" in ok(run_cli("export", job, out))
        fresh = model_from_job(load_config(job))[0]
        load_pretrained(fresh, str(out))  # the same loader users get for init_from
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.slow
def test_onnx_matches_torch_for_any_batch_size(trained):
    ort = pytest.importorskip("onnxruntime")
    job, model, folder = trained
    out = folder / "model.onnx"
    printed = ok(run_cli("export", job, out))
    assert ".data" not in printed and not (folder / "model.onnx.data").exists()  # one self-contained file
    moved = folder / "moved" / "model.onnx"  # it runs on its own, wherever it is copied
    moved.parent.mkdir()
    moved.write_bytes(out.read_bytes())
    session = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)  # not the batch size it was traced with
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)


def test_onnx_past_the_protobuf_limit_keeps_weights_beside_and_says_so(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from runner import export

    monkeypatch.setattr(export, "ONNX_INLINE_LIMIT", 0)  # stands for a model of more than 2 GiB of weights
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    out = tmp_path / "big.onnx"
    files = export.export(model, torch.randn(2, 64), str(out))
    assert files == [str(out), str(out) + ".data"] and all(Path(f).stat().st_size for f in files)
    x = torch.randn(3, 64)
    (onnx_out,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(onnx_out, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_suffix_and_missing_checkpoint_are_one_line_errors(tmp_path):
    job = write_job(tmp_path)
    proc = run_cli("export", job, tmp_path / "m.bin")
    assert proc.returncode == 2 and "no valid checkpoint" in proc.stderr and "Traceback" not in proc.stderr

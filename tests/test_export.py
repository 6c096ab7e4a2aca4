"""`runner export`: trained weights → .pt state_dict, .safetensors and ONNX that reproduce the model's outputs."""
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
    ok(run_cli("export", job, out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)  # not the batch size it was traced with
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)


def test_unknown_suffix_and_missing_checkpoint_are_one_line_errors(tmp_path):
    job = write_job(tmp_path)
    proc = run_cli("export", job, tmp_path / "m.bin")
    assert proc.returncode == 2 and "no valid checkpoint" in proc.stderr and "Traceback" not in proc.stderr

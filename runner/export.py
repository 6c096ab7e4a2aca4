"""Trained weights → files for inference: a state_dict (.pt/.pth), safetensors, or ONNX."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

FORMATS = {".pt": "state_dict", ".pth": "state_dict", ".safetensors": "safetensors", ".onnx": "onnx"}


def export(model: nn.Module, example: torch.Tensor, out: str) -> str:
    """Write `model` (eval mode, CPU) to `out`; the format follows the suffix. Returns the format."""
    fmt = FORMATS.get(Path(out).suffix)
    if fmt is None:
        raise ConfigError(f"export: cannot tell the format of '{out}'; end it in {', '.join(FORMATS)}")
    model = model.cpu().eval()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        torch.save(model.state_dict(), out)
    elif fmt == "safetensors":
        from safetensors.torch import save_model

        save_model(model, out)  # handles tied weights, unlike save_file(state_dict)
    else:
        to_onnx(model, example, out)
    return fmt


def to_onnx(model: nn.Module, example: torch.Tensor, out: str) -> None:
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it: say so, not fail deep inside
        raise ConfigError("export to ONNX needs onnx and onnxscript: pip install 'runner-train[export]'")
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (example,), out, input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: batch},), verbose=False)

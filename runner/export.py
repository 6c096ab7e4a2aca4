"""Trained weights → files for inference: a state_dict (.pt/.pth), safetensors, or ONNX."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

FORMATS = {".pt": "state_dict", ".pth": "state_dict", ".safetensors": "safetensors", ".onnx": "onnx"}
# A protobuf message cannot exceed 2 GiB: past that an ONNX model keeps its weights in a `<out>.data` file beside it.
ONNX_INLINE_LIMIT = 2**31 - 2**26


def export(model: nn.Module, example: torch.Tensor, out: str) -> list[str]:
    """Write `model` (eval mode, CPU) to `out`; the format follows the suffix. Returns the files written."""
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
        return to_onnx(model, example, out)
    return [out]


def to_onnx(model: nn.Module, example: torch.Tensor, out: str) -> list[str]:
    """One self-contained .onnx file, or .onnx plus its weights in .onnx.data when they pass the 2 GiB limit."""
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it: say so, not fail deep inside
        raise ConfigError("export to ONNX needs onnx and onnxscript: pip install 'runner-train[export]'")
    batch = torch.export.Dim("batch")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > ONNX_INLINE_LIMIT
    data = Path(out + ".data")
    data.unlink(missing_ok=True)  # a stale weights file from an earlier export would look like this one's
    torch.onnx.export(model, (example,), out, input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: batch},), verbose=False, external_data=external)
    return [out, str(data)] if data.exists() else [out]

"""Pretrained weights: read a file, a runner checkpoint or a checkpoint store from any fsspec URL, decode
safetensors or torch.save data without running pickled code, strip DDP/torch.compile key prefixes and load what
matches into a model. What trains afterwards (the phase plan) is runner/finetune.py."""
from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence

import fsspec
import safetensors.torch
import torch
from torch import nn

from runner.checkpoint import CheckpointStore, open_checkpoint
from runner.errors import CheckpointError
from runner.finetune import _under
from runner.manifest import MANIFEST

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added to state_dict keys by DDP and torch.compile


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def _read(url: str, storage_options: dict | None) -> tuple[bytes, str]:
    """The weights file's bytes. A runner checkpoint directory stands for its (verified) state.pt, and a
    checkpoint store directory for its newest valid checkpoint."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.isdir(path):
            with fs.open(path, "rb") as f:
                return f.read(), path
    except Exception as err:
        raise CheckpointError(f"cannot read pretrained weights {url} ({_one_line(err)}); "
                              "check the URL and storage_options") from None
    if fs.exists(f"{path.rstrip('/')}/{MANIFEST}"):
        store, info = open_checkpoint(url, storage_options)
        data = store.read(info)
    else:
        found = CheckpointStore(url, storage_options).read_latest()
        if found is None:
            raise CheckpointError(f"{url} is a directory with no committed runner checkpoint (no MANIFEST.json); "
                                  "point init_from at a weights file, a step-N checkpoint or a checkpoint.dir")
        info, data = found
    return data, f"{info.url}/state.pt"


def _torch_load(data: bytes, url: str, trust_pickle: bool) -> object:
    try:  # weights_only refuses to import anything, so a refused file has run no code
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        # the class or function the pickle wanted to import, as torch's refusal names it
        found = isinstance(err, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"{url} contains a pickled Python object ({found.group(1)}), e.g. a whole model saved with "
                "torch.save(model), and loading it could run arbitrary code; convert it in the environment "
                "that made it with torch.save(model.state_dict(), path), or pass trust_pickle=True if you "
                "trust its source") from None
        raise CheckpointError(f"cannot load {url} with torch.load ({_one_line(err)}); expected a safetensors, "
                              "state_dict or runner checkpoint file") from None


def _state_dict_of(obj: object, url: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), (Mapping, nn.Module)):
        obj = obj["model"]  # a runner checkpoint: model weights sit next to optimizer, RNG, progress...
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(f"{url} holds a {type(obj).__name__} that is neither a state_dict (name → tensor) "
                          "nor a checkpoint with a 'model' key; save model.state_dict() instead")


def _decode(data: bytes, path: str, url: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    # safetensors: 8-byte header length, then a JSON header; torch.save files are zips ("PK")
    if path.endswith(".safetensors") or (data[8:9] == b"{" and not data.startswith(b"PK")):
        try:
            return safetensors.torch.load(data)
        except Exception as err:
            raise CheckpointError(f"{url} is not a valid safetensors file ({_one_line(err)})") from None
    return _state_dict_of(_torch_load(data, url, trust_pickle), url)


def _strip_prefixes(weights: dict, model_keys: Sequence[str]) -> dict:
    for prefix in _WRAPPER_PREFIXES * 2:  # twice: wrappers nest in either order
        if any(k.startswith(prefix) for k in weights) and not any(k.startswith(prefix) for k in model_keys):
            weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    return weights


def load_pretrained(model: nn.Module, url: str, *, storage_options: dict | None = None,
                    strict: bool = True, trust_pickle: bool = False, new_head: str | None = None) -> str:
    """Load weights from a safetensors file, a state_dict .pt/.pth, or a runner checkpoint (file or
    step-N directory) into `model`; returns a one-line report of what was loaded. `new_head`: the module
    replace_head swaps out next; its keys are neither loaded nor checked (a 1000-class fc meets a 10-class one)."""
    data, path = _read(url, storage_options)
    own = model.state_dict()
    weights = _strip_prefixes(_decode(data, path, url, trust_pickle), list(own))
    if new_head is not None:
        weights = {k: v for k, v in weights.items() if not _under(k, new_head)}
        own = {k: v for k, v in own.items() if not _under(k, new_head)}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k} {tuple(weights[k].shape)}→{tuple(v.shape)}"
                  for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(
            f"{url} does not match the model: missing {_names(missing)}; unexpected {_names(unexpected)}; "
            f"shape mismatch {_names(mismatched)}; replace the head or load non-strict (strict=False)")
    matching = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(matching, strict=False)
    report = (f"loaded {len(matching)}/{len(own)} tensors from {url}; missing: {_names(missing)}; "
              f"unexpected: {_names(unexpected)}") + (f"; new head: {new_head}" if new_head else "")
    return report + (f"; skipped (shape): {_names(mismatched)}" if mismatched else "")

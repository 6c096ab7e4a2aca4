"""Pretrained weights: read a file, a runner checkpoint or a checkpoint store from any fsspec URL, decode
safetensors or torch.save data without running pickled code, find the weights in whatever dict the saving tool
wrapped them in, map key prefixes (DDP, torch.compile, Lightning attributes) to the model's and load what
matches. To continue the run a file was saved from (model.init_optimizer), the same read also gives what it saved
besides the weights: optimizer, scheduler and GradScaler states, epoch. What trains afterwards (the phase plan) is
runner/finetune.py."""
from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fsspec
import safetensors.torch
import torch
from torch import nn

from runner import dist
from runner.drift import NOT_HYPERPARAMETERS
from runner.errors import CheckpointError, one_line
from runner.finetune import under
from runner.store import MANIFEST, CheckpointStore, open_checkpoint

# Where checkpoint dicts keep the weights: the PyTorch tutorial, Lightning (and timm, HF…), runner and many
# scripts, DeepSpeed. The first that holds a state_dict wins.
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model", "module")
PREFIX_SYNTAX = "'model.' strips that prefix, '+backbone.' adds one, '' keeps the keys as saved"
# Where they keep the rest of a run, first found wins: the PyTorch tutorials (…_state_dict, the AMP recipe's
# 'scaler'), pytorch/examples and many scripts ('optimizer', 'scheduler'), Lightning (one-item lists; its fp16
# GradScaler under its precision plugin's class name).
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")
SCHEDULER_KEYS = ("scheduler_state_dict", "lr_scheduler", "scheduler", "lr_schedulers")
SCALER_KEYS = ("scaler_state_dict", "scaler", "grad_scaler", "MixedPrecision")


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


@dataclass(frozen=True)
class KeyMapping:
    """How checkpoint keys become model keys: strip `prefix` (keys outside it are ignored) or, with `add`,
    prepend it; an empty prefix keeps the keys as saved."""
    prefix: str = ""
    add: bool = False

    def __str__(self) -> str:
        return "as saved" if not self.prefix else f"{'added' if self.add else 'stripped'} '{self.prefix}'"

    def apply(self, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(renamed weights, keys ignored because they lie outside a stripped prefix)."""
        if self.add or not self.prefix:
            return {self.prefix + k: v for k, v in weights.items()}, []
        inside = {k.removeprefix(self.prefix): v for k, v in weights.items() if k.startswith(self.prefix)}
        return inside, [k for k in weights if not k.startswith(self.prefix)]


def parse_prefix(text: str | None) -> KeyMapping | None:
    """model.init_prefix → a mapping; None → None (find it from the keys). A missing final dot is added."""
    if text is None:
        return None
    add = text.startswith("+")
    name = text.removeprefix("+")
    if add and not name:
        raise CheckpointError(f"model.init_prefix: {text!r} adds nothing; {PREFIX_SYNTAX}")
    return KeyMapping(name if not name or name.endswith(".") else name + ".", add)


def _read(url: str, storage_options: dict | None) -> tuple[bytes | dict, str, str | None]:
    """The weights file's bytes, its path, and "runner checkpoint" when it is one. A runner checkpoint
    directory stands for its (verified) state.pt, and a checkpoint store directory for its newest valid one; a
    sharded one comes back already loaded, its model gathered whole (_with_full_model)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if not fs.isdir(path):
            with fs.open(path, "rb") as f:
                return f.read(), path, None
    except Exception as err:
        raise CheckpointError(f"cannot read pretrained weights {url} ({one_line(err)}); "
                              "check the URL and checkpoint.storage_options") from None
    if fs.exists(f"{path.rstrip('/')}/{MANIFEST}"):
        store, info = open_checkpoint(url, storage_options)
        data = store.read(info)
    else:
        store = CheckpointStore(url, storage_options)
        found = store.read_latest()
        if found is None:
            raise CheckpointError(f"{url} is a directory with no committed runner checkpoint (no MANIFEST.json); "
                                  "point model.init_from at a weights file, a step-N checkpoint or a checkpoint.dir")
        info, data = found
    if "sharded" in info.manifest:  # its weights are in every rank's shards: gathered whole here
        data = _with_full_model(store, info, data)
    return data, f"{info.url}/state.pt", "runner checkpoint"


def _with_full_model(store: CheckpointStore, info, data: bytes) -> dict:
    """A sharded checkpoint's state.pt, loaded, with its model state_dict put back whole (read from the shards with
    no process group, on any world size), as an unsharded checkpoint holds it."""
    from runner.store import sharded

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    state["model"] = sharded.read_full(store, info, "model")
    return state


def _unsafe_types(data: bytes, err: Exception) -> tuple[str, list[str]]:
    """The class or function torch refused, then all others the pickle would import; found by reading, never by
    running it."""
    refused = re.findall(r"GLOBAL ([\w.]+)", str(err))
    try:
        listed = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # not a zip-format torch.save file: what the refusal names is all we know
        listed = []
    first = (refused or listed or ["unknown"])[0]
    return first, sorted(set(listed) - {first})


def _torch_load(data: bytes, url: str, trust_pickle: bool) -> object:
    try:  # weights_only refuses to import anything, so a refused file has run no code
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and not trust_pickle:
            first, others = _unsafe_types(data, err)
            raise CheckpointError(
                f"{url} contains a pickled Python object ({first}), e.g. a whole model saved with torch.save(model) "
                "or a Lightning .ckpt's hyper_parameters, and loading it could run arbitrary code; keep only the "
                "weights, where it was made: torch.save(model.state_dict(), path) (Lightning: "
                "torch.save(ckpt['state_dict'], path)), or set model.trust_pickle: true if you trust its source"
                + (f" (other unsafe types in it: {_names(others, limit=3)})" if others else "")) from None
        raise CheckpointError(f"cannot load {url} with torch.load ({one_line(err)}); expected a safetensors, "
                              "state_dict or checkpoint file") from None


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _format_name(holder: Mapping, key: str, kind: str | None) -> str:
    if key == "model_state_dict":
        return "tutorial checkpoint 'model_state_dict'"
    if key == "state_dict" and "pytorch-lightning_version" in holder:
        return "Lightning checkpoint 'state_dict'"
    return f"{kind} '{key}'" if kind else f"checkpoint dict '{key}'"


def _state_dict_of(obj: object, url: str, kind: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights in what torch.load returned, and the name of the format they were found in."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), "whole pickled model"
    if _is_state_dict(obj):
        return dict(obj), "state_dict"
    if isinstance(obj, Mapping):
        for key in WEIGHT_KEYS:
            inner = obj.get(key)
            inner = inner.state_dict() if isinstance(inner, nn.Module) else inner
            if _is_state_dict(inner):
                return dict(inner), _format_name(obj, key, kind)
        what = f"a dict (keys: {_names(map(str, obj))})"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(f"{url} holds {what} with no weights: expected a state_dict (name → tensor) or a "
                          f"checkpoint dict keeping one under {', '.join(WEIGHT_KEYS)}; save model.state_dict()")


def _decode(data: bytes | dict, path: str, url: str, trust_pickle: bool, kind: str | None
            ) -> tuple[dict, str, object]:
    """(weights, format name, what torch.load returned: None for safetensors)."""
    if isinstance(data, dict):  # a sharded runner checkpoint, loaded by _read
        return (*_state_dict_of(data, url, kind), data)
    # safetensors: 8-byte header length, then a JSON header; torch.save files are zips ("PK")
    if path.endswith(".safetensors") or (data[8:9] == b"{" and not data.startswith(b"PK")):
        try:
            return safetensors.torch.load(data), "safetensors", None
        except Exception as err:
            raise CheckpointError(f"{url} is not a valid safetensors file ({one_line(err)})") from None
    loaded = _torch_load(data, url, trust_pickle)
    return (*_state_dict_of(loaded, url, kind), loaded)


@dataclass(frozen=True)
class SavedRun:
    """What a file saved besides the weights, to continue the run it came from (model.init_optimizer)."""
    url: str                       # model.init_from
    format: str                    # as the load report names it
    keys: tuple[str, ...] = ()     # the checkpoint dict's top-level keys; () when the file is not one
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    epoch: int | None = None
    global_step: int | None = None
    runner_checkpoint: str | None = None  # its URL, when the file is runner's own

    def require_optimizer(self) -> dict:
        """The optimizer state, or a one-line error saying why this file cannot continue a run."""
        if self.runner_checkpoint:
            raise CheckpointError(f"{self.url} is a runner checkpoint: continue it with resume.mode: "
                                  f"{self.runner_checkpoint}, which restores all of it; model.init_optimizer is "
                                  "for checkpoints other tools wrote")
        if self.optimizer is None:
            has = f"its keys: {_names(self.keys, limit=8)}" if self.keys else f"it holds only weights ({self.format})"
            raise CheckpointError(f"{self.url} holds no optimizer state to continue ({has}); save "
                                  "optimizer.state_dict() under 'optimizer_state_dict' next to the weights, or set "
                                  "model.init_optimizer: false to load only the weights")
        return self.optimizer


def _count(holder: Mapping, key: str, url: str) -> int | None:
    value = holder.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{url}: its '{key}' is {value!r}, not a count; save it as an int")
    return value


def _found(holder: Mapping, keys: tuple[str, ...], has: str, url: str) -> dict | None:
    """The first value under `keys` that is a dict holding `has`; Lightning's lists must hold one."""
    for key in keys:
        value = holder.get(key)
        if isinstance(value, list):
            if len(value) > 1:
                raise CheckpointError(f"{url} holds {len(value)} states under '{key}', one per optimizer or "
                                      "scheduler; runner continues a run that trained with one of each")
            value = value[0] if value else None
        if isinstance(value, Mapping) and has in value:
            return dict(value)
    return None


def _saved_run(loaded: object, url: str, fmt: str, path: str, kind: str | None) -> SavedRun:
    if kind == "runner checkpoint":
        return SavedRun(url, fmt, runner_checkpoint=path.removesuffix("/state.pt"))
    if not isinstance(loaded, Mapping) or _is_state_dict(loaded):
        return SavedRun(url, fmt)
    return SavedRun(url, fmt, tuple(map(str, loaded)),
                    optimizer=_found(loaded, OPTIMIZER_KEYS, "param_groups", url),
                    scheduler=_found(loaded, SCHEDULER_KEYS, "last_epoch", url),
                    scaler=_found(loaded, SCALER_KEYS, "scale", url),  # {} from a disabled GradScaler: none
                    epoch=_count(loaded, "epoch", url), global_step=_count(loaded, "global_step", url))


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict, url: str) -> None:
    """Load a saved optimizer state into `optimizer` (built over `model`) once it fits: as many parameter groups,
    as many parameters in each, state tensors shaped like their parameters (so in the same order), and no
    setting this optimizer does not have (a state saved from another optimizer)."""
    groups, own = saved["param_groups"], optimizer.param_groups
    names = ", ".join(str(g.get("name", i)) for i, g in enumerate(own))
    fix = ("finetune.phases (lr_mult) and finetune.head make the groups: build them as the run that saved it did, "
           "or set model.init_optimizer: false to load only the weights")
    if len(groups) != len(own):
        raise CheckpointError(f"{url}: its optimizer state has {len(groups)} parameter group(s), this job's "
                              f"optimizer has {len(own)} ({names}); {fix}")
    for i, (group, mine) in enumerate(zip(groups, own)):
        if len(group["params"]) != len(mine["params"]):
            raise CheckpointError(f"{url}: parameter group {i} of its optimizer state has {len(group['params'])} "
                                  f"parameter(s), this job's group {i} ({mine.get('name', i)}) has "
                                  f"{len(mine['params'])}; {fix}")
    param_names = {id(p): n for n, p in model.named_parameters()}
    for group, mine in zip(groups, own):
        for key, param in zip(group["params"], mine["params"]):
            for what, value in (saved["state"].get(key) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(
                        f"{url}: its optimizer state's {what} for {param_names.get(id(param), 'a parameter')} has "
                        f"shape {tuple(value.shape)}, the parameter {tuple(param.shape)}: it was saved for another "
                        "model or parameter order; save the optimizer of the same model class")
    unknown = sorted({k for g in groups for k in g} - {k for g in own for k in g} - NOT_HYPERPARAMETERS)
    if unknown:
        raise CheckpointError(f"{url}: its optimizer state has the settings {', '.join(unknown)}, which this job's "
                              f"{type(optimizer).__name__} does not take: it was saved from another optimizer; set "
                              "optim.name to that one")
    try:
        dist.load_whole_optimizer(model, optimizer, saved)
    except (IndexError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{url}: its optimizer state does not load into this job's "
                              f"{type(optimizer).__name__} ({one_line(err)})") from None


def _without_head(weights: dict, new_head: str | None) -> dict:
    return weights if new_head is None else {k: v for k, v in weights.items() if not under(k, new_head)}


def _candidates(saved: Iterable[str], own: Iterable[str]) -> set[KeyMapping]:
    """Every mapping that turns at least one saved key into a model key: a dotted prefix of a saved key to strip
    (module., _orig_mod., model., net., …) or of a model key to add (backbone., …); and the keys as saved."""
    found = {KeyMapping()}
    for keys, targets, add in ((saved, set(own), False), (own, set(saved), True)):
        for key in keys:
            dot = key.find(".")
            while dot != -1:
                if key[dot + 1:] in targets:
                    found.add(KeyMapping(key[:dot + 1], add))
                dot = key.find(".", dot + 1)
    return found


def _fit(mapping: KeyMapping, weights: dict, own: dict, new_head: str | None) -> tuple[int, int, int]:
    """(model keys not covered, shapes that differ, unexpected keys): smaller is better."""
    mapped = _without_head(mapping.apply(weights)[0], new_head)
    return (sum(k not in mapped for k in own), sum(k in mapped and mapped[k].shape != v.shape for k, v in own.items()),
            sum(k not in own for k in mapped))


def find_mapping(weights: dict, own: dict, new_head: str | None, url: str) -> KeyMapping:
    """The one mapping under which the saved keys cover the most model keys (then: fewest shape mismatches and
    unexpected keys). The keys as saved win whenever they cover as many; a tie between mappings is an error."""
    scores = {m: _fit(m, weights, own, new_head) for m in _candidates(weights, own)}
    best = min(scores.values())
    if scores[KeyMapping()][0] == best[0]:
        return KeyMapping()
    tied = sorted((m for m, s in scores.items() if s == best), key=str)
    if len(tied) > 1:
        raise CheckpointError(f"{url}: the keys fit the model equally under {' and '.join(map(str, tied))}; choose "
                              f"one with model.init_prefix ({PREFIX_SYNTAX})")
    return tied[0]


def load_pretrained(model: nn.Module, url: str, **options) -> str:
    """load_run's report: load the weights only."""
    return load_run(model, url, **options)[0]


def load_run(model: nn.Module, url: str, *, storage_options: dict | None = None, strict: bool = True,
             trust_pickle: bool = False, new_head: str | None = None, prefix: str | None = None,
             continuing: bool = False) -> tuple[str, SavedRun | None]:
    """Load weights from a safetensors file, a state_dict, a checkpoint dict (PyTorch tutorial, Lightning .ckpt,
    {'model': …}, {'module': …}) or a runner checkpoint or store into `model`; returns a one-line report naming
    the format and the key mapping, and with `continuing` (model.init_optimizer) what else the file saved
    (SavedRun; otherwise None: the other fields of a weights-only load are never looked at). `new_head`: the module replace_head
    swaps out next; its keys are neither loaded nor checked (a 1000-class fc meets a 10-class one). `prefix`:
    model.init_prefix (see parse_prefix); None finds the mapping from the keys."""
    data, path, kind = _read(url, storage_options)
    saved, fmt, loaded = _decode(data, path, url, trust_pickle, kind)
    run = _saved_run(loaded, url, fmt, path, kind) if continuing else None
    own = _without_head(model.state_dict(), new_head)
    mapping = parse_prefix(prefix)
    if mapping is not None and mapping.prefix and not mapping.add and not any(k.startswith(mapping.prefix)
                                                                              for k in saved):
        raise CheckpointError(f"model.init_prefix: no key of {url} starts with '{mapping.prefix}' (its keys: "
                              f"{_names(saved)}); {PREFIX_SYNTAX}")
    mapping = mapping if mapping is not None else find_mapping(saved, own, new_head, url)
    weights, ignored = mapping.apply(saved)
    weights = _without_head(weights, new_head)
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k} {tuple(weights[k].shape)}→{tuple(v.shape)}"
                  for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    found = f"format: {fmt}" + (f"; keys: {mapping}" if mapping.prefix else "")
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(
            f"{url} does not match the model: missing {_names(missing)}; unexpected {_names(unexpected)}; "
            f"shape mismatch {_names(mismatched)} ({found}); replace the head (finetune.head), map the keys "
            "(model.init_prefix) or load what matches with model.strict: false")
    matching = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    dist.load_whole_model(model, matching, strict=False)  # the checks above were strict's
    report = (f"loaded {len(matching)}/{len(own)} tensors from {url}; missing: {_names(missing)}; "
              f"unexpected: {_names(unexpected)}") + (f"; new head: {new_head}" if new_head else "")
    report += f"; skipped (shape): {_names(mismatched)}" if mismatched else ""
    report += f"; ignored (outside '{mapping.prefix}'): {_names(ignored)}" if ignored else ""
    return f"{report}; {found}", run

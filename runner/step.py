"""train.step, the user's own training step: fn(model, batch) → loss or (loss, {name: scalar}).

Its return value is checked from tensor metadata only (nothing is read from the device), and its loss and metrics
go into the running sums on the device, weighted by the batch's samples. Runner's own step, loss(model(x), y),
needs (x, y) batches (`pair`). See README, "Your own training step".
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .job import Job


def pair(batch) -> tuple:
    """(x, y) of a batch for runner's own step."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ConfigError(f"data: a batch is {what}, not (x, y) as runner's step needs for loss(model(x), y); for other "
                      "batches set train.step to your own fn(model, batch)")


def call_step(job: Job, model, batch, training: bool) -> tuple[torch.Tensor, dict]:
    """train.step's (loss, metrics), their types checked from metadata (nothing is read from the device)."""
    result = job.step(model, batch)
    loss, metrics = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
        raise ConfigError(f"train.step: {job.cfg.train.step} returned {kind(result)}; return the loss as a scalar "
                          "tensor, or (loss, {name: scalar tensor or float})")
    if training and not loss.requires_grad:
        raise ConfigError(f"train.step: {job.cfg.train.step} returned a loss that does not require grad (detached, "
                          "or computed under torch.no_grad); return the loss backward should run from")
    if not isinstance(metrics, dict):
        raise ConfigError(f"train.step: {job.cfg.train.step} returned (loss, {kind(metrics)}); the second item must "
                          "be a dict of name → scalar tensor or float")
    for name, value in metrics.items():
        if not (isinstance(value, torch.Tensor) and value.numel() == 1
                or isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ConfigError(f"train.step: {job.cfg.train.step} returned the metric '{name}' as {kind(value)}; "
                              "return a scalar tensor or float")
    return loss, metrics


def kind(value) -> str:
    """What a value is, for error messages (never its content: that would read the device)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, (tuple, list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"


def add_step(sums: torch.Tensor, names: list[str], loss: torch.Tensor, metrics: dict, samples: int) -> None:
    """train.step's loss and metrics, weighted by the batch's samples, into the running [loss sum, correct
    (unused), count, one sum per name] on the device, without reading anything back."""
    if metrics.keys() != set(names):
        raise ConfigError(f"train.step: the metrics it returns changed from {sorted(names)} to {sorted(metrics)}; "
                          "return the same names on every call")
    sums[0].add_(loss.detach().reshape(()), alpha=samples)
    sums[2].add_(samples)
    for i, name in enumerate(names, 3):
        value = metrics[name]
        sums[i].add_(value.detach().reshape(()) if isinstance(value, torch.Tensor) else value, alpha=samples)

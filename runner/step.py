"""What one batch computes, behind one interface: runner's own step, loss(model(x), y) on (x, y) batches, or the
user's `train.step`, fn(model, batch) → loss or (loss, {name: scalar}). See README, "Your own training step".

A step is called as `step(model, batch, training)` → (loss, outputs) and `step.add(sums, names, loss, outputs,
samples)` adds what it measured to the running sums on the device: [loss sum, correct, count, one sum per metric
name], weighted by the batch's samples (from the sampler, never from the batch). The user's return value is checked
from tensor metadata only; nothing is read from the device.
"""
from __future__ import annotations

import copy

import torch

from .errors import ConfigError


class RunnerStep:
    """train.loss(model(x), y). Training returns the loss as train.loss reduces it; evaluation per-sample losses,
    summed in float64 so the validation loss does not depend on the batching. Counts correct predictions for class
    targets. The outputs it passes to `add` are (correct predictions or None, samples)."""

    accuracy = True

    def __init__(self, loss_fn: torch.nn.Module):
        self.loss_fn = loss_fn
        self.per_sample = copy.copy(loss_fn)
        if hasattr(self.per_sample, "reduction"):
            self.per_sample.reduction = "none"
        self.forward = self.measure  # or its compiled graph (compile)
        self.sums, self.views = None, ()  # views of the sums last added to: indexing costs an op per sum each step

    def compile(self, options: dict) -> None:
        """torch.compile the model's forward, the loss and the correct count as one graph (compiler.compile_model,
        one process): the loss and its backward fuse, and the step makes one compiled call instead of the model's
        call plus a few eager ops, each costing about as much as a layer of a small model."""
        if self.forward == self.measure:
            self.forward = torch.compile(self.measure, **options)

    def __call__(self, model, batch, training: bool) -> tuple[torch.Tensor, tuple]:
        x, y = pair(batch)
        loss, correct = self.forward(model, x, y, training)
        return loss, (correct, len(y))

    def measure(self, model, x: torch.Tensor, y: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        if training:
            loss = self.loss_fn(out, y)
        else:
            loss = self.per_sample(out, y)
            if loss.dim() > 1:  # per token (a sequence): each sample's mean, as the training loss weighs them
                loss = loss.flatten(1).double().mean(1)
        return loss, correct_predictions(out, y)

    def metric_names(self, outputs) -> list[str] | None:
        return None  # [loss, correct, count] only

    def add(self, sums: torch.Tensor, names, loss: torch.Tensor, outputs: tuple, samples: int) -> None:
        """Running [loss sum, correct, count] on the device, without reading anything back: the mean loss × the
        batch's samples, or the per-sample losses' sum, in float64."""
        if sums is not self.sums:
            self.sums, self.views = sums, sums[:3].unbind()
        loss_sum, correct_sum, count = self.views
        if loss.dim():  # per-sample losses (evaluation)
            loss_sum.add_(loss.double().sum())
        else:
            loss_sum.add_(loss.detach(), alpha=samples)
        correct, batch_size = outputs
        if correct is not None:
            correct_sum.add_(correct)
        count.add_(batch_size)


class UserStep:
    """train.step: the user's fn(model, batch); its metrics are named by the run's first step."""

    accuracy = False

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, model, batch, training: bool) -> tuple[torch.Tensor, dict]:
        return call_step(self.fn, self.name, model, batch, training)

    def metric_names(self, metrics: dict) -> list[str]:
        if "loss" in metrics:
            raise ConfigError("train.step: a metric named 'loss' would replace train_loss and val_loss; rename it")
        return list(metrics)

    def add(self, sums: torch.Tensor, names: list[str], loss: torch.Tensor, metrics: dict, samples: int) -> None:
        add_step(sums, names, loss, metrics, samples)


Step = RunnerStep | UserStep


def pair(batch) -> tuple:
    """(x, y) of a batch for runner's own step."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ConfigError(f"data: a batch is {what}, not (x, y) as runner's step needs for loss(model(x), y); for other "
                      "batches set train.step to your own fn(model, batch)")


def call_step(fn, name: str, model, batch, training: bool) -> tuple[torch.Tensor, dict]:
    """train.step `name`'s (loss, metrics), their types checked from metadata (nothing is read from the device)."""
    result = fn(model, batch)
    loss, metrics = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
        raise ConfigError(f"train.step: {name} returned {kind(result)}; return the loss as a scalar "
                          "tensor, or (loss, {name: scalar tensor or float})")
    if training and not loss.requires_grad:
        raise ConfigError(f"train.step: {name} returned a loss that does not require grad (detached, "
                          "or computed under torch.no_grad); return the loss backward should run from")
    if not isinstance(metrics, dict):
        raise ConfigError(f"train.step: {name} returned (loss, {kind(metrics)}); the second item must "
                          "be a dict of name → scalar tensor or float")
    for name, value in metrics.items():
        if not (isinstance(value, torch.Tensor) and value.numel() == 1
                or isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ConfigError(f"train.step: {name} returned the metric '{name}' as {kind(value)}; "
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


def correct_predictions(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """How many predictions are right, for class-index targets (class scores in dim 1, per sample or per token:
    a sequence counts its share of right tokens); None for other targets."""
    if y.is_floating_point() or out.dim() != y.dim() + 1:
        return None
    hits = out.argmax(1) == y
    return hits.sum() if hits.dim() == 1 else hits.flatten(1).double().mean(1).sum()

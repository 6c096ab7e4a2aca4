"""`runner summary`: a torchsummary-style table of a model, and what each fine-tune phase trains."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from runner import finetune

_COLUMNS = ("layer", "type", "output shape", "params", "trainable")


def _shape(output: object, batch: int) -> str:
    """Output shape with the batch dimension shown as -1, as torchsummary does."""
    if isinstance(output, torch.Tensor):
        dims = list(output.shape)
        if dims and dims[0] == batch:
            dims[0] = -1
        return str(dims)
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(_shape(o, batch) for o in output) + ")"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_shape(v, batch)}" for k, v in output.items()) + "}"
    return type(output).__name__


def _trainable(params: list[nn.Parameter]) -> str:
    if not params:
        return "-"
    flags = {p.requires_grad for p in params}
    return "partial" if len(flags) > 1 else ("yes" if flags.pop() else "no")


def _trace(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, ...]]:
    """One row per leaf-module call, in execution order, from a single no-grad forward."""
    rows, handles = [], []
    # per-module modes, not just the root's: a fine-tune plan keeps frozen BatchNorm in eval
    modes = {m: m.training for m in model.modules()}

    def hook_for(name: str):
        def hook(module, inputs, output):
            params = list(module.parameters())
            rows.append((name or type(model).__name__, type(module).__name__,
                         _shape(output, example_input.shape[0]),
                         f"{sum(p.numel() for p in params):,}", _trainable(params)))
        return hook

    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                handles.append(module.register_forward_hook(hook_for(name)))
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return rows


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    right = (False, False, False, True, False)  # numbers line up on the right

    def fmt(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    rule = "-" * len(fmt(tuple("-" * w for w in widths)))
    return [fmt(_COLUMNS), rule, *(fmt(r) for r in rows), rule]


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _totals(model: nn.Module) -> list[str]:
    params = list(model.parameters())  # unique: tied weights count once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return [f"total params: {total:,}", f"trainable params: {trainable:,}", f"frozen params: {total - trainable:,}",
            f"parameter memory: {_mib(params):.2f} MB", f"buffer memory: {_mib(model.buffers()):.2f} MB"]


def _phase_lines(model: nn.Module, phases: Sequence[finetune.Phase], head: str | None) -> list[str]:
    trial = copy.deepcopy(model)  # apply_phase mutates; the caller's model must not change
    finetune.validate_plan(trial, phases, head)
    total = sum(p.numel() for p in trial.parameters())
    lines = ["", f"fine-tune plan (head: {head or 'none'}):"]
    for index, phase in enumerate(phases):
        finetune.apply_phase(trial, phases, index, head)
        trainable = sum(p.numel() for p in trial.parameters() if p.requires_grad)
        start, end = finetune.phase_span(phases, index)
        epochs = (f"epochs {start}-end" if end is None
                  else f"epoch {start}" if end - start == 1 else f"epochs {start}-{end - 1}")
        mults = ", ".join(f"{key} x{mult:g}" for key, mult in phase.lr_mult.items())
        lines.append(f"phase {index + 1} ({epochs}): trains {', '.join(phase.train)} — "
                     f"trainable {trainable:,} / frozen {total - trainable:,}" + (f"; lr {mults}" if mults else ""))
    return lines


def summarize(model: nn.Module, example_input: torch.Tensor,
              phases: Sequence[finetune.Phase] | None = None, head: str | None = None) -> str:
    """Layer table from one forward of `example_input` ([B, ...]), totals, and per-phase counts."""
    lines = _table(_trace(model, example_input)) + _totals(model)
    if phases:
        lines += _phase_lines(model, phases, head)
    return "\n".join(lines)

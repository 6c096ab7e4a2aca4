"""Transfer-learning plan: a fresh head, and phases saying which modules train per epoch and at what LR
multiplier. What trains is a pure function of (plan, epoch), so a resumed run freezes what the original froze;
optimizer groups are built once and a phase change only rescales LRs. Loading pretrained weights is
runner/weights.py."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from runner.errors import ConfigError

KEYWORDS = ("all", "head", "backbone")  # "backbone" = every parameter not under the head


@dataclass(frozen=True)
class Phase:
    """One stretch of a fine-tune plan."""
    epochs: int | None  # length in epochs; None = until the run ends (last phase only)
    train: tuple[str, ...] = ("all",)  # "all", "head", "backbone" or dotted module names
    lr_mult: dict[str, float] = field(default_factory=dict)  # module/"head"/"backbone"/"all" → multiplier

    def __post_init__(self):
        # YAML gives lists or a bare string; a tuple keeps phases comparable and printable alike
        object.__setattr__(self, "train", (self.train,) if isinstance(self.train, str) else tuple(self.train))
        object.__setattr__(self, "lr_mult", dict(self.lr_mult))


def _module(model: nn.Module, path: str, where: str = "") -> nn.Module:
    if path:
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path)
    top = ", ".join(name for name, _ in model.named_children()) or "none"
    raise ConfigError(f"{where}{': ' if where else ''}model has no module '{path}'; top-level modules: {top}")


def replace_head(model: nn.Module, module_path: str, num_classes: int) -> None:
    """Swap the classifier at `module_path` for a fresh one with `num_classes` outputs."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes for head '{module_path}' must be a positive integer, got {num_classes!r}")
    old = _module(model, module_path)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1):
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    else:
        inner = [name for name, m in old.named_modules() if isinstance(m, nn.Linear)]
        hint = f"; did you mean '{module_path}.{inner[-1]}'?" if inner else ""
        raise ConfigError(f"head '{module_path}' is a {type(old).__name__}, not an nn.Linear or 1x1 nn.Conv2d{hint}")
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, _, name = module_path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def phase_at(phases: Sequence[Phase], epoch: int) -> int:
    """Index of the phase that 0-based `epoch` falls in; -1 when there is no plan."""
    end = 0
    for index, phase in enumerate(phases):
        if phase.epochs is None:
            return index
        end += phase.epochs
        if epoch < end:
            return index
    return len(phases) - 1  # past a finite plan the last phase goes on (-1 for an empty plan)


def phase_span(phases: Sequence[Phase], index: int) -> tuple[int, int | None]:
    """[start, end) epochs of phase `index`; end None for the last phase, which lasts to the end."""
    start = sum(p.epochs or 0 for p in phases[:index])
    return start, None if index == len(phases) - 1 else start + phases[index].epochs


def under(name: str, path: str) -> bool:
    """`name` is the module or parameter `path` or inside it (dotted names)."""
    return name == path or name.startswith(path + ".")


def _selected(name: str, keys: Iterable[str], head: str | None) -> bool:
    """Does the parameter or module `name` fall under any of the phase's `keys`?"""
    in_head = head is not None and under(name, head)
    return any(key == "all" or (key == "head" and in_head) or (key == "backbone" and not in_head)
               or (key not in KEYWORDS and under(name, key)) for key in keys)


def _check_keys(model: nn.Module, keys: Iterable[str], head: str | None, where: str) -> None:
    for key in keys:
        if key in ("head", "backbone") and head is None:
            raise ConfigError(f"{where}: '{key}' needs finetune.head.module, the classifier's dotted path (e.g. fc)")
        if key not in KEYWORDS:
            _module(model, key, where)


def validate_plan(model: nn.Module, phases: Sequence[Phase], head: str | None) -> None:
    """Check every phase against the model once, before training starts."""
    if head is not None:
        _module(model, head, "finetune.head.module")
    for i, phase in enumerate(phases):
        where = f"finetune.phases[{i}]"
        counted = isinstance(phase.epochs, int) and not isinstance(phase.epochs, bool) and phase.epochs > 0
        if not counted and (phase.epochs is not None or i != len(phases) - 1):
            raise ConfigError(f"{where}.epochs: {phase.epochs!r} must be a positive integer; only the last "
                              "phase may omit it to run until the end")
        if not phase.train:
            raise ConfigError(f"{where}.train: empty; list 'all', 'head', 'backbone' or module names")
        _check_keys(model, phase.train, head, f"{where}.train")
        _check_keys(model, phase.lr_mult, head, f"{where}.lr_mult")
        for key, mult in phase.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < float("inf"):
                raise ConfigError(f"{where}.lr_mult.{key}: {mult!r} must be a number > 0; to stop a module "
                                  "learning, leave it out of this phase's train list instead")


def _train_keys(phases: Sequence[Phase], index: int) -> tuple[str, ...]:
    return phases[index].train if phases and index >= 0 else ("all",)


def _set_bn_modes(model: nn.Module, keys: Iterable[str], head: str | None, freeze_bn: bool) -> None:
    # a frozen BatchNorm must also stop updating its running statistics, or the backbone still drifts
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(model.training and not (freeze_bn and not _selected(name, keys, head)))


def apply_phase(model: nn.Module, phases: Sequence[Phase], index: int, head: str | None, freeze_bn: bool = True):
    """Set requires_grad (and BatchNorm modes) for phase `index`; index -1 = everything trains."""
    keys = _train_keys(phases, index)
    if phases and index >= 0:
        _check_keys(model, keys, head, f"finetune.phases[{index}].train")
    # a tied parameter trains if any of its names is selected
    trains = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if _selected(name, keys, head)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trains)
    _set_bn_modes(model, keys, head, freeze_bn)


def set_train_mode(model: nn.Module, phases: Sequence[Phase], index: int, head: str | None, freeze_bn: bool = True):
    """model.train(), keeping the phase's frozen BatchNorm modules in eval mode."""
    model.train()
    _set_bn_modes(model, _train_keys(phases, index), head, freeze_bn)


def param_groups(model: nn.Module, phases: Sequence[Phase], head: str | None) -> list[dict]:
    """Optimizer groups over all parameters, fine enough that every phase's multipliers are uniform
    within each group: one per module named in any lr_mult (most specific path wins), "head", "rest"."""
    if not phases:
        return [{"params": list(model.parameters()), "name": "all", "path": None, "lr_mult": 1.0}]
    validate_plan(model, phases, head)
    names = {head: "head"} if head is not None else {}  # module path → group name
    for key in (key for phase in phases for key in phase.lr_mult if key not in KEYWORDS):
        names.setdefault(key, key)
    members: dict[str, list] = {name: [] for name in [*sorted(set(names.values()) - {"head"}), "head", "rest"]}
    for pname, p in model.named_parameters():
        owner = max((path for path in names if under(pname, path)), key=len, default=None)
        members[names[owner] if owner is not None else "rest"].append(p)
    paths = {name: path for path, name in names.items()}
    return [{"params": ps, "name": name, "path": paths.get(name), "lr_mult": 1.0}
            for name, ps in members.items() if ps]


def _group_mult(phase: Phase, path: str | None, head: str | None) -> float:
    """The multiplier for the group at module `path` (None = rest): the most specific key wins."""
    best, best_rank = 1.0, -3
    for key, mult in phase.lr_mult.items():
        target = head if key == "head" else key
        if key == "all":
            rank = -2
        elif key == "backbone":
            rank = -1 if path is None or head is None or not under(path, head) else -4
        else:
            rank = len(target) if path is not None and target is not None and under(path, target) else -4
        if rank > best_rank:
            best, best_rank = mult, rank
    return best


def apply_lr_mults(optimizer: torch.optim.Optimizer, scheduler, phases: Sequence[Phase], index: int) -> None:
    """Rescale each group's LR from its stored multiplier to phase `index`'s; a no-op when they agree,
    so it is idempotent and does nothing after a resume that restored optimizer and scheduler."""
    groups = optimizer.param_groups
    head = next((g.get("path") for g in groups if g.get("name") == "head"), None)
    for i, group in enumerate(groups):
        new = _group_mult(phases[index], group.get("path"), head) if phases and index >= 0 else 1.0
        if not new > 0:
            raise ConfigError(f"finetune.phases[{index}].lr_mult: {new!r} for group '{group.get('name')}' "
                              "must be > 0; leave the module out of the phase's train list instead")
        if new == group.get("lr_mult", 1.0):
            continue
        factor = new / group.get("lr_mult", 1.0)
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # the last three: schedulers' anchors (OneCycleLR)
            if key in group:
                group[key] *= factor
        # closed-form schedules compute from these lists; SequentialLR's children keep their own
        for sched in [] if scheduler is None else [scheduler, *getattr(scheduler, "_schedulers", [])]:
            for attr in ("base_lrs", "max_lrs"):
                values = getattr(sched, attr, None)
                if isinstance(values, list) and i < len(values):
                    values[i] *= factor
        group["lr_mult"] = new

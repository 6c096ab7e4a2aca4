"""Config drift on resume: which keys of this start's config differ from the checkpoint's, and whether that matters.

The checkpoint's config is the dict its manifest stores (`manifest_config`), possibly written by an older runner
with fewer or more keys. Both sides are compared leaf by leaf under dotted keys, after a JSON round trip and
redaction, so a checkpoint never differs from its own job file.

A run continued from another tool's checkpoint (model.init_optimizer) has no config to compare: its optimizer's
parameter groups and scheduler state stand for it (`optimizer_changes`, `scheduler_changes`), named by the config
keys that set them, under the same rule.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from .config import RunConfig, is_config_key, redact, to_dict


class Category(enum.Enum):
    TRAJECTORY = "trajectory"
    """Changes what trains (model, data, optimizer, schedule, loss, …): refused unless resume.allow_changes lists it."""
    EXTEND = "extend"
    """How long to train: never blocks; a larger value extends a finished run."""
    FREE = "free"
    """No effect on the math (workers, logging, devices, where and when to save): never blocks."""
    GLOBAL_BATCH = "global batch"
    """Ways to state the global batch: the checkpointer compares the effective global batch instead."""


# Longest matching prefix wins; any other key (model.*, data.*, optim.*, scheduler.*, the rest of train.*,
# finetune.*, and sections added later) is TRAJECTORY, so an unknown key is refused rather than silently changed.
CATEGORIES = {
    "model.init_from": Category.FREE,  # on resume the checkpoint's weights replace the initial ones
    "model.weights": Category.FREE,
    "model.strict": Category.FREE,
    "model.trust_pickle": Category.FREE,
    "model.init_prefix": Category.FREE,
    "model.init_optimizer": Category.FREE,  # like init_from: read only by a fresh start
    "model.init_epoch": Category.FREE,
    "data.num_workers": Category.FREE,
    "data.eval_batch_size": Category.FREE,
    "data.global_batch_size": Category.GLOBAL_BATCH,
    "train.accumulate": Category.GLOBAL_BATCH,
    "train.max_epochs": Category.EXTEND,
    "train.max_steps": Category.EXTEND,
    "train.progress": Category.FREE,
    "train.log_every_steps": Category.FREE,
    "train.deterministic": Category.FREE,
    "train.device": Category.FREE,
    "train.compile": Category.FREE,  # float rounding, like the device: docs/design.md, "Compiled training"
    "train.activation_checkpointing": Category.FREE,  # recomputes the same activations
    "train.channels_last": Category.FREE,  # float rounding
    "optim.args.fused": Category.FREE,  # implementations of the same update
    "optim.args.foreach": Category.FREE,
    "dist": Category.FREE,
    "preemption": Category.FREE,
    "watchdog": Category.FREE,
    "checkpoint": Category.FREE,
    "resume": Category.FREE,
    "out_dir": Category.FREE,
    "metrics": Category.FREE,
    "logging": Category.FREE,
}

# Optimizer group entries that are not the optimizer's hyperparameters: runner's group bookkeeping
# (finetune.param_groups), schedulers' anchors (the base LR is compared as optim.lr), and implementation switches
# that do not change the math.
NOT_HYPERPARAMETERS = frozenset({"params", "param_names", "name", "path", "lr_mult", "initial_lr", "max_lr", "min_lr",
                                 "max_momentum", "base_momentum", "foreach", "fused", "differentiable", "capturable"})


class Unset:
    """The value of a key one side does not have (a free-form argument added or removed)."""

    def __repr__(self) -> str:
        return "(unset)"


UNSET = Unset()


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {compact(self.old)} → {compact(self.new)}"


def category(key: str) -> Category:
    prefixes = [p for p in CATEGORIES if key == p or key.startswith(p + ".")]
    return CATEGORIES[max(prefixes, key=len)] if prefixes else Category.TRAJECTORY


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to the leaves, through free-form mappings too (data.args.augment); lists are leaves."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(saved: dict, current: dict) -> list[Change]:
    """Every leaf whose value differs, sorted by key.

    A key the checkpoint lacks (added in a later version) compares against its current default; a key the
    current schema no longer has is ignored.
    """
    old, new = (flatten(normalise(side)) for side in (saved, current))
    defaults = flatten(normalise(to_dict(RunConfig())))
    keys = new.keys() | {k for k in old if is_config_key(k)}
    found = [Change(k, old.get(k, defaults.get(k, UNSET)), new.get(k, UNSET)) for k in sorted(keys)]
    found = [c for c in found if not same(c.old, c.new)]
    # An optional section set on one side only (finetune.head) shows as its fields; drop the null/unset pair.
    return [c for c in found if not (null_or_unset(c) and any(k.startswith(c.key + ".") for k in keys))]


def null_or_unset(change: Change) -> bool:
    return (change.old, change.new) in ((None, UNSET), (UNSET, None))


def trajectory_changes(saved: dict, current: dict) -> list[Change]:
    """The changes to what trains, sorted by key: a resume refuses these unless they are allowed."""
    return [c for c in changes(saved, current) if category(c.key) is Category.TRAJECTORY]


def is_allowed(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


WAYS_OUT = "resume with the original values, allow them with {allow}, or start a new run in another checkpoint.dir"


def refusal(found: list[Change], allowed: list[str], url: str, what: str = "was written with another config",
            ways_out: str = WAYS_OUT) -> str | None:
    """None if every change is allowed, else one line that names each refused change and the ways out
    (`ways_out` names the allow list as {allow})."""
    refused = [c for c in found if not is_allowed(c.key, allowed)]
    if not refused:
        return None
    listed = ",".join([*allowed, *(c.key for c in refused)])
    return (f"{url} {what}: {', '.join(map(str, refused))}; "
            + ways_out.format(allow=f"resume.allow_changes=[{listed}]"))


def optimizer_changes(saved: list[dict], built: list[dict]) -> list[Change]:
    """How a saved optimizer's parameter groups differ from the ones this job built (as many, in order), by the
    config key that sets each: `optim.lr` for the base LR, `optim.args.<name>` for the others; a value that differs
    between groups is listed per group. Only entries both sides have, sorted by key."""
    found = []
    for key in set.intersection(*(set(g) for g in [*saved, *built])) - NOT_HYPERPARAMETERS:
        old, new = ([hyperparameter(g, key) for g in groups] for groups in (saved, built))
        if not same(old, new):
            found.append(Change("optim.lr" if key == "lr" else f"optim.args.{key}", one_or_all(old), one_or_all(new)))
    return sorted(found, key=lambda c: c.key)


def hyperparameter(group: dict, key: str) -> Any:
    """A group's value as a config value: for lr the base LR (a scheduler's initial_lr, else lr); a tensor (LR) or
    tuple (betas) as JSON has it."""
    value = group.get("initial_lr", group["lr"]) if key == "lr" else group[key]
    value = value.tolist() if hasattr(value, "tolist") else value
    return list(value) if isinstance(value, tuple) else value


def one_or_all(values: list) -> Any:
    """The value all groups share, else the list of them."""
    return values[0] if all(same(v, values[0]) for v in values) else values


def scheduler_changes(saved: dict, built: dict, args: list[str], saved_groups: list[dict],
                      built_groups: list[dict]) -> list[Change]:
    """The scheduler.args whose value in a saved scheduler state (and its optimizer's groups) differs from what
    this job built, sorted by key; only values both sides hold, as a scalar on the job's."""
    found = []
    for a in sorted(args):
        old, new = scheduler_arg(saved, saved_groups, a), scheduler_arg(built, built_groups, a)
        if old is not UNSET and isinstance(new, (int, float, str)) and not same(old, new):
            found.append(Change(f"scheduler.args.{a}", old, new))
    return found


def scheduler_arg(state: dict, groups: list[dict], name: str) -> Any:
    """A scheduler argument as a saved state holds it: an attribute of the scheduler, else an entry of every
    parameter group (OneCycleLR keeps max_lr, base_momentum and max_momentum there); UNSET where neither has it."""
    if name in state:
        return state[name]
    if groups and all(name in g for g in groups):
        return one_or_all([hyperparameter(g, name) for g in groups])
    return UNSET


def describe(found: list[Change]) -> str:
    """For the log line when allowed changes are applied: `optim.lr 0.01 → 0.5; …`."""
    return "; ".join(map(str, found))


def normalise(config: dict) -> dict:
    """As the manifest's JSON holds it, secrets redacted (an older manifest may predate redaction)."""
    return redact(json.loads(json.dumps(config)))


def same(a: Any, b: Any) -> bool:
    """Equal as config values: 3 and 3.0 are, true and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def compact(value: Any, limit: int = 40) -> str:
    text = repr(value) if value is UNSET else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"

"""Job file → typed, frozen config.

YAML plus `a.b=value` overrides are merged into one dict, then converted field by field into the
dataclasses below. Every error names the file and the dotted key and, for typos, the closest key.
Checkpoint manifests store the resolved config as JSON, so every value must survive a JSON round trip; secrets
(storage credentials, passwords) are redacted wherever the config is printed or stored.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"
    """Built-in (`cnn`, `mlp`, `gpt`), `torchvision.<model>`, or a user class/factory `pkg.module:Name`."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the model constructor."""
    num_classes: Optional[int] = None
    """Output classes; defaults to the dataset's class count for classification data."""
    weights: Optional[str] = None
    """torchvision weights name (e.g. IMAGENET1K_V1); downloaded by torchvision."""
    init_from: Optional[str] = None
    """fsspec URL of a state_dict (.pt/.pth), .safetensors file or runner checkpoint to start from."""
    strict: bool = True
    """With init_from: fail on missing/unexpected keys instead of loading what matches."""
    trust_pickle: bool = False
    """With init_from: allow pickled Python objects (a whole model, a Lightning .ckpt's hyper_parameters); this runs
    code from the file, so only for files you trust."""
    init_prefix: Optional[str] = None
    """With init_from: how saved keys map to the model's: `model.` strips that prefix (keys outside it are ignored),
    `+backbone.` adds one, `""` keeps them as saved; unset: the one mapping that fits, found from the keys."""
    init_optimizer: bool = False
    """With init_from: continue the run the file was saved from (a fresh start only): load its optimizer state and,
    when saved, its scheduler and GradScaler states, and start after its `epoch` (see init_epoch)."""
    init_epoch: Literal["last_finished", "next"] = "last_finished"
    """With init_optimizer, what the file's `epoch` means: `last_finished`, the 0-based index of the last finished
    epoch (the PyTorch tutorial's loop, Lightning's epoch-end checkpoints); `next`, the 0-based epoch to train next,
    i.e. the number of finished epochs (pytorch/examples' ImageNet script, Lightning's after trainer.fit)."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    """`digits`, `csv`, `imagefolder`, `synthetic`, `text`, `torchvision.<Dataset>`, or `pkg.module:factory`."""
    args: dict = field(default_factory=dict)
    """Dataset-specific options (path, columns, root, download, shape, augment, classes, …)."""
    batch_size: int = 32
    """Samples per micro-batch on each rank; the global batch is batch_size × world size × accumulation."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; fixes it across world sizes (accumulation is derived)."""
    eval_batch_size: Optional[int] = None
    """Per-rank batch size for evaluation; defaults to batch_size."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    shuffle: bool = True
    """Shuffle the training set each epoch (order is a function of seed, epoch and world size)."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "AdamW"
    """Any torch.optim optimizer class name, or `pkg.module:Class`."""
    lr: float = 1e-3
    """Base learning rate."""
    args: dict = field(default_factory=dict)
    """Other optimizer keyword arguments (weight_decay, momentum, betas, …)."""


@dataclass(frozen=True)
class SchedulerConfig:
    name: Optional[str] = None
    """Any torch.optim.lr_scheduler class name, or `pkg.module:Class`; none by default."""
    args: dict = field(default_factory=dict)
    """Scheduler keyword arguments (step_size, T_max, …)."""
    interval: Literal["epoch", "step"] = "epoch"
    """Step the scheduler after every epoch or after every optimizer step."""
    monitor: str = "val_loss"
    """Metric passed to ReduceLROnPlateau."""


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: Optional[str] = None
    """Metric to watch (e.g. val_loss, val_acc); none disables early stopping."""
    patience: int = 3
    """Epochs without improvement before stopping."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller or larger is better."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""


@dataclass(frozen=True)
class CompileConfig:
    enabled: bool = False
    """Compile the model with torch.compile; `train.compile: true` or a mapping of the keys below turns it on."""
    mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    """torch.compile's mode; unset: its default."""
    dynamic: Optional[bool] = False
    """false (runner's default): one static graph per input shape, so a kernel depends on the shape alone and a
    resumed run computes exactly what the uninterrupted one did; null: torch's automatic dynamic shapes."""
    fullgraph: bool = False
    """Fail on a graph break instead of running that part eagerly."""
    options: dict = field(default_factory=dict)
    """Backend options passed to torch.compile (e.g. max_autotune, epilogue_fusion)."""
    cache: bool = True
    """Keep the compiler's cache beside the checkpoints (<checkpoint.dir>/compile-cache), so a restart on a new
    machine does not compile from nothing. It holds compiled code: trust the store as you trust your code."""


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 10
    """Epochs to train."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps, even mid-epoch."""
    loss: str = "cross_entropy"
    """Loss: cross_entropy, mse, l1, smooth_l1, bce_with_logits, nll, or `pkg.module:Class`."""
    step: Optional[str] = None
    """Your own training step `pkg.module:fn`, fn(model, batch) → loss or (loss, {name: scalar}); batches may then be
    any nesting of tensors, tuples, lists and dicts. Unset: runner's, loss(model(x), y) on (x, y) batches."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value."""
    accumulate: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    precision: Literal["32", "bf16", "fp16"] = "32"
    """Autocast dtype: bf16 works on CPU and GPU; fp16 (with a GradScaler) needs CUDA."""
    seed: int = 0
    """Seed for model init, data order and per-rank randomness."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA if available, else CPU."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop when a metric stops improving."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """auto: a progress bar on a terminal, one line per epoch otherwise."""
    deterministic: bool = True
    """On CUDA: deterministic algorithms and cuDNN/cuBLAS settings, which bit-exact resume needs (some ops slower)."""
    log_every_steps: int = 20
    """Read the running loss every N optimizer steps (a host sync): progress bar and divergence check."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """torch.compile the model (false, true, or {mode, dynamic, fullgraph, options, cache})."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (blocks as dist.fsdp_blocks picks
    them): less memory, about one more forward of compute; the same numbers."""
    channels_last: bool = False
    """Convolutional models: parameters and 4-D inputs in channels-last memory format (faster convolutions on
    GPUs with tensor cores); changes float rounding, not the math."""


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None
    """fsspec URL of the checkpoint store; defaults to <out_dir>/checkpoints."""
    storage_options: dict = field(default_factory=dict)
    """Passed to fsspec (e.g. endpoint_url for S3-compatible servers)."""
    every_steps: Optional[int] = None
    """Save every N optimizer steps."""
    every_minutes: Optional[float] = None
    """Save when this much wall time passed since the last save."""
    local_dir: Optional[str] = None
    """A folder on this machine (/dev/shm, a local NVMe): each checkpoint is committed there first, then copied to
    checkpoint.dir; a restart on the same machine resumes from it when it is the newest (not with fsdp yet)."""
    durable_every: int = 1
    """With local_dir: copy every k-th checkpoint to checkpoint.dir (emergency and final ones always)."""
    every: Optional[Literal["auto"]] = None
    """auto: the wall-time interval chosen from the run's measured save cost and interruptions (Young/Daly,
    √(2·cost·MTBF)), re-chosen after each save; replaces every_minutes."""
    mtbf_hours: float = 6.0
    """every: auto — the prior mean time between interruptions, blended with the run's own history (6 h: spot
    capacity that is taken a few times a day; preemptible GCE VMs live at most 24 h)."""
    auto_min_minutes: float = 1.0
    """every: auto — the shortest interval."""
    auto_max_minutes: float = 60.0
    """every: auto — the longest interval."""
    every_epoch: bool = True
    """Save at every epoch end."""
    at_end: bool = True
    """Save when training ends."""
    keep_last: int = 3
    """Keep the newest N checkpoints (0 keeps all)."""
    keep_best: int = 0
    """Also keep the best K by `metric`."""
    metric: Optional[str] = None
    """Metric ranking the best checkpoints (e.g. val_loss)."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller or larger `metric` is better."""
    reuse_buffers: bool = True
    """Keep host buffers for the state between saves: one more copy of the state in host memory, no allocation."""
    lease_ttl_s: float = 30.0
    """Rank 0 holds a lease on the directory, renewed every third of this; another run waits for it to lapse."""


@dataclass(frozen=True)
class ResumeConfig:
    mode: str = "auto"
    """auto: newest valid checkpoint if any; never: always start fresh; or a checkpoint URL."""
    allow_world_size_change: bool = False
    """Resume a checkpoint written with another world size (changes the data order)."""
    allow_changes: list[str] = field(default_factory=list)
    """Dotted config keys (or section prefixes such as `optim` or `scheduler.args`) whose values may differ from
    the resumed checkpoint's; the new values are applied. Any other change to what trains is refused."""


@dataclass(frozen=True)
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: NCCL when every rank has its own GPU, gloo otherwise."""
    timeout_s: float = 300.0
    """A collective that waits longer than this fails, turning a dead or hung peer into an error."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model (DistributedDataParallel); fsdp: parameters, gradients and optimizer
    state sharded over the ranks (FSDP2), and every rank writes its shards of each checkpoint."""
    fsdp_blocks: list[str] = field(default_factory=list)
    """fsdp: class names of the modules sharded as one unit each (their parameters gathered together); empty: the
    members of every nn.ModuleList (a transformer's blocks), else every direct child that holds parameters."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward (less memory, one more all-gather in backward)."""


@dataclass(frozen=True)
class PreemptionConfig:
    grace_s: float = 25.0
    """Seconds from a stop signal to the committed emergency checkpoint (exit 3 if not); below torchrun's 30 s."""
    extra_signal: Optional[str] = "SIGUSR1"
    """Another signal that requests a checkpoint-and-stop (SLURM's --signal), besides SIGTERM/SIGINT."""
    notice: Literal["auto", "aws", "gcp", "azure", "off"] = "auto"
    """Watch the cloud's preemption notice (auto: only where DMI strings or metadata_url say which cloud)."""
    notice_poll_s: float = 5.0
    """Seconds between polls of the metadata service (GCP long-polls instead)."""
    metadata_url: Optional[str] = None
    """Metadata service base URL (default: the provider's); the RUNNER_METADATA_URL environment variable wins."""


@dataclass(frozen=True)
class WatchdogConfig:
    enabled: bool = True
    """A rank that stops making progress writes its stacks to <out_dir>/hangs and exits 76 (torchrun restarts)."""
    step_multiple: float = 20.0
    """Allowance: this many times the running median time between two steps (or evaluation batches)..."""
    floor_s: float = 60.0
    """... and never less than this."""
    first_step_s: float = 900.0
    """Allowance for the first step, compilation, and an epoch's or an evaluation's first batch."""
    save_s: float = 900.0
    """Allowance while a save blocks training (the snapshot, or waiting for the previous write)."""
    gil_s: float = 120.0
    """When even the watchdog's thread cannot run this long (a C call holding the GIL), faulthandler's own timer
    prints every thread's stack to stderr and exits 1."""


@dataclass(frozen=True)
class PhaseConfig:
    epochs: Optional[int] = None
    """Length of the phase in epochs; omit on the last phase to run to the end."""
    train: list[str] = field(default_factory=lambda: ["all"])
    """What trains: `head`, `all`, or dotted module names."""
    lr_mult: dict = field(default_factory=dict)
    """Learning-rate multiplier per module name (`head`, `backbone`, or a dotted name)."""


@dataclass(frozen=True)
class HeadConfig:
    module: str = "fc"
    """Dotted path of the layer to replace (fc, classifier.6, head)."""
    num_classes: int = 10
    """Outputs of the new layer."""


@dataclass(frozen=True)
class FinetuneConfig:
    head: Optional[HeadConfig] = None
    """Replace this layer with a fresh one after loading pretrained weights."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Freeze/unfreeze schedule; empty means everything trains throughout."""
    freeze_bn: bool = True
    """Keep BatchNorm of frozen modules in eval mode (running statistics unchanged)."""


@dataclass(frozen=True)
class MetricsConfig:
    tensorboard: bool = False
    """Also write TensorBoard scalars to <out_dir>/tb (pip install 'runner-train[tensorboard]')."""
    loggers: list[Literal["tensorboard", "mlflow", "wandb", "csv"]] = field(default_factory=list)
    """Experiment trackers, rank 0, one tracker run per lineage (pip install 'runner-train[mlflow]', '[wandb]')."""
    experiment: Optional[str] = None
    """MLflow experiment / W&B project; default: MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else the tracker's default."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (./mlruns, sqlite:///mlflow.db, http://host:5000); default: MLFLOW_TRACKING_URI."""
    log_model: bool = False
    """At the end of a finished run, log the final weights (model.safetensors) to the trackers as an artifact."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """What to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to train on."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and when to save."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Whether and from where to resume."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed settings (used under torchrun)."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Stop signals and the emergency checkpoint."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Hangs become restarts: the progress watchdog."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Transfer learning: new head and freeze/unfreeze phases."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """What a run writes besides metrics.jsonl and events.jsonl."""
    out_dir: Optional[str] = None
    """Local folder for the resolved config and metrics; defaults to runs/<job file name>."""

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.out_dir}/checkpoints"


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a job file, apply `a.b=value` overrides, and validate into a RunConfig."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read job file ({e.strerror}); check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the job file must be a mapping of keys (model:, data:, …)")
    for item in overrides:
        apply_override(raw, item, path)
    raw.setdefault("out_dir", f"runs/{path.stem}")
    cfg = build(RunConfig, raw, path)
    check_values(cfg, path)
    return cfg


def check_values(cfg: RunConfig, source: Path) -> None:
    """Values that are well-typed but cannot work, caught before anything runs."""
    positive = {"data.batch_size": cfg.data.batch_size, "train.accumulate": cfg.train.accumulate,
                "train.max_epochs": cfg.train.max_epochs, "dist.timeout_s": cfg.dist.timeout_s,
                "checkpoint.lease_ttl_s": cfg.checkpoint.lease_ttl_s, "train.log_every_steps": cfg.train.log_every_steps,
                "preemption.notice_poll_s": cfg.preemption.notice_poll_s}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: '{key}' must be positive, got {value}")
    if cfg.data.num_workers < 0 or cfg.checkpoint.keep_last < 0 or cfg.checkpoint.keep_best < 0:
        raise ConfigError(f"{source}: data.num_workers, checkpoint.keep_last and checkpoint.keep_best must be >= 0")
    if cfg.data.global_batch_size is not None and (cfg.data.global_batch_size <= 0 or cfg.train.accumulate != 1):
        raise ConfigError(f"{source}: 'data.global_batch_size' must be positive and replaces 'train.accumulate' "
                          "(runner derives the accumulation from the world size); leave train.accumulate at 1")
    if cfg.model.init_optimizer and not cfg.model.init_from:
        raise ConfigError(f"{source}: 'model.init_optimizer' continues the run saved in model.init_from, which is not "
                          "set; set model.init_from to that file, or drop model.init_optimizer")
    c = cfg.checkpoint
    if c.every == "auto" and c.every_minutes:
        raise ConfigError(f"{source}: 'checkpoint.every: auto' chooses the wall-time interval itself; drop "
                          "checkpoint.every_minutes (or checkpoint.every)")
    if c.local_dir and cfg.dist.strategy == "fsdp":
        raise ConfigError(f"{source}: 'checkpoint.local_dir' does not work with dist.strategy: fsdp yet (every rank "
                          "would need its own local shards); drop checkpoint.local_dir or use dist.strategy: ddp")
    if c.durable_every < 1 or (c.local_dir and "://" in c.local_dir):
        raise ConfigError(f"{source}: 'checkpoint.durable_every' must be at least 1 and 'checkpoint.local_dir' a "
                          "local folder (it is this machine's copy; checkpoint.dir is the durable one)")
    if not 0 < c.auto_min_minutes <= c.auto_max_minutes or c.mtbf_hours <= 0:
        raise ConfigError(f"{source}: 'checkpoint.auto_min_minutes' must be positive and at most "
                          "checkpoint.auto_max_minutes, and 'checkpoint.mtbf_hours' positive")
    if cfg.train.compile.mode and cfg.train.compile.options:
        raise ConfigError(f"{source}: 'train.compile' sets both mode and options; torch.compile takes one of them")
    if cfg.checkpoint.keep_best and not cfg.checkpoint.metric:
        raise ConfigError(f"{source}: 'checkpoint.keep_best' needs 'checkpoint.metric' (e.g. val_loss) to rank by")
    if cfg.out_dir and "://" in cfg.out_dir:
        raise ConfigError(f"{source}: 'out_dir' is {cfg.out_dir!r}; out_dir must be a local folder (config.yaml, "
                          "metrics.jsonl are written there); checkpoint.dir can be any fsspec URL")
    for key in cfg.resume.allow_changes:
        if not is_config_key(key):
            close = difflib.get_close_matches(key, schema(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; use dotted keys such as optim.lr or scheduler.args"
            raise ConfigError(f"{source}: 'resume.allow_changes' lists '{key}', which is not a config key{hint}")
    check_json_safe(to_dict(cfg), source)


JSON_NOTE = "checkpoints store the config as JSON"


def check_json_safe(value: Any, source: Path | str, key: str = "") -> None:
    """Refuse values a JSON round trip would change or reject (YAML dates, sets, bytes, non-string keys, nan)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{source}: '{key}' has the key {k!r} ({type(k).__name__}); quote it ('{k}'): "
                                  f"{JSON_NOTE}, whose keys are strings")
            check_json_safe(v, source, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json_safe(v, source, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}' is {value}; use a finite number: {JSON_NOTE}")
    elif value is not None and not isinstance(value, (str, int, float)):  # bool is an int
        raise ConfigError(f"{source}: '{key}' {not_json(value)}: {JSON_NOTE}")


def not_json(value: Any) -> str:
    """What is wrong with a value YAML produced but JSON cannot hold, and how to write it instead."""
    if isinstance(value, datetime.datetime):
        return f"is a date and time ({value}); quote it ('{value}')"
    if isinstance(value, datetime.date):
        return f"is a date ({value}); quote it ('{value}')"
    if isinstance(value, (set, frozenset)):
        return "is a set (!!set); write a list instead"
    if isinstance(value, bytes):
        return "is binary data (!!binary); give a string instead (e.g. a path to the file)"
    return f"is a {type(value).__name__}; use a string, number, true/false, list or mapping"


def apply_override(raw: dict, item: str, source: Path | str) -> None:
    """Set `a.b.c=value` in the raw dict; the value is parsed as YAML (so 3, 1e-3, true, [1,2] work)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key.sub=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override '{item}': '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          "quote it for the shell, e.g. 'key=[1, 2]'") from None


# Keys that older job files may still use, with what replaced them.
REPLACED_KEYS = {
    "resume.allow_config_change": "resume.allow_config_change was replaced by resume.allow_changes: list the keys "
                                  "that may change, e.g. [optim.lr]",
}


def build(cls, raw: Any, source: Path | str, prefix: str = ""):
    """Convert a raw dict into dataclass `cls`, checking keys and types; errors name the dotted key."""
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if f"{prefix}{key}" in REPLACED_KEYS:
            raise ConfigError(f"{source}: {REPLACED_KEYS[f'{prefix}{key}']}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {k: convert(hints[k], v, source, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**values)


def convert(hint, value, source, key: str):
    """Check/convert one value against its type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, source, key)
    if value is None:
        raise ConfigError(f"{source}: '{key}' must not be empty")
    if dataclasses.is_dataclass(hint):
        if "enabled" in {f.name for f in dataclasses.fields(hint)}:  # `key: true|false`, or a mapping: on
            value = {"enabled": value} if isinstance(value, bool) else (
                {"enabled": True, **value} if isinstance(value, dict) else value)
        return build(hint, value, source, key + ".")
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads an unquoted `off` as false
            value = "off"
        if str(value) not in [str(a) for a in args]:
            raise ConfigError(f"{source}: '{key}' is {value!r}; choose one of {', '.join(map(str, args))}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single name is a one-item list (train: head)
        return [convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return value
    return convert_scalar(hint, value, source, key)


def convert_scalar(hint, value, source, key):
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML 1.1 reads "1e-3" as a string; accept it since users write learning rates that way.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{source}: '{key}' must be {name}, got {value!r}")


@functools.cache
def schema(cls=RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config, sections included (`optim`, `optim.lr`, `optim.args`, …) → its type."""
    keys = {}
    for name, hint in typing.get_type_hints(cls).items():
        key, inner = f"{prefix}{name}", unwrap_optional(hint)
        keys[key] = inner
        if dataclasses.is_dataclass(inner):
            keys.update(schema(inner, key + "."))
    return keys


def is_config_key(key: str) -> bool:
    """A schema key, or a key inside a free-form mapping (model.args, checkpoint.storage_options, …)."""
    return key in schema() or any(key.startswith(k + ".") for k, hint in schema().items() if hint is dict)


def unwrap_optional(hint):
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


REDACTED = "<redacted>"
# Key names whose values are secrets: s3fs key/secret/token, adlfs account_key/sas_token/connection_string,
# passwords, … Matched as word endings (tokenizer, max_tokens, author and keyword stay visible; apikey does not).
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "passphrase", "credential", "credentials", "sas",
                "signature", "auth", "private")
# A last word that makes the value name, locate or describe something rather than be the secret (key_prefix,
# token_path, secret_name, auth_url, signature_version).
NON_SECRET_LAST_WORDS = ("url", "uri", "endpoint", "name", "prefix", "path", "file", "filename", "version")


def is_secret_key(name: str) -> bool:
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())  # camelCase too
    if not words or words[-1] in NON_SECRET_LAST_WORDS:
        return False
    return "connection_string" in "_".join(words) or any(w.endswith(SECRET_WORDS) for w in words)


def redact(obj: Any) -> Any:
    """A deep copy where the value of every secret-looking mapping key is replaced by "<redacted>".

    A mapping under such a key is searched rather than replaced, so its other keys stay visible; null stays null.
    """
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(str(k)) and not isinstance(v, dict) and v is not None else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def manifest_config(cfg: RunConfig) -> dict:
    """The resolved config as checkpoints store it: JSON-safe (checked at load) and with secrets redacted."""
    return redact(to_dict(cfg))


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config for printing and config.yaml, with secrets redacted."""
    return yaml.safe_dump(manifest_config(cfg), sort_keys=False)

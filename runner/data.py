"""Datasets by name, the sharded resumable sampler, and data loaders.

Data order is a pure function of (seed, epoch, world size). Randomness inside a sample (augmentation)
is a pure function of (seed, epoch, sample index), whatever the worker count or resume position: a dataset
names the generators it draws from in `draws_random` (see random_sources), and only those are seeded.
"""
from __future__ import annotations

import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, get_worker_info

from .config import DataConfig
from .errors import ConfigError

BUILTIN_DATASETS = ("digits", "csv", "imagefolder", "synthetic", "text")


@dataclass
class Datasets:
    train: Dataset
    val: Dataset | None
    num_classes: int | None  # None for regression
    input_shape: tuple[int, ...]  # of x in (x, y) samples, for the built-in models; () for other samples


def build_datasets(cfg: DataConfig) -> Datasets:
    args = dict(cfg.args)
    builders = {"digits": digits, "csv": csv_table, "imagefolder": imagefolder, "synthetic": synthetic,
                "text": text}
    if cfg.name in builders:
        builder = builders[cfg.name]
    elif cfg.name.startswith("torchvision."):
        builder = lambda **a: torchvision_dataset(cfg.name.removeprefix("torchvision."), **a)  # noqa: E731
    elif ":" in cfg.name:
        from .components import import_object
        builder = import_object(cfg.name, "data.name")
    else:
        from .components import unknown
        raise unknown("data.name", cfg.name, [*BUILTIN_DATASETS, "torchvision.<Dataset>"])
    try:
        result = builder(**args)
    except TypeError as e:
        raise ConfigError(f"data.args: {e}; check the options under data.args") from None
    if isinstance(result, Datasets):
        return result
    train, val = result if isinstance(result, tuple) else (result, None)
    return Datasets(train, val, infer_classes(train), input_shape(train[0]))


def input_shape(sample) -> tuple[int, ...]:
    """The shape of x in an (x, y) sample; () for any other sample (a dict for train.step), which only a user
    model reads."""
    x = sample[0] if isinstance(sample, (tuple, list)) and sample else None
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def infer_classes(ds) -> int | None:
    """Class count of a user dataset: its `classes` attribute, or None (then set model.num_classes)."""
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None else None


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/val index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


class Augmented(Dataset):
    """Random ±1 pixel shift and light noise; uses the global RNG, seeded per sample by SeededDataset."""

    draws_random = ("torch",)

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        dx, dy = torch.randint(-1, 2, (2,)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        return x + 0.05 * torch.randn_like(x), y


def digits(val_fraction: float = 0.2, split_seed: int = 0, classes: list[int] | None = None,
           augment: bool = False, flatten: bool = False) -> Datasets:
    """The 1,797 8×8 handwritten digits that ship inside scikit-learn (no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    if classes:
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
        y = torch.tensor([classes.index(int(v)) for v in y])  # labels become 0..len(classes)-1
    if flatten:
        x = x.reshape(len(x), -1)
    train_idx, val_idx = split(len(x), val_fraction, split_seed)
    train: Dataset = TensorDataset(x[train_idx], y[train_idx])
    if augment:
        train = Augmented(train)
    num_classes = len(classes) if classes else 10
    return Datasets(train, TensorDataset(x[val_idx], y[val_idx]), num_classes, tuple(x.shape[1:]))


def synthetic(shape: list[int] = (1, 8, 8), num_classes: int = 10, size: int = 512, val_size: int = 128,
              seed: int = 0) -> Datasets:
    """Random inputs with a learnable label (argmax of a fixed random projection)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size + val_size, *shape, generator=g)
    proj = torch.randn(math.prod(shape), num_classes, generator=g)
    y = (x.reshape(len(x), -1) @ proj).argmax(1)
    return Datasets(TensorDataset(x[:size], y[:size]), TensorDataset(x[size:], y[size:]), num_classes,
                    tuple(shape))


def csv_table(path: str, target: str, features: list[str] | None = None, task: str = "classification",
              val_fraction: float = 0.2, split_seed: int = 0) -> Datasets:
    """A CSV file with a header row: feature columns → float tensor, target column → label or value."""
    import csv as csvlib

    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            rows = list(csvlib.DictReader(f))
    except (OSError, FileNotFoundError) as e:
        raise ConfigError(f"data.args.path: cannot read CSV '{path}' ({e})") from None
    if not rows or target not in rows[0]:
        raise ConfigError(f"data.args.target: column '{target}' not in {path}; columns: {', '.join(rows[0]) if rows else 'none'}")
    features = features or [c for c in rows[0] if c != target]
    try:
        x = torch.tensor([[float(r[c]) for c in features] for r in rows], dtype=torch.float32)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.args.features: {path} has a missing or non-numeric feature value ({e})") from None
    if task == "classification":
        labels = sorted({r[target] for r in rows})
        y = torch.tensor([labels.index(r[target]) for r in rows])
        num_classes = len(labels)
    else:
        y = torch.tensor([[float(r[target])] for r in rows])
        num_classes = None
    train_idx, val_idx = split(len(x), val_fraction, split_seed)
    return Datasets(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]),
                    num_classes, (len(features),))


class TokenWindows(Dataset):
    """Non-overlapping windows of a token sequence: sample i is (tokens[i·c : i·c+c], the same shifted by one)."""

    def __init__(self, tokens: torch.Tensor, context: int):
        self.tokens, self.context = tokens, context

    def __len__(self):
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i):
        start = i * self.context
        chunk = self.tokens[start:start + self.context + 1].long()
        return chunk[:-1], chunk[1:]


def text(path: str, context: int = 256, val_fraction: float = 0.1, glob: str = "**/*.py",
         max_bytes: int | None = None, storage_options: dict | None = None) -> Datasets:
    """Byte-level language modelling on any text: a file or fsspec URL, a directory (its files matching `glob`,
    in sorted order), or `stdlib` (this Python's own standard library source). Tokens are bytes (vocabulary
    256); the split is by position — the last `val_fraction` of the bytes validate — so no window straddles it."""
    import sysconfig

    import fsspec

    if context < 1 or not 0 <= val_fraction < 1:
        raise ConfigError("data.args: text needs context ≥ 1 and 0 ≤ val_fraction < 1")
    where = sysconfig.get_paths()["stdlib"] if path == "stdlib" else path
    try:
        fs, root = fsspec.core.url_to_fs(where, **(storage_options or {}))
        files = sorted(fs.glob(f"{root.rstrip('/')}/{glob}")) if fs.isdir(root) else [root]
        raw = bytearray()
        for name in files:
            if max_bytes is not None and len(raw) >= max_bytes:
                break
            raw += fs.cat_file(name)
    except OSError as e:
        raise ConfigError(f"data.args.path: cannot read text from '{where}' ({type(e).__name__}: {e})") from None
    tokens = torch.frombuffer(raw[:max_bytes], dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    cut = int(len(tokens) * (1 - val_fraction))
    train, val = TokenWindows(tokens[:cut], context), TokenWindows(tokens[cut:], context)
    if len(train) == 0:
        raise ConfigError(f"data.args.path: '{where}' has {len(tokens)} bytes, fewer than one training window of "
                          f"data.args.context={context}; use more text or a shorter context")
    return Datasets(train, val if len(val) else None, 256, (context,))


def imagefolder(root: str, val_root: str | None = None, size: int = 224, augment: bool = False) -> Datasets:
    """torchvision ImageFolder: one sub-folder per class; `val_root` the same layout for validation."""
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise ConfigError(f"data.args.root: '{root}' is not a folder of class sub-folders")
    norm = [transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    train_tf = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if augment else \
        [transforms.Resize(size), transforms.CenterCrop(size)]
    val_tf = [transforms.Resize(size), transforms.CenterCrop(size)]
    train = datasets.ImageFolder(root, transforms.Compose(train_tf + norm))
    train.draws_random = ("torch",) if augment else ()  # torchvision's v1 random transforms draw from torch
    val = datasets.ImageFolder(val_root, transforms.Compose(val_tf + norm)) if val_root else None
    return Datasets(train, val, len(train.classes), (3, size, size))


def torchvision_dataset(name: str, root: str = "data", download: bool = False, size: int | None = None):
    """Any torchvision dataset class with the (root, train, download, transform) signature."""
    from torchvision import datasets, transforms

    cls = getattr(datasets, name, None)
    if cls is None:
        raise ConfigError(f"data.name: torchvision has no dataset '{name}'")
    tf = transforms.Compose(([transforms.Resize(size)] if size else []) + [transforms.ToTensor()])
    try:
        train = cls(root, train=True, download=download, transform=tf)
        val = cls(root, train=False, download=download, transform=tf)
    except RuntimeError as e:  # torchvision says "Dataset not found. You can use download=True"
        raise ConfigError(f"data: {name} not found under '{root}' ({e}); set data.args.download=true") from None
    train.draws_random = ()  # Resize and ToTensor draw nothing
    return Datasets(train, val, infer_classes(train), tuple(train[0][0].shape))


@dataclass(frozen=True)
class CpuRng:
    seed: Callable[[int], Any]
    get_state: Callable[[], Any]
    set_state: Callable[[Any], Any]


# torch.random.default_generator, not torch.manual_seed: samples are made on the CPU, and torch.manual_seed
# would also reseed the CUDA generator (which SeededDataset does not restore) and format a stack trace per
# call (~1 ms).
CPU_RNGS = {
    "python": CpuRng(random.seed, random.getstate, random.setstate),
    "numpy": CpuRng(lambda seed: np.random.seed(seed % 2**32), np.random.get_state, np.random.set_state),
    "torch": CpuRng(torch.random.default_generator.manual_seed, torch.get_rng_state, torch.set_rng_state),
}
RNG_SOURCES = tuple(CPU_RNGS)


def random_sources(ds: Dataset) -> tuple[str, ...]:
    """The global generators a sample of `ds` draws from: its `draws_random` attribute, a subset of
    RNG_SOURCES. Undeclared: none for a plain TensorDataset (indexing only), all three for any other, so a
    user dataset is reproducible by default and only pays for seeding what it does not declare.

    Seeding costs per sample (2 shared CPU cores): python ~6 µs, numpy ~2 µs, torch ~1.4 µs; saving and
    restoring them once per batch: numpy ~50 µs, python ~10 µs, torch ~1 µs.
    """
    declared = getattr(ds, "draws_random", None)
    if declared is None:
        return () if type(ds) is TensorDataset else RNG_SOURCES
    if isinstance(declared, str) or not set(declared) <= set(RNG_SOURCES):
        raise ConfigError(f"data: {type(ds).__name__}.draws_random is {declared!r}; set it to a tuple of "
                          f"{', '.join(RNG_SOURCES)} (the generators its samples draw from), or () for none")
    return tuple(name for name in RNG_SOURCES if name in declared)


class SeededDataset(Dataset):
    """Seeds the generators `base` draws from (random_sources) from (seed, epoch, index) around each sample.

    Augmentation then does not depend on which worker loads a sample or where a resumed epoch starts.
    In the main process (num_workers=0) the training RNG is restored afterwards, so it is untouched.
    A dataset that draws nothing is passed through: no seeding, no saving or restoring.
    """

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0
        self.sources = random_sources(base)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The DataLoader fetches a whole batch here: the main process saves and restores its RNGs once per
        batch, not per sample."""
        if not self.sources:
            getitems = getattr(self.base, "__getitems__", None)
            return getitems(indices) if getitems else [self.base[i] for i in indices]
        if get_worker_info() is not None:
            return [self._sample(i) for i in indices]
        saved = [(CPU_RNGS[name], CPU_RNGS[name].get_state()) for name in self.sources]
        try:
            return [self._sample(i) for i in indices]
        finally:
            for rng, state in saved:
                rng.set_state(state)

    def _sample(self, index: int):
        seed_cpu(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF, self.sources)  # int tuples hash stably
        return self.base[index]


def seed_all(seed: int) -> None:
    """Every generator, CUDA's included."""
    seed_cpu(seed)
    torch.manual_seed(seed)


def seed_cpu(seed: int, sources: tuple[str, ...] = RNG_SOURCES) -> None:
    """Seed the named CPU generators (all by default); CUDA's is left alone."""
    for name in sources:
        CPU_RNGS[name].seed(seed)


class ShardedSampler(Sampler[int]):
    """The data order, defined here and nowhere else.

    - order = f(seed, epoch): a permutation of the dataset (identity without shuffle). It does not depend on
      the world size, so a run resumed on another number of processes goes on through the same order.
    - a rank's share = f(order, start, rank, world size): `start` is the epoch's global position (samples
      consumed by all ranks together). The rest of the order is dealt round-robin: rank r takes positions
      start + r, start + r + W, … For training it is padded to a multiple of W by repeating the order from
      its beginning (cyclically), so every rank takes the same number of steps; evaluation does not pad.
    After every rank took k samples the consumed samples are exactly order[:start + k·W], a prefix: the
    position of a checkpoint is one number, valid for any world size.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, shuffle: bool, pad: bool):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: the epoch's global position (mid-epoch resume skips what was consumed, without loading it)."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def shard(self) -> list[int]:
        order = self.order()
        return [order[i % self.size] for i in self.positions()]

    def positions(self) -> range:
        """This rank's positions in the order (past its end: padding)."""
        start = min(self.start, self.size)
        end = start + math.ceil((self.size - start) / self.world_size) * self.world_size if self.pad else self.size
        return range(start + self.rank, end, self.world_size)

    def __iter__(self):
        return iter(self.shard())

    def __len__(self):
        return len(self.positions())  # without drawing the order


def to_device(batch, device: torch.device, non_blocking: bool = False):
    """A batch (tensors in any nesting of tuples, lists and dicts) on `device`; other leaves stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple, as default_collate keeps it
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def steps_per_epoch(size: int, world_size: int, batch_size: int, accumulate: int) -> int:
    """Optimizer steps in a whole epoch, as the loop takes them: a rank's padded share (ShardedSampler), loaded in
    batches of batch_size (the last may be short), every `accumulate` batches a step (the last group may be short)."""
    share = len(ShardedSampler(size, 0, world_size, seed=0, shuffle=False, pad=True))
    return math.ceil(math.ceil(share / batch_size) / accumulate)


@dataclass(frozen=True)
class MicroBatch:
    batch: Any
    samples: int      # this rank's samples in it, from the sampler (never from the batch's structure)
    group_size: int   # micro-batches in its accumulation group: the loss is divided by it
    sync: bool        # the group's last: gradients are reduced over ranks, then the optimizer steps
    first: bool       # the first this launch takes in the epoch
    last: bool        # the epoch's last on this rank


def micro_batches(loader: DataLoader, accumulate: int, batch_size: int) -> Iterator[MicroBatch]:
    """The epoch's micro-batches left on this rank, in groups of `accumulate` counted from where this launch entered
    the epoch (a checkpoint is always on a step boundary); the epoch's last group may be shorter. As many on every
    rank (the training sampler pads), so the ranks' groups line up."""
    batches, left = len(loader), len(loader.sampler)
    for index, batch in enumerate(loader):
        group_start = index - index % accumulate
        group_size = min(accumulate, batches - group_start)
        yield MicroBatch(batch, min(batch_size, left - index * batch_size), group_size,
                         sync=index + 1 - group_start == group_size, first=index == 0, last=index + 1 == batches)


def make_loader(ds: Dataset, sampler: ShardedSampler, batch_size: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """`pin_memory` for a CUDA device: page-locked batches let the loop's non_blocking copies overlap compute."""
    # Its own generator: every new iterator draws a base seed from it, and drawing from the global RNG would
    # shift dropout after a mid-epoch resume (one more iterator than the uninterrupted run). SeededDataset
    # reseeds each sample, so the workers' base seeds do not affect the data.
    return ShieldedLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          worker_init_fn=ignore_stop_signals if num_workers else None, generator=torch.Generator(),
                          pin_memory=pin_memory)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR1/2: preemption.extra_signal


class ShieldedLoader(DataLoader):
    """Forks its workers with the stop signals blocked, so that no worker can die of a group-wide SIGTERM
    before ignore_stop_signals runs (in between, torch's worker handler would kill it, and the main process
    would fail with "DataLoader worker exited unexpectedly" instead of saving)."""

    def __iter__(self):
        if not self.num_workers:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # this thread only; forks inherit it
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one that arrived meanwhile is delivered now


def ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave shutdown to the main process, so a SIGTERM to the group cannot kill them mid-save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # inherited from the main process (its preemption watchdog); not ours to wake
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

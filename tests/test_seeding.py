"""Per-sample seeding: augmentation randomness is a function of (seed, epoch, sample index) only, and a
dataset pays only for the generators it declares in `draws_random`."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from runner.config import DataConfig
from runner.data import Augmented, SeededDataset, build_datasets, random_sources
from runner.errors import ConfigError


class DrawsFromAll(Dataset):
    """A user dataset that declares nothing and draws from python, numpy and torch."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([float(i), random.random(), np.random.rand(), torch.rand(()).item()]), i


class DeclaresNone(Dataset):
    """Says it draws nothing, yet draws from torch: runner takes it at its word and does not reseed."""

    draws_random = ()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(()), i


def samples_by_index(ds: SeededDataset, order: list[int], num_workers: int) -> dict[int, torch.Tensor]:
    loader = DataLoader(ds, batch_size=5, sampler=order, num_workers=num_workers)
    return {int(i): x for xs, ys in loader for x, i in zip(xs, ys)}


IMAGES = TensorDataset(torch.randn(24, 1, 8, 8), torch.arange(24))  # label = index, to match samples up


@pytest.mark.parametrize("base", [Augmented(IMAGES), DrawsFromAll()],
                         ids=["augmented-torch-only", "undeclared-user-dataset"])
def test_a_samples_randomness_depends_only_on_seed_epoch_and_index(base):
    """Whatever the worker count, the order samples are fetched in, or where a resumed epoch starts."""
    ds = SeededDataset(base, seed=7)
    ds.epoch = 2
    in_order = samples_by_index(ds, list(range(24)), num_workers=0)
    shuffled = torch.randperm(24, generator=torch.Generator().manual_seed(1)).tolist()
    by_workers = samples_by_index(ds, shuffled, num_workers=2)
    resumed = samples_by_index(ds, shuffled[13:], num_workers=0)  # a mid-epoch resume skips the first 13
    assert all(torch.equal(by_workers[i], in_order[i]) for i in range(24))
    assert all(torch.equal(resumed[i], in_order[i]) for i in shuffled[13:])
    assert not torch.equal(in_order[0], in_order[1])  # still random across samples
    ds.epoch = 3
    assert not torch.equal(samples_by_index(ds, [0], num_workers=0)[0], in_order[0])  # and across epochs


def test_a_dataset_declaring_no_randomness_is_not_reseeded():
    """The fast path: no seeding, and the training RNG is neither saved nor restored around it."""
    ds = SeededDataset(DeclaresNone(), seed=7)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    assert ds[0][0] == expected[0] and ds[0][0] == expected[1]  # it drew from the global stream, unseeded


def test_runners_datasets_declare_what_they_draw():
    """Plain tensors draw nothing (no seeding cost); augmentation draws from torch only."""
    assert random_sources(build_datasets(DataConfig(name="synthetic")).train) == ()
    assert random_sources(TensorDataset(torch.zeros(3, 2))) == ()
    assert random_sources(build_datasets(DataConfig(name="digits", args={"augment": True})).train) == ("torch",)
    assert random_sources(DrawsFromAll()) == ("python", "numpy", "torch")


def test_a_misspelled_draws_random_is_a_config_error():
    class Typo(DrawsFromAll):
        draws_random = "torch"  # a string, not a tuple

    with pytest.raises(ConfigError, match=r"Typo\.draws_random is 'torch'"):
        SeededDataset(Typo(), seed=0)

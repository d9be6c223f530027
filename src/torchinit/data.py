"""Data for the training loop (`setup_dataloaders`, `to_device`), as Lightning Fabric does it: a
`DistributedSampler` per process when several run (shuffling kept, seeded from `PL_GLOBAL_SEED`), the sampler's
epoch advanced at every new pass, batches moved to the device, workers seeded when `seed_everything(workers=True)`."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from torchinit.core.compat import tree_map
from torchinit.core.errors import ArgumentTypeError, ConfigurationError, UnsupportedError
from torchinit.seeding import worker_init

__all__ = ["FabricDataLoader", "SamplerDistributor", "move_to_device", "setup_dataloader", "check_dataloaders"]


def move_to_device(data: Any, device: torch.device) -> Any:
    """Every tensor in `data` (and any object with a `.to(device)`, e.g. a tokenizer's batch) on `device`; non-blocking
    where the device copies asynchronously (CUDA)."""
    non_blocking = device.type not in ("cpu", "mps")

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=non_blocking)
        if isinstance(x, nn.Module) or isinstance(x, type) or not callable(getattr(x, "to", None)):
            return x
        return x.to(device)
    return tree_map(move, data)


class _Indexed(Dataset):
    """A sampler's indices as a dataset, for `DistributedSampler` to split."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.indices: list | None = None

    def __getitem__(self, i: int) -> Any:
        if self.indices is None:
            self.indices = list(self.sampler)
        return self.indices[i]

    def __len__(self) -> int:
        return len(self.sampler)


class SamplerDistributor(DistributedSampler):
    """A custom sampler split over the processes: each takes its share of the indices the sampler yields."""

    def __init__(self, sampler: Sampler, **kwargs: Any):
        super().__init__(_Indexed(sampler), **kwargs)

    def __iter__(self) -> Iterator:
        self.dataset.indices = None  # the sampler's order of this pass (it may shuffle)
        return (self.dataset[i] for i in super().__iter__())


def distributed_sampler(loader: DataLoader, num_replicas: int, rank: int) -> DistributedSampler:
    kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=isinstance(loader.sampler, RandomSampler),
                  seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
    if isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        return DistributedSampler(loader.dataset, **kwargs)
    return SamplerDistributor(loader.sampler, **kwargs)


def with_sampler(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """The same data loader with `sampler` (its batch sampler, if it has one of torch's, rebuilt around it)."""
    if type(loader) is not DataLoader:
        raise UnsupportedError(f"setup_dataloaders rebuilds torch DataLoaders with a DistributedSampler; "
                               f"{type(loader).__name__} is a subclass it cannot rebuild. Pass "
                               "use_distributed_sampler=False and give it a DistributedSampler yourself.")
    options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                   multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                   persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_size is None:  # a batch sampler of the user's
        batches = loader.batch_sampler
        if type(batches) is not BatchSampler:
            raise UnsupportedError(f"setup_dataloaders cannot split the custom batch sampler "
                                   f"{type(batches).__name__} over the processes. Pass use_distributed_sampler=False "
                                   "and give each process its own batches.")
        return DataLoader(loader.dataset, batch_sampler=BatchSampler(sampler, batches.batch_size, batches.drop_last),
                          **options)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      **options)


def check_dataloaders(loaders: tuple) -> None:
    if not loaders:
        raise ConfigurationError("`setup_dataloaders` requires at least one dataloader as input.")
    if any(isinstance(dl, FabricDataLoader) for dl in loaders):
        raise ConfigurationError("A dataloader should be passed only once to the `setup_dataloaders` method.")
    if any(not isinstance(dl, DataLoader) for dl in loaders):
        raise ArgumentTypeError("Only PyTorch DataLoader are currently supported in `setup_dataloaders`.")


def setup_dataloader(loader: DataLoader, sampler_kwargs: dict[str, int] | None, rank: int,
                     device: torch.device | None, use_distributed_sampler: bool = True) -> FabricDataLoader:
    """`loader` for this process: its share of the data (`sampler_kwargs`: the strategy's split, None for one
    process), workers seeded per rank if `PL_SEED_WORKERS` says so, batches moved to `device` (None: left)."""
    if (use_distributed_sampler and sampler_kwargs is not None and not isinstance(loader.sampler, DistributedSampler)
            and not isinstance(loader.dataset, IterableDataset)):
        loader = with_sampler(loader, distributed_sampler(loader, **sampler_kwargs))
    if int(os.environ.get("PL_SEED_WORKERS", 0)) and loader.worker_init_fn is None:
        loader.worker_init_fn = functools.partial(worker_init, rank=rank)
    return FabricDataLoader(loader, device)


class FabricDataLoader:
    """What `setup_dataloaders` returns: iterating it sets the sampler's epoch (a new shuffle every pass, the same on
    every process) and moves each batch to the device; everything else is the data loader's."""

    def __init__(self, dataloader: DataLoader, device: torch.device | None = None):
        self._dataloader = dataloader
        self._device = device
        self._num_iter_calls = 0

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def dataloader(self) -> DataLoader:
        return self._dataloader

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[Any]:
        loader = self._dataloader
        for sampler in {id(s): s for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None))}.values():
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(self._num_iter_calls)
        self._num_iter_calls += 1
        for batch in loader:
            yield batch if self._device is None else move_to_device(batch, self._device)

    def __getattr__(self, name: str) -> Any:
        if name == "_dataloader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._dataloader, name)

"""Loaders whose batches carry their samples' indices into a teacher cache (what
:meth:`pykd.TeacherCache.attach` makes): the cached dataset or a ``Subset`` of it, under any
sampler or batch sampler."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset

from pykd._batches import IndexedBatch, loader_like, rebuildable
from pykd._cache_errors import StaleCacheError


class IndexedItems(Dataset):
    """Items ``(i, dataset[p])``: position ``p`` of ``dataset`` is sample ``i = samples[p]`` of
    the cache (``i = p`` without ``samples``)."""

    def __init__(self, dataset: Dataset, samples: list[int] | None) -> None:
        self.dataset, self.samples = dataset, samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, p: int) -> tuple[int, Any]:
        return (p if self.samples is None else self.samples[p]), self.dataset[p]


class IndexedCollate:
    """The loader's own collate for the items, their indices alongside (picklable for workers)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> IndexedBatch:
        return IndexedBatch(
            torch.tensor([i for i, _ in items], dtype=torch.long),
            self.collate([item for _, item in items]),
        )


def cache_samples(
    dataset: Dataset, is_cached: Callable[[Dataset], bool], path: Any
) -> list[int] | None:
    """The cache's sample at each position of ``dataset``: None where ``dataset`` is the cached
    data itself, its positions through the ``Subset`` layers above the cached data otherwise.

    The dataset is tried first (the usual case costs one check), then what each ``Subset``
    wraps, since a cache may have been built on a ``Subset`` (a split) itself.

    Raises:
        StaleCacheError: neither ``dataset`` nor any dataset under its ``Subset`` layers has the
            cached inputs.
    """
    layers: list[Subset] = []
    current = dataset
    while not is_cached(current):
        if not isinstance(current, Subset):
            under = " nor any dataset its Subset wraps" if layers else ""
            raise StaleCacheError(
                f"{path} was built on other data: the dataset's inputs (or their order) differ "
                f"from those the teacher saw{under}; attach the cached dataset or a "
                "torch.utils.data.Subset of it"
            )
        layers.append(current)
        current = current.dataset
    if not layers:
        return None
    # Position p of the outermost layer is position indices[p] of the one below, and so on down.
    samples = range(len(layers[0]))
    for layer in layers:
        size = len(layer.dataset)
        samples = [_position(layer.indices[p], size) for p in samples]
    return list(samples)


def _position(index: Any, size: int) -> int:
    """A Subset's index as the position it reads (negative ones count from the end)."""
    i = operator.index(index.item() if hasattr(index, "item") else index)
    if not -size <= i < size:
        raise IndexError(f"a Subset's index {i} is outside the {size} items of its dataset")
    return i % size


def check_loader(loader: Any) -> None:
    """Raise ``TypeError`` unless ``loader`` is a DataLoader that batches a map-style dataset."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            f"attach needs a DataLoader over a map-style dataset (the cached dataset "
            f"or a torch.utils.data.Subset of it), got {type(loader).__name__}"
        )
    if loader.batch_size is None and loader.batch_sampler is None:
        raise TypeError(
            "attach needs a DataLoader that batches its samples (a batch_size or a "
            "batch_sampler), not one with batch_size=None"
        )


def indexed_loader(loader: DataLoader, samples: list[int] | None) -> DataLoader:
    """A loader like ``loader`` (see :func:`check_loader`) whose batches are
    :class:`IndexedBatch` of the cache's samples, with its sampler or batch sampler (a sequential
    or shuffling one stays re-creatable, so that the training loop still orders and shards it)."""
    items, collate = IndexedItems(loader.dataset, samples), IndexedCollate(loader.collate_fn)
    if rebuildable(loader):
        return loader_like(
            loader, items, collate, shuffle=isinstance(loader.sampler, RandomSampler)
        )
    # Its own sampler over the same positions: the items map them to the cache's samples.
    if loader.batch_size is not None:
        return loader_like(
            loader, items, collate, sampler=loader.sampler, generator=loader.generator
        )
    return loader_like(
        loader, items, collate, batch_sampler=loader.batch_sampler, generator=loader.generator
    )


def sample_list(index: int | Sequence[int] | torch.Tensor) -> list[int]:
    """Sample indices as a list of ints (one int, a sequence or a 1-D integer tensor)."""
    if isinstance(index, torch.Tensor):
        if index.dim() > 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(
                f"sample indices must be an int or a 1-D integer tensor, got "
                f"{index.dim()}-D {index.dtype}"
            )
        return index.reshape(-1).tolist()
    if isinstance(index, Sequence):
        return [operator.index(i) for i in index]
    return [operator.index(index)]

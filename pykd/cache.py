"""Teacher-output cache: run a teacher over a dataset once, then train from its stored outputs.

A cache is a folder of plain data, never code::

    manifest.json        the key, the layout and each finished shard's sizes and sha256 sums
    shard-00000.values   [rows, width] float16 or float32, raw little-endian
    shard-00000.indices  [rows, k] int32 vocabulary indices (top-k caches only)
    shard-00000.offsets  [samples + 1] int64: where each sample's rows start in the shard

A row is one sample (sequence classification) or one non-padding token (attention mask) of it.
Shard ``j`` holds samples ``[j * shard_size, (j + 1) * shard_size)`` in dataset order. Every file
is written atomically and the manifest is rewritten (atomically) after each shard, so a killed
build resumes at the first shard the manifest lacks, after checking the ones it lists.

The key is the sha256 of the teacher's weights (its ``state_dict``), the sha256 of the dataset's
model inputs (labels and sample weights excluded), a fingerprint of the collate function that made
the teacher's batches (:func:`fingerprint_collate`, or a key the caller names) and the settings
(``top_k``, ``dtype``): a cache built for other weights, data, collate function or settings is
refused with :class:`StaleCacheError`, a shard whose bytes no longer match its checksum (or a
manifest without the fields it needs) with :class:`CorruptCacheError`.

This module holds the public class; its parts live in modules below it: the key's fingerprints in
:mod:`pykd._fingerprints`, the files (manifest, shards, checksums, memory-mapped reading) in
:mod:`pykd._cache_files`, the teacher loop that writes them in :mod:`pykd._cache_build` and the
errors in :mod:`pykd._cache_errors`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pykd._batches import IndexedBatch, loader_like, rebuildable, token_positions
from pykd._cache_build import build_shards
from pykd._cache_errors import CacheError, CorruptCacheError, StaleCacheError
from pykd._cache_files import _DTYPES, _FORMAT, _MANIFEST, ShardStore, _read_manifest
from pykd._fingerprints import fingerprint_collate, fingerprint_data, fingerprint_model
from pykd.checkpoint import PathLike

# The public names: the errors and fingerprints are defined in the modules below and offered
# here, where pykd, the Distiller and users have always imported them from.
__all__ = [
    "CacheError",
    "CorruptCacheError",
    "StaleCacheError",
    "TeacherCache",
    "TopKRows",
    "fingerprint_collate",
    "fingerprint_data",
    "fingerprint_model",
]


@dataclasses.dataclass
class TopKRows:
    """A teacher given by its top-k logits per row, no probability mass elsewhere (the input of
    :func:`pykd.functional.distillation_loss_topk`)."""

    index: torch.Tensor  # (*, k) int64 vocabulary indices
    logits: torch.Tensor  # (*, k)

    def argmax(self) -> torch.Tensor:
        return self.index.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)


def _collate_key(collate_fn: Callable[[list[Any]], Any] | None, collate_key: str | None) -> str:
    """The cache key's entry for the collate function: its fingerprint, or the caller's name."""
    if collate_key is None:
        return fingerprint_collate(collate_fn)
    if not isinstance(collate_key, str) or not collate_key.strip():
        raise ValueError(f"collate_key must be a non-empty string, got {collate_key!r}")
    return f"collate_key={collate_key}"


class _Indexed(Dataset):
    """Items ``(i, dataset[i])``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class _IndexedCollate:
    """The loader's own collate for the items, their indices alongside (picklable for workers)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> IndexedBatch:
        return IndexedBatch(torch.tensor([i for i, _ in items], dtype=torch.long),
                            self.collate([item for _, item in items]))


class TeacherCache:
    """A teacher's outputs over a dataset, stored once and reused across epochs and runs.

    Build it with :meth:`build` (which also resumes an interrupted build, or returns the finished
    cache untouched) or open a finished one with :meth:`open`, then give it to
    :class:`pykd.Distiller` as the teacher and train on :meth:`attach`-ed loaders: the teacher
    is not needed at all. A full-logit cache (``top_k=None``, for small label sets) feeds the
    cached logits to the loss as the teacher's; a top-k cache feeds the teacher's ``k`` largest
    logits per row, whose tempered softmax is the teacher distribution (no mass elsewhere, see
    :func:`pykd.functional.distillation_loss_topk`).

    Token-level rows are the positions of the attention mask (all positions without one), and a
    batch at training time must mask each sample exactly as when the cache was built; positions
    outside the mask get zeros, so their labels must be ``ignore_index``. The data must be the
    same, item for item (no random augmentation); :meth:`attach` checks it.

    Attributes:
        path: the cache folder.
        top_k: ``k`` of a top-k cache, None for full logits.
        dtype: ``"float16"`` or ``"float32"``, the stored logits' type.
        num_samples, num_shards, shard_size: the dataset's size and how it is split.
        token_level: whether rows are tokens (None until the first shard is built).
        vocab_size: the teacher's number of classes (None until the first shard is built).
    """

    def __init__(self, path: PathLike, manifest: dict[str, Any]) -> None:
        """Use :meth:`build` or :meth:`open`."""
        self.path = Path(path)
        self._manifest = manifest
        # Its shard files, with the same manifest (which a build fills in); the store maps them
        # as lookups need them, and pickles without its locks and mappings.
        self._store = ShardStore(self.path, manifest)

    # ------------------------------------------------------------------------- properties

    @property
    def top_k(self) -> int | None:
        return self._manifest["key"]["top_k"]

    @property
    def dtype(self) -> str:
        return self._manifest["key"]["dtype"]

    @property
    def num_samples(self) -> int:
        return self._manifest["num_samples"]

    @property
    def shard_size(self) -> int:
        return self._manifest["shard_size"]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def token_level(self) -> bool | None:
        return self._manifest["token_level"]

    @property
    def vocab_size(self) -> int | None:
        return self._manifest["vocab_size"]

    @property
    def complete(self) -> bool:
        return len(self._manifest["shards"]) == self.num_shards

    # ---------------------------------------------------------------------- build and open

    @classmethod
    def build(
        cls,
        path: PathLike,
        teacher: nn.Module,
        dataset: Dataset,
        *,
        top_k: int | None = None,
        dtype: str = "float16",
        batch_size: int = 32,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shard_size: int = 4096,
        progress: bool = False,
        on_shard: Callable[[int], None] | None = None,
        collate_key: str | None = None,
    ) -> TeacherCache:
        """Run ``teacher`` over ``dataset`` and store its outputs under ``path`` (a folder).

        A finished cache with the same key is returned as it is; an unfinished one is checked
        shard by shard and completed from the first missing shard; one with another key raises
        :class:`StaleCacheError`.

        Args:
            path: the cache folder (created if missing).
            teacher: the teacher; run where its parameters are, in eval mode under
                ``torch.no_grad()``, then put back in its mode.
            dataset: a map-style dataset whose items collate into Distiller batches.
            top_k: keep the ``k`` largest logits of each row (values and int32 indices); None
                keeps all logits (for small label sets).
            dtype: ``"float16"`` (default) or ``"float32"`` for the stored logits.
            batch_size, collate_fn: how the teacher's batches are formed, as in a DataLoader.
                The key holds ``collate_fn``'s fingerprint (:func:`fingerprint_collate`).
            shard_size: samples per shard file (ignored when resuming: the cache keeps its own).
            progress: show a progress bar over the shards.
            on_shard: called with each shard's number once it is stored.
            collate_key: the key's name for ``collate_fn`` instead of its fingerprint, for a
                collate function that cannot be fingerprinted (it holds a lock, an open file,
                a tokenizer that cannot be pickled); change it whenever the function changes,
                and give it to :meth:`attach` too.

        Returns:
            The finished cache.

        Raises:
            CacheError: ``collate_fn`` cannot be fingerprinted and no ``collate_key`` is given.
        """
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if shard_size < 1 or batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        key = {"teacher": fingerprint_model(teacher), "data": fingerprint_data(dataset),
               "collate": _collate_key(collate_fn, collate_key), "top_k": top_k, "dtype": dtype}
        path = Path(path)
        if (path / _MANIFEST).exists():
            cache = cls(path, _read_manifest(path))
            cache._check_key(key)
            cache.verify()  # the shards kept from an interrupted build
        else:
            cache = cls(path, {"format": _FORMAT, "key": key, "num_samples": len(dataset),
                               "shard_size": shard_size, "token_level": None,
                               "vocab_size": None, "shards": []})
        if cache.complete:
            return cache
        build_shards(cache._store, range(len(cache._manifest["shards"]), cache.num_shards),
                     teacher, dataset, batch_size=batch_size, collate_fn=collate_fn,
                     rows=cache._rows, progress=progress, on_shard=on_shard)
        return cache

    @classmethod
    def open(cls, path: PathLike, *, teacher: nn.Module | None = None,
             dataset: Dataset | None = None) -> TeacherCache:
        """Open a cache folder; with ``teacher`` or ``dataset``, check it was built for them.

        Shards are checked against their checksums as they are first read (:meth:`verify`
        checks them all at once).

        Raises:
            StaleCacheError: ``teacher`` or ``dataset`` differs from what the cache was built for.
            CorruptCacheError: the manifest cannot be read.
        """
        cache = cls(path, _read_manifest(Path(path)))
        if teacher is not None and fingerprint_model(teacher) != cache._manifest["key"]["teacher"]:
            raise StaleCacheError(f"{cache.path} was built for a teacher with other weights")
        if dataset is not None:
            cache.check_data(dataset)
        return cache

    def _check_key(self, key: dict[str, Any]) -> None:
        """Raise :class:`StaleCacheError` unless the cache's key agrees with ``key``'s entries."""
        stored = self._manifest["key"]
        what = {"teacher": "the teacher's weights", "data": "the data's inputs",
                "collate": "collate_fn", "top_k": "top_k", "dtype": "dtype"}
        # A cache from before collate functions were keyed has none: it is stale.
        diff = [f"{what[name]} ({stored.get(name)!r} in the cache, {key[name]!r} now)"
                if name in ("collate", "top_k", "dtype") else what[name]
                for name in key if stored.get(name) != key[name]]
        if diff:
            raise StaleCacheError(
                f"{self.path} was built for other settings: {', '.join(diff)} differ; use those "
                "it was built with, or build to another path (or delete the folder)"
            )

    def check_data(self, dataset: Dataset) -> None:
        """Raise :class:`StaleCacheError` unless ``dataset`` has the cache's inputs."""
        if fingerprint_data(dataset) != self._manifest["key"]["data"]:
            raise StaleCacheError(
                f"{self.path} was built on other data: the dataset's inputs (or their order) "
                "differ from those the teacher saw"
            )

    def require_complete(self) -> None:
        if not self.complete:
            raise CacheError(f"{self.path} holds {len(self._manifest['shards'])} of "
                             f"{self.num_shards} shards: finish it with TeacherCache.build")

    def verify(self) -> None:
        """Check every finished shard against its checksums (:class:`CorruptCacheError`)."""
        for j in range(len(self._manifest["shards"])):
            self._store.check_shard(j)

    def close(self) -> None:
        """Unmap the shards, closing their files (once no lookup still copies from them); a
        later lookup maps what it needs again."""
        self._store.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------- training

    def attach(self, loader: DataLoader, *, collate_key: str | None = None) -> DataLoader:
        """A loader like ``loader`` whose batches carry their samples' indices into the cache.

        ``loader`` must be a DataLoader over the cached dataset with a batch size and a
        sequential or shuffling sampler; its collate function, workers and other settings are
        kept. The collate function and the dataset are checked against the cache's key (the
        dataset by reading every item once); ``collate_key`` stands for the collate function
        as in :meth:`build`.
        """
        if not rebuildable(loader):
            raise TypeError("attach needs a DataLoader over a map-style dataset with a batch_size "
                            "and a sequential or shuffling sampler")
        self._check_key({"collate": _collate_key(loader.collate_fn, collate_key)})
        self.check_data(loader.dataset)
        return loader_like(loader, _Indexed(loader.dataset), _IndexedCollate(loader.collate_fn),
                           shuffle=isinstance(loader.sampler, RandomSampler))

    def lookup(self, index: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached rows of the samples ``index`` (``[B]``), on the CPU.

        Returns ``(values, indices)``: ``values`` are ``[B, W]`` (one row per sample) or, given
        the batch's ``[B, T]`` token ``positions``, ``[B, T, W]`` with each sample's rows at its
        positions and zeros elsewhere; ``W`` is the vocabulary (full logits) or ``k``.
        ``indices`` are the int64 vocabulary indices of a top-k cache, laid out alike
        (``0..k-1`` off the positions), or None.
        """
        self.require_complete()
        samples = index.tolist()
        by_shard: dict[int, list[int]] = {}
        for n, i in enumerate(samples):
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} is outside the cache's {self.num_samples} samples")
            by_shard.setdefault(i // self.shard_size, []).append(n)
        # Each shard is mapped once and its rows copied out, so that only the few mapped shards
        # hold open files, however many shards the batch spans.
        rows: list[Any] = [None] * len(samples)  # (values, indices) of each sample
        for j, where in by_shard.items():
            shard = self._store.shard(j)
            for n in where:
                local = samples[n] % self.shard_size
                lo, hi = int(shard.offsets[local]), int(shard.offsets[local + 1])
                rows[n] = (np.array(shard.values[lo:hi]), None if shard.indices is None
                           else np.array(shard.indices[lo:hi]))
        values = [v for v, _ in rows]
        indices = [k for _, k in rows if k is not None]
        counts = [len(v) for v in values]
        if positions is None:
            if self.token_level:
                raise ValueError("a token-level cache needs the batch's token positions")
            return _stacked(values), (_stacked(indices).long() if indices else None)
        expected = positions.sum(1).tolist()
        for i, have, want in zip(samples, counts, expected):
            if have != want:
                raise ValueError(
                    f"sample {i}: the batch has {want} token positions but the cache holds {have} "
                    "rows for it; mask and pad it as when the cache was built"
                )
        mask = positions.cpu()
        out = torch.zeros(*mask.shape, self._store.width(), dtype=_torch_dtype(self.dtype))
        out[mask] = _stacked(values)
        out_index = None
        if indices:
            # Off the positions: k distinct classes with equal logits, a harmless uniform row.
            out_index = torch.arange(self.top_k).expand(*mask.shape, self.top_k).clone()
            out_index[mask] = _stacked(indices).long()
        return out, out_index

    # ---------------------------------------------------------------------------- building

    def _rows(self, logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to store of one batch's logits, and how many belong to each sample."""
        token_level = logits.dim() >= 3
        if logits.dim() > 3 or logits.dim() < 2:
            raise ValueError(f"the teacher's logits must be [B, C] or [B, T, V], got "
                             f"{tuple(logits.shape)}")
        for name, value in (("token_level", token_level), ("vocab_size", logits.shape[-1])):
            if self._manifest[name] is None:
                self._manifest[name] = value
            elif self._manifest[name] != value:
                raise ValueError(f"the teacher's outputs changed {name} from "
                                 f"{self._manifest[name]} to {value} within the dataset")
        if self.top_k is not None and self.top_k > self.vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds the teacher's {self.vocab_size} classes")
        if not token_level:
            return logits, torch.ones(len(logits), dtype=torch.long)
        positions = token_positions(batch)
        if positions.shape != logits.shape[:2]:
            raise ValueError(f"token positions {tuple(positions.shape)} do not match the "
                             f"teacher's logits {tuple(logits.shape)}")
        return logits[positions], positions.sum(1)


def _stacked(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays))


def _torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "float32": torch.float32}[name]

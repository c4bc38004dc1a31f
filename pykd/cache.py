"""Teacher-output cache: run a teacher over a dataset once, then train from its stored outputs.

A cache is a folder of plain data, never code::

    manifest.json        the key, the layout and each finished shard's sizes and sha256 sums,
                         the shards keyed by number (format pykd.teacher_cache/2)
    shard-00000.values   [rows, width] float16 or float32, raw little-endian
    shard-00000.indices  [rows, k] vocabulary indices (top-k caches only): little-endian, in the
                         fewest bytes the vocabulary needs (2 up to 65,536 classes, 3 up to
                         16.7M; int32 in caches built before compact indices)
    shard-00000.rest     [rows] float16 or float32: log of the teacher's mass off the top-k
                         ("topk+rest" caches only)
    shard-00000.offsets  [samples + 1] int64: where each sample's rows start in the shard

What a row holds is the cache's signal (:mod:`pykd._cache_signals`): all logits (``top_k=None``),
the ``k`` largest (``"topk"``), the same plus the mass they miss (``"topk+rest"``), ``k``
classes drawn from the teacher (``"sampled"``) or the largest plus draws from the others
(``"topk+sampled"``); the last three at the build's temperature.

A row is one sample (sequence classification) or one non-padding token (attention mask) of it.
Shard ``j`` holds samples ``[j * shard_size, (j + 1) * shard_size)`` in dataset order. Every file
is written atomically and the manifest is rewritten (atomically) after each shard, so a killed
build resumes with the shards the manifest lacks, after checking the ones it lists. Under
``torch.distributed`` the processes build the missing shards together, each recording its own in
``manifest.part-NNNNN.json`` until process 0 merges them (:mod:`pykd._cache_build`). Version 1
manifests (finished shards as a list) are still read.

The key is the sha256 of the teacher's weights (its ``state_dict``), the sha256 of the dataset's
model inputs (labels and sample weights excluded), a fingerprint of the collate function that made
the teacher's batches (:func:`fingerprint_collate`, or a key the caller names) and the settings
(``top_k``, ``dtype``, the signal with its temperature and seed): a cache built for other
weights, data, collate function or settings is refused with :class:`StaleCacheError`, a shard
whose bytes no longer match its checksum (or a manifest without the fields it needs) with
:class:`CorruptCacheError`.

This module holds the public class; its parts live in modules below it: the key's fingerprints in
:mod:`pykd._fingerprints`, the files (manifest, shards, checksums, memory-mapped reading) in
:mod:`pykd._cache_files`, the build (one process or several) in :mod:`pykd._cache_build`, the
loaders of :meth:`TeacherCache.attach` in :mod:`pykd._cache_loaders` and the errors in
:mod:`pykd._cache_errors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pykd._batches import IndexedBatch
from pykd._cache_build import Processes, build_missing, forget, prepare, verify_kept
from pykd._cache_errors import CacheError, CorruptCacheError, StaleCacheError
from pykd._cache_files import (
    _DTYPES,
    CachedRows,
    ShardStore,
    _read_manifest,
    check_key,
    new_manifest,
    signal_of,
)
from pykd._cache_import import import_logprobs, read_logprobs_jsonl
from pykd._cache_loaders import cache_samples, check_loader, indexed_loader, sample_list
from pykd._cache_signals import check_signal, check_temperature, signal_key
from pykd._fingerprints import fingerprint_collate, fingerprint_data, fingerprint_model
from pykd.checkpoint import PathLike

# The public names: the errors, fingerprints and the indexed batch are defined in the modules
# below and offered here, where pykd, the Distiller and users have always imported them from.
__all__ = [
    "CacheError",
    "CachedRows",
    "CorruptCacheError",
    "IndexedBatch",
    "StaleCacheError",
    "TeacherCache",
    "TopKRows",
    "fingerprint_collate",
    "fingerprint_data",
    "fingerprint_model",
    "read_logprobs_jsonl",
]


@dataclasses.dataclass
class TopKRows:
    """A teacher given by ``k`` (index, logit) pairs per row and, optionally, the log of its mass
    off them (the inputs of :func:`pykd.functional.distillation_loss_topk`)."""

    index: torch.Tensor  # (*, k) int64 vocabulary indices
    logits: torch.Tensor  # (*, k)
    log_rest: torch.Tensor | None = None  # (*) or None: no mass off the k entries

    def argmax(self) -> torch.Tensor:
        return self.index.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)


def _collate_key(collate_fn: Callable[[list[Any]], Any] | None, collate_key: str | None) -> str:
    """The cache key's entry for the collate function: its fingerprint, or the caller's name."""
    if collate_key is None:
        return fingerprint_collate(collate_fn)
    if not isinstance(collate_key, str) or not collate_key.strip():
        raise ValueError(f"collate_key must be a non-empty string, got {collate_key!r}")
    return f"collate_key={collate_key}"


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
    same, item for item (no random augmentation), or a ``Subset`` of it; :meth:`attach` checks
    it. :meth:`rows` reads samples' rows back as the cache holds them.

    Attributes:
        path: the cache folder.
        top_k: ``k`` of a top-k cache, None for full logits.
        signal: None (full logits), ``"topk"``, ``"topk+rest"``, ``"sampled"`` or
            ``"topk+sampled"``.
        temperature: the temperature a ``"topk+rest"``, ``"sampled"`` or ``"topk+sampled"``
            cache holds its teacher at, which training must use; None for the others.
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
    def signal(self) -> str | None:
        return signal_of(self._manifest["key"])

    @property
    def temperature(self) -> float | None:
        return self._manifest["key"].get("temperature")

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
        signal: str | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        draws: int | None = None,
        dtype: str = "float16",
        batch_size: int = 32,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shard_size: int = 4096,
        progress: bool = False,
        on_shard: Callable[[int], None] | None = None,
        collate_key: str | None = None,
        overwrite: bool = False,
        distributed: bool | None = None,
    ) -> TeacherCache:
        """Run ``teacher`` over ``dataset`` and store its outputs under ``path`` (a folder).

        A finished cache with the same key is returned as it is; an unfinished one (a killed
        build, by any number of processes) has its finished shards checked against their
        checksums and kept, and the missing ones built; one with another key raises
        :class:`StaleCacheError`, or is replaced with ``overwrite=True``.

        Under ``torch.distributed`` (initialised, more than one process, e.g. torchrun) every
        process calls ``build`` with the same arguments: each runs its teacher over its share of
        the missing shards (round-robin) and writes their files and its own manifest part,
        then process 0 merges the parts into ``manifest.json``, and every process returns the
        finished cache. The files are the same bytes as a one-process build's.

        Args:
            path: the cache folder (created if missing).
            teacher: the teacher; run where its parameters are, in eval mode under
                ``torch.no_grad()``, then put back in its mode.
            dataset: a map-style dataset whose items collate into Distiller batches.
            top_k: ``k`` of the signal; None (and no ``signal``) keeps all logits (for small
                label sets).
            signal: what a row keeps of the teacher's logits, ``"topk"`` (the default with a
                ``top_k``: the k largest, which the loss renormalises: no mass elsewhere),
                ``"topk+rest"`` (the same plus the log of the mass they miss at
                ``temperature``: the loss keeps the student's tail at the teacher's size) or
                ``"sampled"`` (``top_k`` classes drawn with replacement from the teacher's
                softmax at ``temperature``, stored as distinct classes with logits
                ``temperature * log(count)``: an unbiased estimate of the teacher; see
                docs/loss.md) or ``"topk+sampled"`` (the ``top_k - draws`` largest exactly and
                ``draws`` draws from the rest of the teacher's softmax carrying the mass off
                them: exact on the top, unbiased on the tail). Indices take 2 bytes per entry
                up to 65,536 classes, 3 up to 16.7M.
            temperature: the temperature of a ``"topk+rest"``, ``"sampled"`` or
                ``"topk+sampled"`` signal; training from the cache must use the same (the
                Distiller checks it).
            seed: the draws' seed of a ``"sampled"`` or ``"topk+sampled"`` signal (each shard
                draws from its own generator: the same bytes whatever the batch size, resuming
                or process count).
            draws: how many of a ``"topk+sampled"`` row's ``top_k`` entries are tail draws.
            dtype: ``"float16"`` (default) or ``"float32"`` for the stored logits.
            batch_size, collate_fn: how the teacher's batches are formed, as in a DataLoader.
                The key holds ``collate_fn``'s fingerprint (:func:`fingerprint_collate`).
            shard_size: samples per shard file (ignored when resuming: the cache keeps its own).
            progress: show a progress bar over the shards (process 0's).
            on_shard: called with each shard's number once this process has stored it.
            collate_key: the key's name for ``collate_fn`` instead of its fingerprint, for a
                collate function that cannot be fingerprinted (it holds a lock, an open file,
                a tokenizer that cannot be pickled); change it whenever the function changes,
                and give it to :meth:`attach` too.
            overwrite: replace a cache of another key (teacher, data, collate function or
                settings) or one whose manifest cannot be read, and rebuild shards that fail
                their checksums, instead of raising. Only the cache's own files
                (``manifest.json``, its parts and ``shard-*.*``) are deleted, nothing else in
                the folder.
            distributed: None builds with the ``torch.distributed`` group when one is
                initialised with more than one process; False builds in this process alone
                (keep the other processes away from ``path`` then); True requires the group.

        Returns:
            The finished cache.

        Raises:
            CacheError: ``collate_fn`` cannot be fingerprinted and no ``collate_key`` is given;
                the processes of a distributed build disagree on the key; another process
                failed (the shards finished so far are kept).
        """
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if signal is None and top_k is not None:
            signal = "topk"
        check_signal(signal, top_k, temperature, draws)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        if shard_size < 1 or batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        processes = Processes(distributed)
        key = {"teacher": fingerprint_model(teacher), "data": fingerprint_data(dataset),
               "collate": _collate_key(collate_fn, collate_key), "top_k": top_k, "dtype": dtype,
               **signal_key(signal, temperature, seed, draws)}
        path = Path(path)
        fresh = new_manifest(key, len(dataset), shard_size)
        if not processes.same(json.dumps(fresh, sort_keys=True)):
            raise CacheError(f"the processes building {path} disagree on its key (teacher "
                             "weights, data, collate_fn, top_k, dtype or shard_size): each "
                             "must call build with the same ones")
        manifest = prepare(path, fresh, overwrite=overwrite, processes=processes)
        kept = ShardStore(path, manifest)
        corrupt = verify_kept(kept, overwrite=overwrite, processes=processes)
        if corrupt:
            forget(path, manifest, corrupt, processes)
        missing = [j for j in range(kept.num_shards()) if str(j) not in manifest["shards"]]
        if missing:
            build_missing(path, manifest, missing, teacher, dataset, processes=processes,
                          batch_size=batch_size, collate_fn=collate_fn, progress=progress,
                          on_shard=on_shard)
            manifest = _read_manifest(path)
        cache = cls(path, manifest)
        # The shards this process checked are not hashed again on their first lookup.
        cache._store._verified.update(kept._verified)
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

    @classmethod
    def from_logprobs(
        cls,
        path: PathLike,
        dataset: Dataset,
        records: Any,
        *,
        temperature: float,
        vocab_size: int,
        source: str,
        dtype: str = "float16",
        shard_size: int = 4096,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        collate_key: str | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> TeacherCache:
        """A ``"topk+rest"`` cache from a teacher that ran elsewhere: an inference engine's
        top-k token ids and log-probabilities per position (:func:`read_logprobs_jsonl` reads a
        JSON-lines dump of them).

        ``records`` yields, for each sample of ``dataset`` in order, ``(token_ids, logprobs)``
        (or a mapping with those two keys, as a parsed JSON line):
        ``[rows, k]`` arrays (a token-level sample: one row per position of its attention mask,
        all positions without one) or ``[k]`` (one row per sample). ``logprobs`` are the
        engine's, normalised over its whole vocabulary at ``temperature``; they are stored as
        ``temperature * logprob`` (the teacher's logits up to a constant per row, all the top-k
        loss needs) with the mass they miss as the rest, so training must use the same
        temperature (the Distiller checks it). Unused slots may hold ``-inf`` with distinct ids.

        Args:
            path: the cache folder; an existing cache of another key is refused unless
                ``overwrite``. One of the same key is kept (an unfinished one completed): the
                records themselves are not compared, so give a new dump a new ``source`` or
                pass ``overwrite=True``.
            dataset: the samples the engine scored, in the same order, as the Distiller will
                read them (the key holds their fingerprint, so :meth:`attach` checks them).
            source: names the teacher in the key (a model name and version): a cache from
                another source is stale.
            vocab_size: the engine's vocabulary size (every id must be below it).
            dtype, shard_size, collate_fn, collate_key, overwrite, progress: as in :meth:`build`.

        Raises:
            ValueError: a record does not fit its sample (rows, k, ids out of range, repeated
                ids, values that are not log-probabilities), naming the sample.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        check_temperature(temperature)
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"source must name the teacher, got {source!r}")
        key = {"teacher": f"external:{source}", "data": fingerprint_data(dataset),
               "collate": _collate_key(collate_fn, collate_key), "dtype": dtype,
               "vocab": vocab_size}
        manifest = import_logprobs(Path(path), dataset, records, key=key,
                                   temperature=temperature, vocab_size=vocab_size,
                                   shard_size=shard_size, collate_fn=collate_fn,
                                   overwrite=overwrite, progress=progress)
        return cls(path, manifest)

    def _check_key(self, key: dict[str, Any]) -> None:
        """Raise :class:`StaleCacheError` unless the cache's key agrees with ``key``'s entries."""
        check_key(self.path, self._manifest["key"], key)

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
        for j in self._store.finished():
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
        """A loader like ``loader`` whose batches are :class:`IndexedBatch`: each batch with its
        samples' indices into the cache, which the Distiller looks the teacher's rows up by.

        ``loader`` is a DataLoader that batches (a ``batch_size`` or a ``batch_sampler``) over
        the cached dataset, or over a ``torch.utils.data.Subset`` of it (a split to train on,
        without running the teacher again; Subsets of Subsets too). Its sampler or batch
        sampler (``SubsetRandomSampler``, ``DistributedSampler``, one of your own: it picks
        positions in ``loader.dataset``), collate function, workers and other settings are
        kept; a plain sequential or shuffling loader stays one that the training loop orders
        (and shards across processes) itself.

        The collate function and the data are checked against the cache's key (reading each
        item once: ``loader.dataset`` first, then each dataset a Subset wraps); ``collate_key``
        stands for the collate function as in :meth:`build`.

        Raises:
            StaleCacheError: neither the dataset nor any dataset under its Subsets has the
                cached inputs, or the collate function differs.
            TypeError: ``loader`` is not a DataLoader that batches a map-style dataset.
        """
        check_loader(loader)
        self._check_key({"collate": _collate_key(loader.collate_fn, collate_key)})
        samples = cache_samples(loader.dataset, self._has_data, self.path)
        return indexed_loader(loader, samples)

    def _has_data(self, dataset: Dataset) -> bool:
        return fingerprint_data(dataset) == self._manifest["key"]["data"]

    def lookup(self, index: torch.Tensor, positions: torch.Tensor | None = None, *,
               rest: bool = False) -> tuple[torch.Tensor, ...]:
        """The cached rows of the samples ``index`` (``[B]``), on the CPU, laid out as a batch.

        Returns ``(values, indices)``: ``values`` are ``[B, W]`` (one row per sample) or, given
        the batch's ``[B, T]`` token ``positions``, ``[B, T, W]`` with each sample's rows at its
        positions and zeros elsewhere; ``W`` is the vocabulary (full logits) or ``k``.
        ``indices`` are the int64 vocabulary indices of a top-k cache, laid out alike
        (``0..k-1`` off the positions), or None. With ``rest=True``, ``(values, indices,
        log_rest)``: ``log_rest`` ``[B]`` or ``[B, T]`` (``-inf`` off the positions) for a
        ``"topk+rest"`` cache, None for the others. (:meth:`rows` reads samples without a batch.)
        """
        samples = sample_list(index)
        if positions is None and self.token_level:
            raise ValueError("a token-level cache needs the batch's token positions (or read "
                             "each sample's rows with cache.rows)")
        self.require_complete()
        cached = self._store.read_rows(samples)
        if positions is None:
            return (cached.values, cached.indices) + ((cached.log_rest,) if rest else ())
        expected = positions.sum(1).tolist()
        for i, have, want in zip(samples, cached.offsets.diff().tolist(), expected):
            if have != want:
                raise ValueError(
                    f"sample {i}: the batch has {want} token positions but the cache holds {have} "
                    "rows for it; mask and pad it as when the cache was built"
                )
        mask = positions.cpu()
        out = cached.values.new_zeros(*mask.shape, cached.values.shape[-1])
        out[mask] = cached.values
        out_index = None
        if cached.indices is not None:
            # Off the positions: k distinct classes with equal logits, a harmless uniform row.
            out_index = torch.arange(self.top_k).expand(*mask.shape, self.top_k).clone()
            out_index[mask] = cached.indices
        if not rest:
            return out, out_index
        out_rest = None
        if cached.log_rest is not None:
            out_rest = cached.log_rest.new_full(mask.shape, float("-inf"))
            out_rest[mask] = cached.log_rest
        return out, out_index, out_rest

    def rows(self, index: int | Sequence[int] | torch.Tensor) -> CachedRows:
        """Every cached row of the samples ``index`` (an int, a sequence of ints or a 1-D
        tensor), in order, without a batch to lay them out in: the teacher's rows of each
        sample as the cache holds them (a token-level cache's are the tokens of the sample's
        attention mask, in order).

        >>> import tempfile
        >>> from torch import nn
        >>> data = torch.utils.data.TensorDataset(torch.randn(5, 3))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = TeacherCache.build(folder, nn.Linear(3, 4), data, top_k=2)
        ...     cached = cache.rows([4, 0])
        >>> cached.values.shape, cached.indices.shape, cached.offsets.tolist()
        (torch.Size([2, 2]), torch.Size([2, 2]), [0, 1, 2])
        >>> cached[1][0].shape  # sample 0's values
        torch.Size([1, 2])
        """
        self.require_complete()
        return self._store.read_rows(sample_list(index))

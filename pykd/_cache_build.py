"""Building a teacher cache: the folder made ready (a cache of another key replaced, parts of an
interrupted distributed build merged, the kept shards verified), the teacher run over the samples
of each shard the manifest lacks and its outputs stored shard by shard, by one process or by the
processes of a ``torch.distributed`` group together.

Several processes split the missing shards round-robin; each writes its shards' files and its
own manifest part (:func:`pykd._cache_files.part_name`), never a file another one writes, and
process 0 merges the parts into ``manifest.json`` once all are done. A build killed anywhere
resumes on rerun, by any number of processes: the parts left are merged first, the finished
shards verified and kept.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pykd._batches import (
    Batch,
    call_model,
    floating_dtype,
    logits_and_hidden,
    parse_batch,
    to_device,
    token_positions,
)
from pykd._cache_errors import CacheError, CorruptCacheError, StaleCacheError
from pykd._cache_files import (
    _MANIFEST,
    ShardStore,
    _read_manifest,
    check_key,
    manifest_bytes,
    part_name,
    part_names,
    remove_cache_files,
    write_manifest,
)
from pykd._cache_signals import SAMPLED, encode_rows, shard_generator

T = TypeVar("T")


class Processes:
    """The processes that build a cache: this one alone, or the ``torch.distributed`` group.

    ``distributed``: None uses the group when one is initialised with more than one process;
    True requires one; False builds alone (the caller keeps other processes off the folder).
    """

    def __init__(self, distributed: bool | None) -> None:
        ready = dist.is_available() and dist.is_initialized()
        if distributed and not ready:
            raise ValueError("distributed=True needs torch.distributed initialised "
                             "(init_process_group, e.g. under torchrun)")
        grouped = ready if distributed is None else bool(distributed)
        self.rank = dist.get_rank() if grouped else 0
        self.world = dist.get_world_size() if grouped else 1

    def max(self, values: list[int]) -> list[int]:
        """The elementwise maximum of ``values`` over the processes."""
        if self.world == 1 or not values:
            return values
        # NCCL reduces only GPU tensors; every other backend here takes CPU ones.
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def same(self, text: str) -> bool:
        """Whether every process has the same ``text``."""
        digest = hashlib.sha256(text.encode()).digest()
        words = [int.from_bytes(digest[i:i + 4], "big") for i in range(0, len(digest), 4)]
        # max(w) == -max(-w) == min(w) for every word: one all-reduce.
        both = self.max(words + [-w for w in words])
        return both[:len(words)] == [-w for w in both[len(words):]]

    def together(self, step: Callable[[], T], path: Path) -> T:
        """``step()`` on every process; if it raised on any, it raises on all (its own error
        where it failed), so that none waits forever for the others at the next collective."""
        error, result = None, None
        try:
            result = step()
        except Exception as caught:
            error = caught
        failed = self.max([int(error is not None)])[0]
        if error is not None:
            raise error
        if failed:
            raise CacheError(f"another process failed building the cache at {path}: see its "
                             "error (the shards finished so far are kept for a rerun)")
        return result


def prepare(path: Path, fresh: dict[str, Any], *, overwrite: bool,
            processes: Processes) -> dict[str, Any]:
    """The manifest to build on, written to ``path`` (by process 0) and read by every process:
    the folder's cache with any parts merged into it, or ``fresh`` where there is none, or where
    ``overwrite`` replaces one of another key (or unreadable)."""
    # Every process reads the folder before process 0 changes it, and the same files give them
    # all the same answer (a StaleCacheError raises everywhere).
    replace = processes.together(lambda: _must_replace(path, fresh, overwrite), path)

    def write() -> None:
        if processes.rank != 0:
            return
        if replace:
            remove_cache_files(path)
        main = path / _MANIFEST
        _merge_into_manifest(path, _read_manifest(path) if main.exists() else copy.deepcopy(fresh))

    processes.together(write, path)
    return _read_manifest(path)


def _must_replace(path: Path, fresh: dict[str, Any], overwrite: bool) -> bool:
    names = ([_MANIFEST] if (path / _MANIFEST).exists() else []) + part_names(path)
    for name in names:
        try:
            check_key(path, _read_manifest(path, name)["key"], fresh["key"])
        except (StaleCacheError, CorruptCacheError):
            if overwrite:
                return True
            raise
    return False


def merge_parts(path: Path, manifest: dict[str, Any], parts: list[str]) -> None:
    """Add the shards of the manifest ``parts`` (of a distributed build) to ``manifest``."""
    for name in parts:
        part = _read_manifest(path, name)
        for field in ("key", "num_samples", "shard_size"):
            if part[field] != manifest[field]:
                raise CorruptCacheError(f"{path / name} belongs to another cache ({field} "
                                        f"differs); build with overwrite=True to replace both")
        for field in ("token_level", "vocab_size"):
            _agree(manifest, field, part[field], f"{path / name}: the teacher's outputs")
        # A part is newer than the manifest it was started from (a rebuilt shard's entry).
        manifest["shards"].update(part["shards"])


def _agree(manifest: dict[str, Any], field: str, value: Any, who: str) -> None:
    if value is None:
        return
    if manifest[field] is None:
        manifest[field] = value
    elif manifest[field] != value:
        raise ValueError(f"{who} changed {field} from {manifest[field]} to {value} within the "
                         "dataset")


def verify_kept(store: ShardStore, *, overwrite: bool, processes: Processes) -> list[int]:
    """Check the finished shards against their checksums, split among the processes; return the
    corrupted ones (to rebuild, with ``overwrite``; otherwise :class:`CorruptCacheError`)."""
    errors = {}
    for j in store.finished()[processes.rank::processes.world]:
        try:
            store.check_shard(j)
        except CorruptCacheError as error:
            errors[j] = error
    flags = processes.max([int(j in errors) for j in range(store.num_shards())])
    corrupt = [j for j, flag in enumerate(flags) if flag]
    if corrupt and not overwrite:
        if errors:
            raise next(iter(errors.values()))
        raise CorruptCacheError(f"shards {corrupt} of {store.path} do not match their checksums "
                                "(found by another process); build with overwrite=True to "
                                "rebuild them")
    return corrupt


def build_missing(path: Path, manifest: dict[str, Any], missing: list[int], teacher: nn.Module,
                  dataset: Dataset, *, processes: Processes, batch_size: int,
                  collate_fn: Callable[[list[Any]], Any] | None, progress: bool,
                  on_shard: Callable[[int], None] | None) -> None:
    """Build the shards ``missing`` of the cache at ``path`` (its manifest is ``manifest``),
    each process its share; on return ``manifest.json`` lists them all."""
    if processes.world == 1:
        # The manifest itself is rewritten after each shard: a killed build keeps its shards.
        store = ShardStore(path, manifest)
    else:
        store = ShardStore(path, {**copy.deepcopy(manifest), "shards": {}},
                           part_name(processes.rank))
    mine = missing[processes.rank::processes.world]
    processes.together(lambda: build_shards(
        store, mine, teacher, dataset, batch_size=batch_size, collate_fn=collate_fn,
        progress=progress and processes.rank == 0, on_shard=on_shard), path)
    if processes.world > 1:
        processes.together(lambda: _merge_finished_parts(path, processes.rank), path)


def _merge_finished_parts(path: Path, rank: int) -> None:
    """Process 0: merge the parts of a distributed build into the manifest, then delete them."""
    if rank == 0:
        _merge_into_manifest(path, _read_manifest(path))


def _merge_into_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Merge the folder's manifest parts into ``manifest``, write it as ``manifest.json`` (if
    that changes its bytes), then delete the parts: a process killed in between leaves parts
    that the next build merges again."""
    main, parts = path / _MANIFEST, part_names(path)
    merge_parts(path, manifest, parts)
    if not main.exists() or main.read_bytes() != manifest_bytes(manifest):
        write_manifest(main, manifest)
    for name in parts:
        (path / name).unlink()


def forget(path: Path, manifest: dict[str, Any], shards: list[int],
           processes: Processes) -> None:
    """Drop ``shards`` (corrupted, to rebuild) from ``manifest``, and process 0 from its file, so
    that a build killed before rebuilding them does not list them as finished."""
    for j in shards:
        manifest["shards"].pop(str(j), None)
    processes.together(lambda: processes.rank == 0 and write_manifest(path / _MANIFEST, manifest),
                       path)


def build_shards(store: ShardStore, shards: list[int], teacher: nn.Module, dataset: Dataset, *,
                 batch_size: int, collate_fn: Callable[[list[Any]], Any] | None,
                 progress: bool, on_shard: Callable[[int], None] | None) -> None:
    """Run ``teacher`` over the samples of each of ``shards`` and store its outputs in ``store``.

    The teacher runs where its parameters are, in eval mode under ``torch.no_grad()``, and is put
    back in its mode. Arguments as in :meth:`pykd.TeacherCache.build`.
    """
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    # Floating inputs take the teacher's dtype (float32 data into a bfloat16 teacher).
    float_dtype = floating_dtype(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        for j in tqdm(shards, desc="teacher cache", unit="shard", disable=not progress):
            _build_shard(store, j, teacher, dataset, batch_size, collate_fn, device, float_dtype)
            if on_shard is not None:
                on_shard(j)
    finally:
        teacher.train(was_training)


@torch.no_grad()
def _build_shard(store: ShardStore, j: int, teacher: nn.Module, dataset: Dataset,
                 batch_size: int, collate_fn: Callable[[list[Any]], Any] | None,
                 device: torch.device, float_dtype: torch.dtype | None) -> None:
    options = {} if collate_fn is None else {"collate_fn": collate_fn}
    loader = DataLoader(Subset(dataset, store.samples(j)), batch_size=batch_size, **options)
    key = store.manifest["key"]
    # A sampled shard draws from its own generator: its bytes depend on its number alone.
    generator = (shard_generator(key["seed"], j) if store.signal in SAMPLED else None)
    values, indices, rests, counts = [], [], [], []
    for raw in loader:
        batch = parse_batch(to_device(raw, device, float_dtype))
        logits, _ = logits_and_hidden(call_model(teacher, batch.inputs, {}))
        rows, count = _rows(store, logits, batch)
        counts.append(count.cpu())
        if store.signal is None:
            values.append(rows.float().cpu())
            continue
        value, index, rest = encode_rows(rows, store.signal, store.top_k,
                                         key.get("temperature", 1.0), generator,
                                         key.get("draws"))
        values.append(value)
        indices.append(index)
        if rest is not None:
            rests.append(rest)
    store.write_shard(j, torch.cat(values).numpy(),
                      np.concatenate([[0], torch.cat(counts).cumsum(0).numpy()]),
                      torch.cat(indices).numpy() if indices else None,
                      torch.cat(rests).numpy() if rests else None)


def _rows(store: ShardStore, logits: torch.Tensor, batch: Batch
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to store of one batch's logits, and how many belong to each sample; the first
    batch sets the cache's ``token_level`` and ``vocab_size``, the others must agree."""
    if logits.dim() > 3 or logits.dim() < 2:
        raise ValueError(f"the teacher's logits must be [B, C] or [B, T, V], got "
                         f"{tuple(logits.shape)}")
    token_level = logits.dim() == 3
    manifest = store.manifest
    _agree(manifest, "token_level", token_level, "the teacher's outputs")
    _agree(manifest, "vocab_size", logits.shape[-1], "the teacher's outputs")
    if store.top_k is not None and store.top_k > manifest["vocab_size"]:
        raise ValueError(f"top_k={store.top_k} exceeds the teacher's {manifest['vocab_size']} "
                         "classes")
    if not token_level:
        return logits, torch.ones(len(logits), dtype=torch.long)
    positions = token_positions(batch)
    if positions.shape != logits.shape[:2]:
        raise ValueError(f"token positions {tuple(positions.shape)} do not match the "
                         f"teacher's logits {tuple(logits.shape)}")
    return logits[positions], positions.sum(1)

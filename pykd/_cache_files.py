"""A teacher cache's files: the manifest, each shard's arrays and their checksums, and the
shards read back memory-mapped (see :mod:`pykd.cache` for the layout of the folder).

The manifest lists the finished shards by number (``"shards": {"0": {...}, "3": {...}}``), so a
cache built by several processes may finish its shards in any order. A process of a distributed
build records its shards in a manifest part of its own (``manifest.part-00001.json``, a manifest
itself, holding that process's shards only): no two processes ever write one file, and process 0
merges the parts into ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pykd._cache_errors import CacheError, CorruptCacheError, StaleCacheError
from pykd._cache_signals import (
    SAMPLED,
    SIGNALS,
    TEMPERATURE_BOUND,
    index_layout,
    pack_indices,
    unpack_indices,
)
from pykd.checkpoint import write_atomic

_FORMAT = "pykd.teacher_cache/2"
# Version 1 listed the finished shards as a list, shard j at position j (a build went in order):
# still read, as the same shards keyed by number, and written as version 2 when built on.
_FORMAT_V1 = "pykd.teacher_cache/1"
_MANIFEST = "manifest.json"
# The manifest's fields in the order they are written: a manifest's bytes depend only on what it
# says, not on how a build went (one process or several, resumed or not).
_FIELDS = ("format", "key", "num_samples", "shard_size", "token_level", "vocab_size", "shards")
_DTYPES = {"float16": np.float16, "float32": np.float32}
# Indices of caches whose key names no "index" (built before compact indices): int32.
_INDEX_DTYPE = np.int32
_OFFSET_DTYPE = np.int64
_REBUILD = "build it again with overwrite=True (which rebuilds the corrupted shards)"
# Shards kept memory-mapped at once (each holds a file handle per array); the least recently
# used one is unmapped beyond this.
_MAPPED_SHARDS = 8


@dataclasses.dataclass
class CachedRows:
    """Every cached row of some samples (:meth:`TeacherCache.rows`), flat, on the CPU.

    Sample ``n``'s rows are ``values[offsets[n]:offsets[n + 1]]`` (one row for a sequence-level
    cache, one per token of its attention mask for a token-level one); ``cached[n]`` gives them
    with their indices, and iterating gives every sample's in turn.

    Attributes:
        values: ``[rows, W]`` logits in the cache's dtype; ``W`` is the vocabulary (full logits)
            or ``k`` (top-k).
        indices: ``[rows, k]`` int64 vocabulary indices of a top-k cache, None for full logits.
        offsets: ``[samples + 1]`` int64.
        log_rest: ``[rows]`` a ``"topk+rest"`` cache's log of the teacher's mass off the k
            entries (in the cache's dtype), else None.
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    offsets: torch.Tensor
    log_rest: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample ``n``'s ``(values, indices)``."""
        if not -len(self) <= n < len(self):
            raise IndexError(f"sample {n} of {len(self)}")
        lo, hi = self.offsets[n % len(self)].item(), self.offsets[n % len(self) + 1].item()
        return self.values[lo:hi], None if self.indices is None else self.indices[lo:hi]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return (self[n] for n in range(len(self)))


@dataclasses.dataclass
class _Shard:
    values: np.ndarray  # [rows, width]
    indices: np.ndarray | None  # [rows, k] or [rows, k, 3], as stored
    offsets: np.ndarray  # [samples + 1]
    rest: np.ndarray | None  # [rows]


class ShardStore:
    """The shards of one cache folder as its manifest lists them: their files and what they hold,
    writing them, checking them against their checksums and reading them memory-mapped.

    It holds the cache's manifest itself (the same dict, not a copy), which a build fills in: the
    first batch sets ``token_level`` and ``vocab_size``, each stored shard appends its entry.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_name: str = _MANIFEST
                 ) -> None:
        self.path = path
        self.manifest = manifest
        # Where write_shard records each shard: the cache's manifest, or a process's part of it.
        self.manifest_name = manifest_name
        # The key does not change once the cache exists (a build for another key is refused).
        self.top_k: int | None = manifest["key"]["top_k"]
        self.dtype: str = manifest["key"]["dtype"]
        self.signal: str | None = signal_of(manifest["key"])
        # Compact indices take the fewest bytes the vocabulary needs (known after one batch).
        self.compact_indices: bool = manifest["key"].get("index") == "compact"
        self._shards: OrderedDict[int, _Shard] = OrderedDict()  # mapped, least recent first
        self._verified: set[int] = set()  # shards whose checksums matched: not hashed again
        self._new_locks()

    def _new_locks(self) -> None:
        # Lookups may come from several threads (DataLoader threads, prefetchers). _lock guards
        # the LRU of mapped shards, held only for its bookkeeping; _verify_lock lets one thread
        # hash a shard's files on first use while the others wait for it, not hash it again.
        self._lock = threading.Lock()
        self._verify_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (to another process): not the locks, nor the mapped shards, mapped again there.
        state = self.__dict__.copy()
        for name in ("_lock", "_verify_lock"):
            del state[name]
        state["_shards"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_locks()

    def width(self) -> int:
        """Values per row: ``k`` of a top-k cache, the teacher's classes of a full-logit one."""
        return self.top_k if self.top_k is not None else self.manifest["vocab_size"]

    def samples(self, j: int) -> range:
        """The samples of shard ``j``, in dataset order."""
        start = j * self.manifest["shard_size"]
        return range(start, min(start + self.manifest["shard_size"], self.manifest["num_samples"]))

    def num_shards(self) -> int:
        return math.ceil(self.manifest["num_samples"] / self.manifest["shard_size"])

    def finished(self) -> list[int]:
        """The numbers of the finished shards, in order."""
        return sorted(int(j) for j in self.manifest["shards"])

    def files(self, j: int) -> dict[str, Path]:
        """The files of shard ``j``, by the name of the array each holds."""
        return {name: self.path / f"shard-{j:05d}.{name}" for name in _file_names(self.signal)}

    def index_layout(self) -> tuple[np.dtype, tuple[int, ...]]:
        """numpy dtype and per-row shape of the stored indices."""
        assert self.top_k is not None
        if self.compact_indices:
            return index_layout(self.manifest["vocab_size"], self.top_k)
        return np.dtype(_INDEX_DTYPE), (self.top_k,)

    def layout(self, j: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """dtype and shape of each file of finished shard ``j``."""
        entry = self.manifest["shards"][str(j)]
        rows, samples = entry["rows"], entry["samples"]
        layout = {"values": (_DTYPES[self.dtype], (rows, self.width())),
                  "offsets": (_OFFSET_DTYPE, (samples + 1,))}
        if self.top_k is not None:
            dtype, per_row = self.index_layout()
            layout["indices"] = (dtype, (rows, *per_row))
        if self.signal == "topk+rest":
            layout["rest"] = (_DTYPES[self.dtype], (rows,))
        return layout

    def check_shard(self, j: int) -> None:
        """Check the files of finished shard ``j`` against their sizes and checksums."""
        entry = self.manifest["shards"][str(j)]
        for name, file in self.files(j).items():
            dtype, shape = self.layout(j)[name]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not file.exists() or file.stat().st_size != size:
                raise CorruptCacheError(f"{file} is missing or has the wrong size (expected "
                                        f"{size} bytes); {_REBUILD}")
            if _sha256_file(file) != entry["sha256"][name]:
                raise CorruptCacheError(f"{file} does not match its checksum: the cache is "
                                        f"corrupted; {_REBUILD}")
        self._verified.add(j)

    def shard(self, j: int) -> _Shard:
        """Finished shard ``j``, memory-mapped, checked against its checksums on first use.

        Shards leave the LRU by being dropped from it, never closed: a thread still copying rows
        from one holds a reference to it, and its files close when the last reference goes (a
        lookup keeps copies, never views).
        """
        with self._lock:
            shard = self._shards.get(j)
            if shard is not None:
                self._shards.move_to_end(j)
                return shard
        # Hashing and mapping run unlocked: lookups of mapped shards go on meanwhile.
        if j not in self._verified:
            with self._verify_lock:
                if j not in self._verified:
                    self.check_shard(j)
        arrays: dict[str, np.ndarray] = {}
        for name, file in self.files(j).items():
            dtype, shape = self.layout(j)[name]
            arrays[name] = (np.memmap(file, dtype=dtype, mode="r", shape=shape) if math.prod(shape)
                            else np.zeros(shape, dtype=dtype))
        with self._lock:
            # Another thread may have mapped it meanwhile: one mapping of it stays.
            shard = self._shards.setdefault(
                j, _Shard(arrays["values"], arrays.get("indices"), arrays["offsets"],
                          arrays.get("rest")))
            self._shards.move_to_end(j)
            while len(self._shards) > _MAPPED_SHARDS:
                self._shards.popitem(last=False)
        return shard

    def write_shard(self, j: int, values: np.ndarray, offsets: np.ndarray,
                    indices: np.ndarray | None, rest: np.ndarray | None = None) -> None:
        """Store shard ``j``'s arrays as their files' types (``indices`` as int64 class
        numbers), then list it in the manifest (after its files: a build killed in between
        builds the shard again); a shard listed already (corrupted, being rebuilt) gets its new
        entry."""
        arrays = {"values": values.astype(_DTYPES[self.dtype]),
                  "offsets": offsets.astype(_OFFSET_DTYPE)}
        if indices is not None:
            arrays["indices"] = (pack_indices(indices, self.manifest["vocab_size"])
                                 if self.compact_indices else indices.astype(_INDEX_DTYPE))
        if rest is not None:
            arrays["rest"] = rest.astype(_DTYPES[self.dtype])
        sums = {}
        for name, file in self.files(j).items():
            data = np.ascontiguousarray(arrays[name]).tobytes()
            write_atomic(file, lambda f, data=data: f.write(data))
            sums[name] = hashlib.sha256(data).hexdigest()
        self.manifest["shards"][str(j)] = {"samples": len(self.samples(j)),
                                           "rows": len(arrays["values"]), "sha256": sums}
        write_manifest(self.path / self.manifest_name, self.manifest)

    def read_rows(self, samples: list[int]) -> CachedRows:
        """Every row of each of ``samples``, copied out of its finished shard."""
        num_samples, shard_size = self.manifest["num_samples"], self.manifest["shard_size"]
        by_shard: dict[int, list[int]] = {}
        for n, i in enumerate(samples):
            if not 0 <= i < num_samples:
                raise IndexError(f"sample {i} is outside the cache's {num_samples} samples")
            by_shard.setdefault(i // shard_size, []).append(n)
        # Each shard is mapped once and its rows copied out, so that only the few mapped shards
        # hold open files, however many shards the batch spans.
        values: list[Any] = [None] * len(samples)
        indices: list[Any] = [None] * len(samples)
        rest: list[Any] = [None] * len(samples)
        for j, where in by_shard.items():
            shard = self.shard(j)
            for n in where:
                local = samples[n] % shard_size
                lo, hi = int(shard.offsets[local]), int(shard.offsets[local + 1])
                values[n] = np.array(shard.values[lo:hi])
                if shard.indices is not None:
                    indices[n] = np.array(shard.indices[lo:hi])
                if shard.rest is not None:
                    rest[n] = np.array(shard.rest[lo:hi])
        counts = [0] + [len(v) for v in values]
        empty = np.zeros((0, self.width() or 0), dtype=_DTYPES[self.dtype])
        index = None
        if self.top_k is not None:
            dtype, per_row = self.index_layout()
            stored = np.concatenate(indices or [np.zeros((0, *per_row), dtype)])
            index = (unpack_indices(stored, self.manifest["vocab_size"]) if self.compact_indices
                     else torch.from_numpy(stored).long())
        return CachedRows(
            torch.from_numpy(np.concatenate(values or [empty])), index,
            torch.tensor(counts, dtype=torch.long).cumsum(0),
            None if self.signal != "topk+rest" else torch.from_numpy(
                np.concatenate(rest or [np.zeros(0, _DTYPES[self.dtype])])),
        )

    def close(self) -> None:
        """Unmap the shards (see :meth:`shard`)."""
        with self._lock:
            self._shards.clear()


def signal_of(key: dict[str, Any]) -> str | None:
    """The signal a cache's key stores: None (full logits), or one of ``SIGNALS``; a key from
    before signals were named is ``"topk"`` when it has a k."""
    return key.get("signal", "topk" if key["top_k"] is not None else None)


def _file_names(signal: str | None) -> list[str]:
    """The arrays of each shard."""
    return (["values", "offsets"] + (["indices"] if signal is not None else [])
            + (["rest"] if signal == "topk+rest" else []))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(path: Path, name: str = _MANIFEST) -> dict[str, Any]:
    """The manifest ``name`` (``manifest.json`` or a part) of the cache folder ``path``, checked
    (:class:`CorruptCacheError`); a version 1 manifest is read as version 2."""
    file = path / name
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} is not a teacher cache (no {name})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{file} cannot be read ({error}); build the cache again "
                                "with overwrite=True, which replaces it") from error
    if isinstance(manifest, dict) and manifest.get("format") == _FORMAT_V1:
        shards = manifest.get("shards")
        if isinstance(shards, list):
            manifest["shards"] = {str(j): entry for j, entry in enumerate(shards)}
        manifest["format"] = _FORMAT
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CorruptCacheError(f"{file} is not a {_FORMAT} manifest")
    _check_manifest(file, manifest)
    return manifest


def _check_manifest(file: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`CorruptCacheError` unless ``manifest`` holds every field the cache reads,
    each of the right type, and its shards are shards of the cache."""

    def need(where: Mapping[str, Any], name: str, ok: Callable[[Any], bool],
             what: str = "") -> None:
        if name not in where or not ok(where[name]):
            found = repr(where[name])[:60] if name in where else "missing"
            raise CorruptCacheError(f"{file}: {what}{name} is {found}, not as a cache needs it; "
                                    "build the cache again with overwrite=True")

    def is_str(value: Any) -> bool:
        return isinstance(value, str)

    def is_int(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    need(manifest, "key", lambda v: isinstance(v, dict))
    key = manifest["key"]
    need(key, "teacher", is_str, "key.")
    need(key, "data", is_str, "key.")
    need(key, "top_k", lambda v: v is None or is_int(v, 1), "key.")
    need(key, "dtype", lambda v: is_str(v) and v in _DTYPES, "key.")
    if "signal" in key:  # absent from caches built before signals were named: "topk" or none
        need(key, "signal", lambda v: v in SIGNALS and key["top_k"] is not None, "key.")
    if key.get("signal") in TEMPERATURE_BOUND:
        need(key, "temperature", lambda v: isinstance(v, (int, float)) and v > 0, "key.")
    if key.get("signal") in SAMPLED:
        need(key, "seed", is_int, "key.")
    if key.get("signal") == "topk+sampled":
        need(key, "draws", lambda v: is_int(v, 1) and v < key["top_k"], "key.")
    if "index" in key:
        need(key, "index", lambda v: v == "compact", "key.")
    if "collate" in key:  # absent from caches built before it was keyed (stale, not corrupt)
        need(key, "collate", is_str, "key.")
    need(manifest, "num_samples", is_int)
    need(manifest, "shard_size", lambda v: is_int(v, 1))
    need(manifest, "token_level", lambda v: v is None or isinstance(v, bool))
    need(manifest, "vocab_size", lambda v: v is None or is_int(v, 1))
    num_samples, shard_size = manifest["num_samples"], manifest["shard_size"]
    numbers = {str(j) for j in range(math.ceil(num_samples / shard_size))}
    # Keys are shard numbers as str(j) writes them: "07" or "-0" would name no file.
    need(manifest, "shards", lambda v: isinstance(v, dict) and set(v) <= numbers
         and all(isinstance(entry, dict) for entry in v.values()))
    names = _file_names(signal_of(key))
    for j, entry in manifest["shards"].items():
        samples = min(shard_size, num_samples - int(j) * shard_size)
        need(entry, "samples", lambda v, samples=samples: v == samples and is_int(v),
             f"shards[{j}].")
        need(entry, "rows", is_int, f"shards[{j}].")
        need(entry, "sha256", lambda v: isinstance(v, dict)
             and all(is_str(v.get(name)) for name in names), f"shards[{j}].")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """``manifest`` as its file holds it: its fields and shards in a fixed order."""
    ordered = {name: manifest[name] for name in _FIELDS}
    ordered["shards"] = {str(j): manifest["shards"][str(j)]
                         for j in sorted(int(j) for j in manifest["shards"])}
    return json.dumps(ordered, indent=1).encode()


def write_manifest(file: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``file`` atomically."""
    text = manifest_bytes(manifest)
    write_atomic(file, lambda f: f.write(text))


def check_key(path: Path, stored: dict[str, Any], key: dict[str, Any]) -> None:
    """Raise :class:`StaleCacheError` unless the key ``stored`` in the cache at ``path`` agrees
    with ``key``'s entries."""
    what = {"teacher": "the teacher's weights", "data": "the data's inputs"}
    # A cache from before collate functions (or signals, compact indices) were keyed has none:
    # it is stale.
    label = {"collate": "collate_fn"}
    diff = [f"{label.get(name, name)} ({stored.get(name)!r} in the cache, {key[name]!r} now)"
            if name not in what else what[name]
            for name in key if stored.get(name) != key[name]]
    if diff:
        raise StaleCacheError(
            f"{path} was built for other settings: {', '.join(diff)} differ; use those it was "
            "built with, build to another path, or build with overwrite=True to replace it"
        )


def new_manifest(key: dict[str, Any], num_samples: int, shard_size: int) -> dict[str, Any]:
    """The manifest of a cache with no shard built yet (nor its rows' shape known)."""
    return {"format": _FORMAT, "key": key, "num_samples": num_samples, "shard_size": shard_size,
            "token_level": None, "vocab_size": None, "shards": {}}


def part_name(rank: int) -> str:
    """The manifest part of process ``rank`` of a distributed build."""
    return f"manifest.part-{rank:05d}.json"


_PART = re.compile(r"manifest\.part-\d{5,}\.json")
# The cache's own files and what killed atomic writes of them left: the only files a build
# deletes when it replaces a cache (overwrite=True). Any array name: a cache of another key may
# hold arrays this one does not.
_OWN = re.compile(r"(manifest\.json|manifest\.part-\d{5,}\.json|shard-\d{5,}\.[a-z0-9_]+)")
_OWN_TEMPORARY = re.compile(r"\.(" + _OWN.pattern + r")\.[a-z0-9_]+\.tmp")


def part_names(path: Path) -> list[str]:
    """The manifest parts in the folder ``path``, in order."""
    return sorted(f.name for f in path.iterdir() if _PART.fullmatch(f.name)) \
        if path.is_dir() else []


def remove_cache_files(path: Path) -> None:
    """Delete the cache in the folder ``path``: its manifest first (the folder then holds no
    cache, whatever deleting the rest leaves), then its parts, shard files and temporaries;
    nothing else in the folder."""
    (path / _MANIFEST).unlink(missing_ok=True)
    for file in sorted(path.iterdir()):
        if _OWN.fullmatch(file.name) or _OWN_TEMPORARY.fullmatch(file.name):
            file.unlink(missing_ok=True)

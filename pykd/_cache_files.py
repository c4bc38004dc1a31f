"""A teacher cache's files: the manifest, each shard's arrays and their checksums, and the
shards read back memory-mapped (see :mod:`pykd.cache` for the layout of the folder)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pykd._cache_errors import CacheError, CorruptCacheError
from pykd.checkpoint import write_atomic

_FORMAT = "pykd.teacher_cache/1"
_MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_INDEX_DTYPE = np.int32
_OFFSET_DTYPE = np.int64
# Shards kept memory-mapped at once (each holds a file handle per array); the least recently
# used one is unmapped beyond this.
_MAPPED_SHARDS = 8


@dataclasses.dataclass
class _Shard:
    values: np.ndarray  # [rows, width]
    indices: np.ndarray | None  # [rows, k]
    offsets: np.ndarray  # [samples + 1]


class ShardStore:
    """The shards of one cache folder as its manifest lists them: their files and what they hold,
    writing them, checking them against their checksums and reading them memory-mapped.

    It holds the cache's manifest itself (the same dict, not a copy), which a build fills in: the
    first batch sets ``token_level`` and ``vocab_size``, each stored shard appends its entry.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        # The key does not change once the cache exists (a build for another key is refused).
        self.top_k: int | None = manifest["key"]["top_k"]
        self.dtype: str = manifest["key"]["dtype"]
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

    def files(self, j: int) -> dict[str, Path]:
        """The files of shard ``j``, by the name of the array each holds."""
        return {name: self.path / f"shard-{j:05d}.{name}" for name in _file_names(self.top_k)}

    def layout(self, j: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """dtype and shape of each file of finished shard ``j``."""
        entry = self.manifest["shards"][j]
        rows, samples = entry["rows"], entry["samples"]
        layout = {"values": (_DTYPES[self.dtype], (rows, self.width())),
                  "offsets": (_OFFSET_DTYPE, (samples + 1,))}
        if self.top_k is not None:
            layout["indices"] = (_INDEX_DTYPE, (rows, self.top_k))
        return layout

    def check_shard(self, j: int) -> None:
        """Check the files of finished shard ``j`` against their sizes and checksums."""
        entry = self.manifest["shards"][j]
        for name, file in self.files(j).items():
            dtype, shape = self.layout(j)[name]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not file.exists() or file.stat().st_size != size:
                raise CorruptCacheError(f"{file} is missing or has the wrong size (expected "
                                        f"{size} bytes); delete {self.path} and build it again")
            if _sha256_file(file) != entry["sha256"][name]:
                raise CorruptCacheError(f"{file} does not match its checksum: the cache is "
                                        f"corrupted; delete {self.path} and build it again")
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
                j, _Shard(arrays["values"], arrays.get("indices"), arrays["offsets"]))
            self._shards.move_to_end(j)
            while len(self._shards) > _MAPPED_SHARDS:
                self._shards.popitem(last=False)
        return shard

    def write_shard(self, j: int, values: np.ndarray, offsets: np.ndarray,
                    indices: np.ndarray | None) -> None:
        """Store shard ``j``'s arrays as their files' types, then list it in the manifest (after
        its files: a build killed in between builds the shard again)."""
        arrays = {"values": values.astype(_DTYPES[self.dtype]),
                  "offsets": offsets.astype(_OFFSET_DTYPE)}
        if indices is not None:
            arrays["indices"] = indices.astype(_INDEX_DTYPE)
        sums = {}
        for name, file in self.files(j).items():
            data = np.ascontiguousarray(arrays[name]).tobytes()
            write_atomic(file, lambda f, data=data: f.write(data))
            sums[name] = hashlib.sha256(data).hexdigest()
        self.manifest["shards"].append({"samples": len(self.samples(j)),
                                        "rows": len(arrays["values"]), "sha256": sums})
        _write_manifest(self.path, self.manifest)

    def close(self) -> None:
        """Unmap the shards (see :meth:`shard`)."""
        with self._lock:
            self._shards.clear()


def _file_names(top_k: int | None) -> list[str]:
    """The arrays of each shard."""
    return ["values", "offsets"] + (["indices"] if top_k is not None else [])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / _MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path} is not a teacher cache (no {_MANIFEST})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{file} cannot be read ({error}); delete {path} and build it "
                                "again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CorruptCacheError(f"{file} is not a {_FORMAT} manifest")
    _check_manifest(file, manifest)
    return manifest


def _check_manifest(file: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`CorruptCacheError` unless ``manifest`` holds every field the cache reads,
    each of the right type."""

    def need(where: Mapping[str, Any], name: str, ok: Callable[[Any], bool],
             what: str = "") -> None:
        if name not in where or not ok(where[name]):
            found = repr(where[name])[:60] if name in where else "missing"
            raise CorruptCacheError(f"{file}: {what}{name} is {found}, not as a cache needs it; "
                                    f"delete {file.parent} and build it again")

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
    if "collate" in key:  # absent from caches built before it was keyed (stale, not corrupt)
        need(key, "collate", is_str, "key.")
    need(manifest, "num_samples", is_int)
    need(manifest, "shard_size", lambda v: is_int(v, 1))
    need(manifest, "token_level", lambda v: v is None or isinstance(v, bool))
    need(manifest, "vocab_size", lambda v: v is None or is_int(v, 1))
    num_shards = math.ceil(manifest["num_samples"] / manifest["shard_size"])
    need(manifest, "shards", lambda v: isinstance(v, list) and len(v) <= num_shards
         and all(isinstance(entry, dict) for entry in v))
    names = _file_names(key["top_k"])
    for j, entry in enumerate(manifest["shards"]):
        need(entry, "samples", is_int, f"shards[{j}].")
        need(entry, "rows", is_int, f"shards[{j}].")
        need(entry, "sha256", lambda v: isinstance(v, dict)
             and all(is_str(v.get(name)) for name in names), f"shards[{j}].")


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1).encode()
    write_atomic(path / _MANIFEST, lambda f: f.write(text))

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
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import hashlib
import json
import math
import os
import site
import sys
import sysconfig
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, default_collate
from tqdm.auto import tqdm

from pykd._batches import (
    IndexedBatch,
    call_model,
    floating_dtype,
    loader_like,
    logits_and_hidden,
    parse_batch,
    rebuildable,
    split_batch,
    to_device,
    token_positions,
)
from pykd.checkpoint import PathLike, write_atomic

_FORMAT = "pykd.teacher_cache/1"
_MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_INDEX_DTYPE = np.int32
_OFFSET_DTYPE = np.int64
# Shards kept memory-mapped at once (each holds a file handle per array); the least recently
# used one is unmapped beyond this.
_MAPPED_SHARDS = 8
# How far a collate fingerprint walks: a collate function holding more is refused (the caller
# names a key instead) rather than keyed by the part that was walked.
_WALK_DEPTH = 64
_WALK_OBJECTS = 50_000


class CacheError(RuntimeError):
    """A teacher cache cannot be used."""


class StaleCacheError(CacheError):
    """The cache was built for other teacher weights, data or settings."""


class CorruptCacheError(CacheError):
    """A cache file does not hold what its manifest says."""


@dataclasses.dataclass
class TopKRows:
    """A teacher given by its top-k logits per row, no probability mass elsewhere (the input of
    :func:`pykd.functional.distillation_loss_topk`)."""

    index: torch.Tensor  # (*, k) int64 vocabulary indices
    logits: torch.Tensor  # (*, k)

    def argmax(self) -> torch.Tensor:
        return self.index.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)


# ----------------------------------------------------------------------------- fingerprints


def _hash_value(h: Any, value: Any) -> None:
    """Feed a nested value of tensors, arrays, containers and scalars to ``h``, unambiguously."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        h.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        h.update(f"array {value.dtype.str} {value.shape};".encode())
        h.update(np.ascontiguousarray(value).view(np.uint8))
    elif isinstance(value, Mapping):
        h.update(f"map {len(value)};".encode())
        for key in sorted(value, key=str):
            _hash_value(h, str(key))
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"seq {len(value)};".encode())
        for item in value:
            _hash_value(h, item)
    elif isinstance(value, (str, bytes, int, float, bool)) or value is None:
        text = repr(value).encode()
        h.update(f"{type(value).__name__} {len(text)};".encode() + text)
    else:
        raise TypeError(f"cannot fingerprint a {type(value).__name__} in the data; items must "
                        "hold tensors, arrays, containers and plain scalars")


def fingerprint_model(model: nn.Module) -> str:
    """sha256 of a model's class and ``state_dict`` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    _hash_value(h, list(model.state_dict().items()))
    return h.hexdigest()


def fingerprint_data(dataset: Dataset) -> str:
    """sha256 of the model inputs of every item of a map-style dataset, in order.

    Labels and sample weights are left out (see :func:`pykd._batches.split_batch`): the
    teacher's outputs do not depend on them.
    """
    h = hashlib.sha256(f"items {len(dataset)};".encode())
    for i in range(len(dataset)):
        _hash_value(h, split_batch(dataset[i])[0])
    return h.hexdigest()


def fingerprint_collate(collate_fn: Callable[[list[Any]], Any] | None) -> str:
    """A key for a collate function that is the same across runs, and changes with what it does.

    It is the function's qualified name and the sha256 of its code and of every value it holds:

    - code written outside the installed libraries (the standard library, site-packages) by its
      bytecode, constants, names and nested code, never its file, line numbers or module name (a
      script run as ``__main__`` and the same script imported have one key), with the module
      globals it reads; installed code by its module and name, since its version decides it;
    - closure cells, defaults and keyword-only defaults, a ``functools.partial``'s function,
      arguments and keywords, a bound method's function and instance;
    - a callable object's class and state, the state of the objects it holds in turn: the
      state pickling would save (``__dict__`` and ``__slots__`` of plain classes); tensors,
      arrays and plain data by value (as in :func:`fingerprint_data`).

    ``None`` (a DataLoader's default) is :func:`torch.utils.data.default_collate`.

    Raises:
        CacheError: the function holds something without a stable representation (a lock, an
            open file, an object that cannot be pickled), or too much to walk; pass the cache an
            explicit ``collate_key`` then.
    """
    if collate_fn is None or collate_fn is default_collate:
        return _DEFAULT_COLLATE
    walk = _Walk()
    try:
        walk.value(collate_fn, "collate_fn")
    except _Unknowable as error:
        raise CacheError(
            f"cannot fingerprint the collate function for the teacher cache's key: {error}; "
            "pass collate_key='<a name for it>' to TeacherCache.build and to attach instead (and "
            "change it whenever the collate function changes)"
        ) from None
    return f"{_label(collate_fn)} sha256:{walk.h.hexdigest()}"


_DEFAULT_COLLATE = "torch.utils.data.default_collate"  # not its private module, which may move
# Callables implemented in C: known by name (and the object a bound one belongs to).
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType,
                      types.MethodWrapperType, types.WrapperDescriptorType,
                      types.ClassMethodDescriptorType)
_PLAIN = (type(None), bool, int, float, str, bytes)


class _Unknowable(Exception):
    """A value a collate fingerprint cannot stand for."""

    def __init__(self, where: str, what: str) -> None:
        if len(where) > 160:  # deep down a nested value: its start and its end say where
            where = f"{where[:70]}...{where[-70:]}"
        super().__init__(f"{where} is {what}")


class _Walk:
    """Feeds a callable's code and the values it holds, depth first, to a sha256.

    Every item is self-delimiting (length-prefixed tokens, :func:`_hash_value`'s own framing), so
    two different walks never feed the same bytes.
    """

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.objects = 0
        self.active: dict[int, int] = {}  # id -> depth of the values being walked (cycles)
        # Digests of the functions and classes walked: a helper used from many places is walked
        # once. Each is kept with its object, so that its id is not reused meanwhile.
        self.code: dict[int, tuple[Any, bytes]] = {}

    def token(self, text: str) -> None:
        data = text.encode()
        self.h.update(f"{len(data)}:".encode() + data)

    def value(self, value: Any, where: str) -> None:
        self.objects += 1
        if self.objects > _WALK_OBJECTS or len(self.active) > _WALK_DEPTH:
            raise _Unknowable(where, f"past what a fingerprint walks (more than {_WALK_DEPTH} "
                                     f"levels deep or {_WALK_OBJECTS} objects in all)")
        kind = type(value)
        if kind in _PLAIN or isinstance(value, (torch.Tensor, np.generic)) or (
                isinstance(value, np.ndarray) and not value.dtype.hasobject):
            self.token("data")
            try:
                _hash_value(self.h, value)
            except (TypeError, RuntimeError) as error:  # a sparse or a meta tensor, say
                raise _Unknowable(where, f"a {_type_name(kind)} ({error})") from None
        elif kind in (complex, type(Ellipsis)):
            self.token(f"{kind.__name__} {value!r}")
        elif value is default_collate:
            self.token(_DEFAULT_COLLATE)
        elif isinstance(value, types.ModuleType):
            self.token(f"module {value.__name__}")
        elif isinstance(value, _BUILTIN_CALLABLES):
            self.token(f"builtin {getattr(value, '__module__', None)}.{value.__qualname__}")
            owner = getattr(value, "__self__", None)
            if owner is not None and not isinstance(owner, (types.ModuleType, type)):
                self.value(owner, f"{where}.__self__")
        elif id(value) in self.active:  # a value that holds itself, or a recursive function
            self.token(f"cycle {len(self.active) - self.active[id(value)]}")
        else:
            self.active[id(value)] = len(self.active)
            try:
                self._compound(value, where)
            finally:
                del self.active[id(value)]

    def _compound(self, value: Any, where: str) -> None:
        kind = type(value)
        if isinstance(value, (types.FunctionType, type)):
            self.h.update(self._code_digest(value, where))
        elif isinstance(value, types.MethodType):
            self.token("method")
            self.value(value.__func__, f"{where}.__func__")
            self.value(value.__self__, f"{where}.__self__")
        elif isinstance(value, functools.partial):
            self.token("partial")
            self.value(kind, f"type of {where}")
            self.value(value.func, f"{where}.func")
            self.value(value.args, f"{where}.args")
            self.value(value.keywords, f"{where}.keywords")
            self.value(getattr(value, "__dict__", None), f"{where}.__dict__")
        elif kind in (list, tuple):
            self.token(f"{kind.__name__} {len(value)}")
            for i, item in enumerate(value):
                self.value(item, f"{where}[{i}]")
        elif kind is dict:
            # In the order of the keys' digests: the same dict built in another order (from a
            # set, whose order changes with the hash seed) has the same fingerprint.
            self.token(f"dict {len(value)}")
            for digest, key in sorted(((self._digest(key, f"a key of {where}"), key)
                                       for key in value), key=lambda pair: pair[0]):
                self.h.update(digest)
                self.value(value[key], f"{where}[{_short(key)}]")
        elif isinstance(value, (set, frozenset)):
            self.token(f"set {len(value)}")
            self.value(kind, f"type of {where}")
            for digest in sorted(self._digest(item, f"an element of {where}") for item in value):
                self.h.update(digest)
        elif isinstance(value, np.ndarray):  # of Python objects: their values
            self.token(f"object array {value.shape}")
            self.value(value.tolist(), where)
        else:
            self._object(value, where)

    def _digest(self, value: Any, where: str) -> bytes:
        """The digest of ``value`` alone (walked into a hash of its own)."""
        outer, self.h = self.h, hashlib.sha256()
        try:
            self.value(value, where)
            return self.h.digest()
        finally:
            self.h = outer

    def _code_digest(self, code: types.FunctionType | type, where: str) -> bytes:
        known = self.code.get(id(code))
        if known is None:
            outer, self.h = self.h, hashlib.sha256()
            try:
                if isinstance(code, type):
                    self._class(code, where)
                else:
                    self._function(code, where)
                known = self.code[id(code)] = (code, self.h.digest())
            finally:
                self.h = outer
        return known[1]

    def _function(self, fn: types.FunctionType, where: str) -> None:
        if _installed(fn.__module__):
            self.token(f"function {fn.__module__}.{fn.__qualname__}")
        else:
            self.token("function")
            self._code(fn.__code__, where)
            # Names it reads from its module: a constant, a helper function or class, a
            # tokenizer. Builtins it reads are in its code's names already.
            for name in _globals_read(fn.__code__):
                if name in fn.__globals__:
                    self.token(f"global {name}")
                    self.value(fn.__globals__[name], f"{where}.__globals__[{name!r}]")
        # What it holds, whoever wrote it (a library's factory closes over the caller's values).
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.token(f"cell {name}")
            try:
                contents = cell.cell_contents
            except ValueError:  # not assigned yet
                self.token("empty")
            else:
                self.value(contents, f"{where}.__closure__[{name!r}]")
        self.value(fn.__defaults__, f"{where}.__defaults__")
        self.value(fn.__kwdefaults__, f"{where}.__kwdefaults__")

    def _code(self, code: types.CodeType, where: str) -> None:
        self.token(f"code {code.co_argcount} {code.co_posonlyargcount} "
                   f"{code.co_kwonlyargcount} {code.co_flags}")
        self.h.update(f"{len(code.co_code)}:".encode() + code.co_code)
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            self.token(" ".join(names))
        self.token(f"constants {len(code.co_consts)}")
        for const in code.co_consts:
            if isinstance(const, types.CodeType):  # a nested function, lambda or comprehension
                self._code(const, where)
            else:
                self.value(const, f"a constant of {where}")

    def _class(self, cls: type, where: str) -> None:
        if _installed(cls.__module__):
            self.token(f"class {cls.__module__}.{cls.__qualname__}")
            return
        self.token(f"class {cls.__qualname__}")
        self.value(cls.__bases__, f"{where}.__bases__")
        for name in sorted(cls.__dict__):
            attr = cls.__dict__[name]
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = (attr.fget, attr.fset, attr.fdel)
            elif (name.startswith("__") and name.endswith("__") and not isinstance(
                    attr, types.FunctionType)) or name == "_abc_impl" or isinstance(
                    attr, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                # Bookkeeping, not behaviour: __module__ (which differs between a script run
                # as __main__ and the same script imported), __firstlineno__, dataclass fields
                # (the instances hold their values), an ABC's registry; slots and __dict__ are
                # the instances' state, walked with them.
                continue
            self.token(f"attribute {name}")
            self.value(attr, f"{cls.__qualname__}.{name}")

    def _object(self, value: Any, where: str) -> None:
        """An object by its class and the state pickling would save: ``__dict__`` and
        ``__slots__`` of a plain class, what a class that pickles itself says it is made of."""
        self.value(type(value), f"type of {where}")
        try:
            reduced = value.__reduce_ex__(4)
        except Exception as error:  # a lock, an open file, a generator: pickle refuses them too
            raise _Unknowable(where, f"a {_type_name(type(value))}, which has no stable "
                                     f"representation ({error})") from None
        if isinstance(reduced, str):  # pickled by name: a module-level singleton, say
            self.token(f"global {reduced}")
            wrapped = getattr(value, "__wrapped__", None)  # of functools.lru_cache: its function
            if wrapped is not None:
                self.value(wrapped, f"{where}.__wrapped__")
            return
        make, args, state, items, entries = (*reduced, None, None, None)[:5]
        self.value(make, f"{where} (how it is made)")
        self.value(args, f"{where} (its arguments)")
        parts = (state if isinstance(state, tuple) and len(state) == 2
                 and all(part is None or type(part) is dict for part in state) else (state,))
        for part in parts:  # (__dict__, __slots__) of a plain class with slots
            if type(part) is dict and all(isinstance(name, str) for name in part):
                self.token(f"attributes {len(part)}")
                for name in sorted(part):
                    self.token(name)
                    self.value(part[name], f"{where}.{name}")
            else:
                self.value(part, f"{where} (its state)")
        self.value(None if items is None else list(items), f"{where} (its items)")
        self.value(None if entries is None else list(entries), f"{where} (its entries)")


def _label(fn: Any) -> str:
    """A readable name for the key (no module name: see :func:`fingerprint_collate`)."""
    if isinstance(fn, functools.partial):
        return f"partial({_label(fn.func)})"
    if isinstance(fn, types.MethodType):
        return _label(fn.__func__)
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _globals_read(code: types.CodeType) -> list[str]:
    """The global names ``code`` and the code nested in it load."""
    names = {op.argval for op in dis.get_instructions(code)
             if op.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_globals_read(const))
    return sorted(names)


_INSTALLED: dict[str, bool] = {}


def _installed(module: str | None) -> bool:
    """Whether ``module`` is installed code (built in, frozen, the standard library or
    site-packages), whose version decides what it does; not a script, a notebook's ``__main__``
    or a project's own source."""
    if module in _INSTALLED:
        return _INSTALLED[module]
    loaded = sys.modules.get(module) if module else None
    if loaded is None:  # code from no importable module (exec'd, say): walked
        return False
    spec = getattr(loaded, "__spec__", None)
    file = getattr(loaded, "__file__", None)
    if module in sys.builtin_module_names or getattr(spec, "origin", None) == "frozen":
        installed = True
    elif file is None:  # a notebook's or a REPL's __main__
        installed = False
    else:
        path = os.path.realpath(file)
        installed = any(path.startswith(root + os.sep) for root in _library_roots())
    _INSTALLED[module] = installed
    return installed


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(getattr(site, "getsitepackages", list)())
    roots.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(root) for root in roots))


def _collate_key(collate_fn: Callable[[list[Any]], Any] | None, collate_key: str | None) -> str:
    """The cache key's entry for the collate function: its fingerprint, or the caller's name."""
    if collate_key is None:
        return fingerprint_collate(collate_fn)
    if not isinstance(collate_key, str) or not collate_key.strip():
        raise ValueError(f"collate_key must be a non-empty string, got {collate_key!r}")
    return f"collate_key={collate_key}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- the cache


@dataclasses.dataclass
class _Shard:
    values: np.ndarray  # [rows, width]
    indices: np.ndarray | None  # [rows, k]
    offsets: np.ndarray  # [samples + 1]


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
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        # Floating inputs take the teacher's dtype (float32 data into a bfloat16 teacher).
        float_dtype = floating_dtype(teacher)
        was_training = teacher.training
        teacher.eval()
        try:
            first = len(cache._manifest["shards"])
            for j in tqdm(range(first, cache.num_shards), desc="teacher cache", unit="shard",
                          disable=not progress):
                cache._build_shard(j, teacher, dataset, batch_size, collate_fn, device,
                                   float_dtype)
                if on_shard is not None:
                    on_shard(j)
        finally:
            teacher.train(was_training)
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
            self._check_shard(j)

    def close(self) -> None:
        """Unmap the shards, closing their files (once no lookup still copies from them); a
        later lookup maps what it needs again."""
        with self._lock:
            self._shards.clear()

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
            shard = self._shard(j)
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
        out = torch.zeros(*mask.shape, self._width(), dtype=_torch_dtype(self.dtype))
        out[mask] = _stacked(values)
        out_index = None
        if indices:
            # Off the positions: k distinct classes with equal logits, a harmless uniform row.
            out_index = torch.arange(self.top_k).expand(*mask.shape, self.top_k).clone()
            out_index[mask] = _stacked(indices).long()
        return out, out_index

    # ------------------------------------------------------------------------------ shards

    def _width(self) -> int:
        return self.top_k if self.top_k is not None else self.vocab_size

    def _files(self, j: int) -> dict[str, Path]:
        return {name: self.path / f"shard-{j:05d}.{name}" for name in _file_names(self.top_k)}

    def _layout(self, j: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """dtype and shape of each file of finished shard ``j``."""
        entry = self._manifest["shards"][j]
        rows, samples = entry["rows"], entry["samples"]
        layout = {"values": (_DTYPES[self.dtype], (rows, self._width())),
                  "offsets": (_OFFSET_DTYPE, (samples + 1,))}
        if self.top_k is not None:
            layout["indices"] = (_INDEX_DTYPE, (rows, self.top_k))
        return layout

    def _check_shard(self, j: int) -> None:
        """Check the files of finished shard ``j`` against their sizes and checksums."""
        entry = self._manifest["shards"][j]
        for name, file in self._files(j).items():
            dtype, shape = self._layout(j)[name]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not file.exists() or file.stat().st_size != size:
                raise CorruptCacheError(f"{file} is missing or has the wrong size (expected "
                                        f"{size} bytes); delete {self.path} and build it again")
            if _sha256_file(file) != entry["sha256"][name]:
                raise CorruptCacheError(f"{file} does not match its checksum: the cache is "
                                        f"corrupted; delete {self.path} and build it again")
        self._verified.add(j)

    def _shard(self, j: int) -> _Shard:
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
                    self._check_shard(j)
        arrays: dict[str, np.ndarray] = {}
        for name, file in self._files(j).items():
            dtype, shape = self._layout(j)[name]
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

    @torch.no_grad()
    def _build_shard(self, j: int, teacher: nn.Module, dataset: Dataset, batch_size: int,
                     collate_fn: Callable[[list[Any]], Any] | None, device: torch.device,
                     float_dtype: torch.dtype | None) -> None:
        start = j * self.shard_size
        stop = min(start + self.shard_size, self.num_samples)
        options = {} if collate_fn is None else {"collate_fn": collate_fn}
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, **options)
        values, indices, counts = [], [], []
        for raw in loader:
            batch = parse_batch(to_device(raw, device, float_dtype))
            logits, _ = logits_and_hidden(call_model(teacher, batch.inputs, {}))
            rows, count = self._rows(logits, batch)
            counts.append(count.cpu())
            if self.top_k is not None:
                top = rows.float().topk(self.top_k, dim=-1)
                values.append(top.values)
                indices.append(top.indices.to(torch.int32))
            else:
                values.append(rows)
        arrays = {"values": torch.cat(values).float().cpu().numpy().astype(_DTYPES[self.dtype]),
                  "offsets": np.concatenate([[0], torch.cat(counts).cumsum(0).numpy()])
                  .astype(_OFFSET_DTYPE)}
        if indices:
            arrays["indices"] = torch.cat(indices).cpu().numpy().astype(_INDEX_DTYPE)
        sums = {}
        for name, file in self._files(j).items():
            data = np.ascontiguousarray(arrays[name]).tobytes()
            write_atomic(file, lambda f, data=data: f.write(data))
            sums[name] = hashlib.sha256(data).hexdigest()
        self._manifest["shards"].append({"samples": stop - start,
                                         "rows": len(arrays["values"]), "sha256": sums})
        _write_manifest(self.path, self._manifest)

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


def _file_names(top_k: int | None) -> list[str]:
    """The arrays of each shard."""
    return ["values", "offsets"] + (["indices"] if top_k is not None else [])


def _stacked(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays))


def _torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "float32": torch.float32}[name]


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

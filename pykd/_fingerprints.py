"""Fingerprints of what a teacher cache's outputs depend on: the teacher's weights, the data's
model inputs and the collate function that batched them.

Each is the same across processes and runs (no ids, no hash seeds, no file paths), and changes
with what it stands for; the cache's key holds them (see :mod:`pykd.cache`), so they must stay
byte-identical from one version to the next, or every cache built before goes stale.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from pykd._batches import split_batch
from pykd._cache_errors import CacheError

# How far a collate fingerprint walks: a collate function holding more is refused (the caller
# names a key instead) rather than keyed by the part that was walked.
_WALK_DEPTH = 64
_WALK_OBJECTS = 50_000


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

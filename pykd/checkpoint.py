"""Checkpoint files: written atomically, loaded as data only, with the RNG states to resume."""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]


def _current_umask() -> int:
    # The umask can only be read by setting it: done once, at import, so that the moment it is
    # 0 (which another thread creating files would see) is as short and early as it can be.
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp creates files readable by their owner only; a checkpoint or cache file gets the mode a
# plain open() would give it.
_FILE_MODE = 0o666 & ~_current_umask()


def _temp_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of ``path``'s temporary files (``.{name}.XXXXXXXX.tmp``)."""
    return f".{path.name}.", ".tmp"


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash at any point leaves the old file or the new one.

    ``write(f)`` fills a temporary file in the same folder (so the rename cannot cross file
    systems), which is flushed and fsynced and then replaces ``path`` with ``os.replace``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # not on Windows, where files have no such mode bits
                os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`write_atomic`), first removing what
    earlier writes of ``path`` killed midway left (see :func:`remove_stale_temporaries`)."""
    remove_stale_temporaries(path)
    write_atomic(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete the temporary files of writes of ``path`` that were killed midway.

    A killed process runs no cleanup, so its temporary file (as large as the checkpoint) stays.
    Only names ``mkstemp`` gives ``path``'s own temporaries match: its random part has no dot, so
    the temporaries of ``path.name + ".x"`` are kept. A write of ``path`` in progress elsewhere
    would lose its file too: call this only where one process writes ``path``.
    """
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    own = re.compile(re.escape(prefix) + r"[a-z0-9_]+" + re.escape(suffix))
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if own.fullmatch(entry.name):
            entry.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checked(path: PathLike, required: Iterable[str]) -> dict[str, Any]:
    """Load a checkpoint as plain data (``weights_only=True``) and check its top-level keys.

    Raises:
        ValueError: the file is not a dict or lacks one of ``required``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: a checkpoint must hold a dict, got {type(state).__name__}")
    missing = sorted(set(required) - state.keys())
    if missing:
        raise ValueError(f"{path}: not a pykd checkpoint, missing keys {missing}")
    return state


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python ``random`` and NumPy global RNG states, as plain data."""
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses: store plain ints.
        "numpy": {"key": key, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["key"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))

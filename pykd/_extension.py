"""Loads the compiled extension ``pykd._C``, which registers ``torch.ops.pykd.*``.

Importing pykd never fails because of the extension: a missing or stale build is reported with a
warning at import and a RuntimeError, saying how to rebuild, when an op is used.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REBUILD_HINT = (
    "Rebuild pykd against the installed torch, from the pykd source folder: "
    "pip install torch numpy scikit-build-core pybind11 cmake ninja && "
    "pip install --no-build-isolation --force-reinstall --no-deps ."
)


def _torch_version() -> str:
    return str(torch.__version__)


def _source_tree_hint() -> str:
    """A source checkout on sys.path (python run from its root) shadows the installed package."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists() and (root / "csrc").is_dir():
        return (
            f" This pykd was imported from the source folder {root / 'pykd'}, which holds no "
            "compiled extension: run Python from outside the checkout (or `pip install -e`)."
        )
    return ""


def _load() -> tuple[ModuleType | None, dict[str, Any], str | None]:
    try:
        info_text = resources.files("pykd").joinpath("_build_info.json").read_text()
        info: dict[str, Any] = json.loads(info_text)
    except (OSError, ValueError) as exc:
        return None, {}, (
            f"pykd's compiled extension is missing ({exc}).{_source_tree_hint()} {REBUILD_HINT}"
        )
    # Checked before loading: there is no ABI check, and a build for another torch can crash.
    if info.get("torch_version") != _torch_version():
        return None, info, (
            f"pykd._C was built against torch {info.get('torch_version')} but torch "
            f"{_torch_version()} is installed. {REBUILD_HINT}"
        )
    try:
        from pykd import _C
    except ImportError as exc:
        return None, info, f"pykd._C could not be loaded ({exc}). {REBUILD_HINT}"
    return _C, dict(_C.build_info()), None


_C, _INFO, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(LOAD_ERROR, RuntimeWarning, stacklevel=2)


def require_extension() -> None:
    """Raise a RuntimeError that says how to rebuild if the compiled ops are not available."""
    if LOAD_ERROR is not None:
        raise RuntimeError(LOAD_ERROR)


def build_info() -> dict[str, Any]:
    """Versions and kernels of the compiled extension.

    Keys: ``version``, ``torch_version`` (the torch it was built against), ``cpu_isas`` (CPU
    instruction sets compiled), ``cpu_kernel`` (the one in use), ``cuda`` and ``cuda_archs``;
    ``loaded`` says whether the ops are usable and ``error`` why not.

    >>> import pykd
    >>> pykd.build_info()["loaded"]
    True
    """
    return {**_INFO, "loaded": LOAD_ERROR is None, "error": LOAD_ERROR}

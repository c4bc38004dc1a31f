import os
import sys

import pytest
import torch

# tests/ holds reference.py; the repository root is deliberately not put on sys.path, so the
# installed pykd (with its compiled _C) is the one imported, never the source folder.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import pykd

    return f"pykd build: {pykd.build_info()}"

"""Building pykd the way most users try first: a plain `pip install .`, whose isolated build
environment has no torch, must stop at configure time with one line saying what to do."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_configure_without_torch_says_to_install_it_and_skip_build_isolation(tmp_path):
    # A Python without torch, as in pip's isolated build environment.
    venv.create(tmp_path / "env", with_pip=False)
    python = tmp_path / "env" / "bin" / "python"
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    run = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}",
         "-DSKBUILD_PROJECT_VERSION=0.0.0"],
        capture_output=True, text=True, timeout=300)
    said = run.stdout + run.stderr
    assert run.returncode != 0
    assert "torch is not importable" in said and "--no-build-isolation" in said, said
    assert "Traceback" not in said and "AttributeError" not in said

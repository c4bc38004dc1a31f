import os
import sys
import warnings
from importlib import resources

import pytest
import torch

# tests/ holds reference.py; the repository root is deliberately not put on sys.path, so the
# installed pykd (with its compiled _C) is the one imported, never the source folder.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def extension_problem(load_error: str | None, package_dir: str, built: bool, cpu_kernel: str,
                      forced_capability: str) -> str | None:
    """Why the suite cannot run, in one line, or None.

    Without the compiled ops every op test would fail on its own with the same error; one line up
    front says what to do instead. ``python -m pytest`` from the checkout is the usual cause: it
    puts the checkout first on sys.path, so its pykd/ source folder (no _C) shadows the installed
    package. An editable install has no such problem (it maps pykd._C to its build folder).
    """
    if load_error is not None:
        checkout = os.path.exists(os.path.join(os.path.dirname(package_dir), "pyproject.toml"))
        if checkout and not built:
            return (f"pykd was imported from the source folder {package_dir}, which has no "
                    "compiled extension: run `pytest` (not `python -m pytest`) from the checkout, "
                    "or install with `pip install --no-build-isolation -e .`")
        return f"pykd's compiled ops are not usable: {load_error}"
    # ATEN_CPU_CAPABILITY picks ATen's CPU kernels and pykd's alike (CI runs the op tests once per
    # capability): a run that asked for one of pykd's kernels must not silently test another.
    forced = forced_capability.lower()
    if forced in ("default", "avx2", "avx512") and cpu_kernel != forced.upper():
        return f"ATEN_CPU_CAPABILITY={forced_capability} but pykd runs its {cpu_kernel} kernel"
    return None


def pytest_configure(config):
    with warnings.catch_warnings():  # pykd warns at import; the exit line below says it instead
        warnings.simplefilter("ignore", RuntimeWarning)
        import pykd._extension as ext

    problem = extension_problem(
        ext.LOAD_ERROR,
        os.path.dirname(os.path.abspath(ext.__file__)),
        # Looked up as pykd looks it up: an editable install finds it in its build folder.
        resources.files("pykd").joinpath("_build_info.json").is_file(),
        ext.build_info().get("cpu_kernel", ""),
        os.environ.get("ATEN_CPU_CAPABILITY", ""),
    )
    if problem is not None:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_report_header(config):
    import pykd

    return f"pykd build: {pykd.build_info()}"

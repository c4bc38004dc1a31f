"""The suite's up-front checks (tests/conftest.py): one clear line instead of every op test
failing on its own when the compiled ops are missing or are not the kernel a run asked for."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "pykd_tests_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)
problem = conftest.extension_problem


def test_source_folder_without_extension_says_what_to_run(tmp_path):
    # `python -m pytest` from a checkout whose pykd was installed non-editable.
    (tmp_path / "pyproject.toml").write_text("")
    source = str(tmp_path / "pykd")
    said = problem("pykd's compiled extension is missing", source, False, "", "")
    assert said is not None and "\n" not in said
    assert source in said and "run `pytest` (not `python -m pytest`)" in said


def test_other_load_errors_are_passed_on(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")  # editable: built, but for another torch
    said = problem("pykd._C was built against torch 2.6", str(tmp_path / "pykd"), True, "", "")
    assert said == "pykd's compiled ops are not usable: pykd._C was built against torch 2.6"
    installed = str(tmp_path / "site-packages" / "pykd")
    assert "python -m pytest" not in problem("missing", installed, False, "", "")


@pytest.mark.parametrize("forced, kernel, ok", [
    ("", "AVX512", True),
    ("avx2", "AVX2", True),
    ("AVX512", "AVX512", True),
    ("default", "DEFAULT", True),
    ("avx512", "AVX2", False),  # the forced kernel is not the one under test
    ("default", "AVX2", False),
    ("sve256", "DEFAULT", True),  # not one of pykd's kernels: nothing to compare
])
def test_forced_cpu_capability_must_be_the_kernel_in_use(forced, kernel, ok):
    said = problem(None, "/site-packages/pykd", True, kernel, forced)
    assert (said is None) == ok, said
    if not ok:
        assert f"ATEN_CPU_CAPABILITY={forced}" in said and kernel in said


def test_this_run_passed_the_checks():
    import pykd

    assert pykd.build_info()["loaded"]
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced in ("default", "avx2", "avx512"):
        assert pykd.build_info()["cpu_kernel"] == forced.upper()

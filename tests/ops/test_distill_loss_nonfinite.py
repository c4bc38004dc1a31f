"""Non-finite inputs and huge magnitudes: the rules of docs/loss.md ("Non-finite values").

These run under whichever CPU kernel the process uses; tests/ops/test_cpu_kernels_agree.py runs
the same cases under every kernel the machine has and checks that they agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import SOFTMAX_DIVERGENCES, nonfinite_rows, reference_loss
from test_distill_loss import DEVICES

import pykd

DIVERGENCES = ["kl", "reverse_kl", "jsd", "mse", "cosine"]
NAN, INF = float("nan"), float("inf")


def poisoned_case(V, dtype, device, *, who, value, where, rows=5):
    """Random rows with `value` written into row 1 of `who` at `where` ('one' column or 'all')."""
    s = torch.randn(rows, V, dtype=torch.float64).mul(3).to(dtype).to(device)
    t = torch.randn(rows, V, dtype=torch.float64).mul(3).to(dtype).to(device)
    x = s if who == "student" else t
    if where == "all":
        x[1] = value
    else:
        x[1, V // 2] = value
    return s, t


def run(s, t, y, **opts):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = pykd.distillation_loss(s, t, target=y, reduction="none", **opts)
    out.sum().backward()
    return out, s.grad, t.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [37, 5000])  # scalar tails only / vector bodies over three chunks
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_and_inf_follow_the_rule_and_leave_other_rows_alone(divergence, V, dtype, device):
    for who, value, where, hard in itertools.product(("student", "teacher"), (NAN, INF, -INF),
                                                     ("one", "all"), (False, True)):
        if value == -INF and where == "all" and (divergence in SOFTMAX_DIVERGENCES
                                                 or (hard and who == "student")):
            continue  # a softmax with no finite logit: the value error, tested below
        s, t = poisoned_case(V, dtype, device, who=who, value=value, where=where)
        y = torch.randint(0, V, (s.shape[0],), device=device) if hard else None
        if y is not None and who == "student" and value == -INF:
            y[1] = (V // 2 + 1) % V  # keep the target off the masked column: a finite CE
        opts = dict(divergence=divergence, temperature=2.0, alpha=0.5 if hard else 1.0)
        out, gs, gt = run(s, t, y, **opts)
        case = (who, value, where, hard)
        bad = nonfinite_rows(s.double().cpu(), t.double().cpu(), divergence, hard)
        assert bad[1] == (value != -INF or divergence not in SOFTMAX_DIVERGENCES), case
        assert torch.equal(torch.isnan(out.cpu()), bad), (case, out)
        for g in (gs, gt):
            assert torch.isnan(g[bad]).all(), case
        # Every other row is exactly what it would be without the poisoned row.
        keep = ~bad.to(device)
        ref, ref_gs, ref_gt = run(s[keep], t[keep], None if y is None else y[keep], **opts)
        # (equal_nan: a column masked on one side only can make the loss infinite, and then a
        # gradient is not finite either, with or without the poisoned row)
        torch.testing.assert_close(out[keep], ref)
        torch.testing.assert_close(gs[keep], ref_gs, equal_nan=True)
        torch.testing.assert_close(gt[keep], ref_gt, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_an_all_nan_row_is_a_nan_loss_not_an_error(divergence, reduction, device):
    s, t = poisoned_case(64, torch.float32, device, who="student", value=NAN, where="all")
    y = torch.randint(0, 64, (s.shape[0],), device=device)
    for target, alpha in ((None, 1.0), (y, 0.3)):
        out = pykd.distillation_loss(s, t, target=target, alpha=alpha, divergence=divergence,
                                     reduction=reduction)
        assert torch.isnan(out), (target is not None, out)


def test_ignored_rows_are_never_read():
    s, t = poisoned_case(40, torch.float32, "cpu", who="student", value=NAN, where="all")
    t[3] = INF
    y = torch.randint(0, 40, (s.shape[0],))
    y[1] = y[3] = -100
    out, gs, gt = run(s, t, y, divergence="kl", alpha=0.5)
    assert torch.isfinite(out).all() and out[1] == 0 and out[3] == 0
    assert (gs[[1, 3]] == 0).all() and (gt[[1, 3]] == 0).all()


def test_an_all_minus_inf_row_is_still_a_value_error_on_cpu():
    s, t = poisoned_case(40, torch.float32, "cpu", who="teacher", value=-INF, where="all")
    with pytest.raises(RuntimeError, match="no finite logit"):
        pykd.distillation_loss(s, t, divergence="kl")


def test_masked_entries_give_the_exact_infinite_loss_with_finite_student_gradients():
    s, t = poisoned_case(30, torch.float32, "cpu", who="student", value=-INF, where="one")
    out, gs, gt = run(s, t, None, divergence="kl")
    assert out[1] == INF and torch.isfinite(out[[0, 2, 3, 4]]).all()
    assert torch.isfinite(gs).all()
    assert not torch.isfinite(gt[1]).all() and torch.isfinite(gt[[0, 2, 3, 4]]).all()
    y = torch.full((5,), 15)  # the masked column of row 1
    out, gs, _ = run(s, t, y, divergence="reverse_kl", alpha=0.5)
    assert out[1] == INF and torch.isfinite(gs).all()
    out, gs, gt = run(t, s, None, divergence="reverse_kl")  # now the teacher masks it
    assert out[1] == INF and torch.isfinite(gt).all() and not torch.isfinite(gs[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_follows_the_same_rule(device):
    V, k = 300, 8
    s = torch.randn(4, V, device=device)
    t = torch.randn(4, V, device=device)
    val, idx = t.topk(k, dim=-1)
    s[1, 7] = NAN
    val[2, 0] = INF
    s = s.requires_grad_()
    out = pykd.distillation_loss_topk(s, idx, val, temperature=2.0, reduction="none")
    out.sum().backward()
    assert torch.equal(torch.isnan(out).cpu(), torch.tensor([False, True, True, False]))
    assert torch.isnan(s.grad[1:3]).all() and torch.isfinite(s.grad[[0, 3]]).all()
    s_nan = torch.full((2, V), NAN, device=device)
    assert torch.isnan(pykd.distillation_loss_topk(s_nan, idx[:2], val[:2]))


def scaled_reference(s, t):
    """1 - cos and its gradients in float64, from rows divided by their max |x| first when that
    is above 1 (no float64 overflow at 1e300; cos is scale-free while no norm is clamped), the
    gradients scaled back by the same factor."""
    cs = s.double().abs().amax(-1, keepdim=True).clamp_min(1)
    ct = t.double().abs().amax(-1, keepdim=True).clamp_min(1)
    s0 = (s.double() / cs).requires_grad_(True)
    t0 = (t.double() / ct).requires_grad_(True)
    loss = reference_loss(s0, t0, divergence="cosine", reduction="none")
    loss.sum().backward()
    return loss.detach(), s0.grad / cs, t0.grad / ct


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 1e20), (torch.float32, 1e36), (torch.float32, 1e-30),
    (torch.float64, 1e300), (torch.float64, 1e-300), (torch.bfloat16, 1e30),
])
@pytest.mark.parametrize("V", [37, 4099])
def test_cosine_is_finite_and_accurate_at_huge_and_tiny_magnitudes(V, dtype, scale, device):
    s = (torch.randn(6, V, dtype=torch.float64) * scale).to(dtype).to(device)
    t = (torch.randn(6, V, dtype=torch.float64) * scale).to(dtype).to(device)
    s[2] *= 1e-3  # rows of different scales in one call; one row of very different halves
    s[3, : V // 2] *= 1e-4
    assert torch.isfinite(s).all() and torch.isfinite(t).all()
    out, gs, gt = run(s, t, None, divergence="cosine")
    ref, ref_gs, ref_gt = scaled_reference(s.cpu(), t.cpu())
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    tol = dict(rtol=2e-2, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol["rtol"], atol=1e-6)
    for ours, theirs in ((gs, ref_gs), (gt, ref_gt)):
        # Relative to each row's largest gradient (its size is 1 / |row|).
        size = theirs.abs().amax(-1, keepdim=True)
        err = ((ours.double().cpu() - theirs) / size).abs().max()
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_cosine_clamped_norms_are_unchanged_by_scaling():
    # Rows below the 1e-8 norm clamp: the clamp, not the scaling, decides (as torch does).
    s = torch.randn(3, 20, dtype=torch.float64) * 1e-12
    t = torch.randn(3, 20, dtype=torch.float64)
    t[1] *= 1e-12
    out, gs, gt = run(s, t, None, divergence="cosine")
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ref = reference_loss(s64, t64, divergence="cosine", reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gs, s64.grad, rtol=1e-9, atol=0)
    torch.testing.assert_close(gt, t64.grad, rtol=1e-9, atol=0)


def test_mse_overflow_is_inf_with_a_finite_gradient():
    s = torch.full((2, 8), 1e20)
    t = torch.full((2, 8), -1e20)
    out, gs, _ = run(s, t, None, divergence="mse")
    assert (out == INF).all() and torch.isfinite(gs).all()

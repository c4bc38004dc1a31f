"""Per-row temperature and alpha, and soft-only rows (``soft_index``), on all three loss ops.

Each op is checked against the float64 reference (tests/reference.py) on fresh random inputs
of odd sizes, with -inf entries and large magnitudes, values and gradients; a per-row copy of a
scalar gives the scalar's result to the bit; the rules on bad per-row input are the same in the
C++ op and in the fake kernel (torch.compile, meta).
"""

from __future__ import annotations

import pytest
import torch
from reference import reference_loss

import pykd
from pykd.functional import distillation_loss_topk, fused_linear_distillation_loss

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]),
]
SOFT = -1  # the label of soft-only rows in these tests
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rows(lead, V, dtype, device, *, scale=3.0, masked=False, seed=0):
    """Student, teacher, weights, labels (ignored, soft-only and labelled rows), per-row T and
    alpha, all drawn fresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    if masked:  # -inf entries the softmaxes skip (never the whole row, never a label)
        mask = torch.rand(*lead, V, generator=g) < 0.2
        mask[..., 0] = False
        t = t.masked_fill(mask, float("-inf"))
    y = torch.randint(0, V, lead, generator=g)
    if masked:
        y = torch.zeros_like(y)  # column 0 is never masked in the teacher
    kind = torch.randint(0, 4, lead, generator=g)
    y = torch.where(kind == 0, SOFT, torch.where(kind == 1, -100, y))
    w = torch.rand(lead, generator=g, dtype=torch.float64) + 0.1
    temp = torch.rand(lead, generator=g, dtype=torch.float64) * 3.5 + 0.25
    alpha = torch.rand(lead, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return (s.to(dtype).to(**to), t.to(dtype).to(**to), w.float().to(**to), y.to(**to),
            temp.float().to(**to), alpha.float().to(**to))


def _check(out, grad, ref, ref_grad, dtype):
    tol = TOL[dtype]
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol, atol=tol * scale)
    g_scale = max(1e-12, ref_grad.abs().max().item())
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=tol * 4,
                               atol=tol * 4 * g_scale)


def _reference(s, t, w, y, reduction, **opts):
    s64 = s.detach().cpu().double().requires_grad_(True)
    ref = reference_loss(s64, t.cpu(), w.cpu(), y.cpu(), reduction=reduction,
                         soft_index=SOFT, **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                             for k, v in opts.items()})
    return ref, s64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [((37,), 131), ((3, 5), 2)])
def test_dense_matches_reference(device, dtype, divergence, reduction, shape):
    lead, V = shape
    s, t, w, y, temp, alpha = _rows(lead, V, dtype, device, seed=hash((divergence, V)) % 1000)
    s.requires_grad_(True)
    opts = dict(divergence=divergence, temperature=temp, alpha=alpha)
    out = pykd.distillation_loss(s, t, weight=w, target=y, soft_index=SOFT, reduction=reduction,
                                 **opts)
    go = torch.randn(out.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, s, go.to(out))
    ref, s64 = _reference(s, t, w, y, reduction, **opts)
    (ref_grad,) = torch.autograd.grad(ref, s64, go)
    _check(out, grad, ref, ref_grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_masked_entries_and_large_logits(device, divergence):
    # float32 logits of 1e4 carry an absolute rounding of 1e-3: that size is tested in float64.
    for scale, masked, dtype in ((40.0, False, torch.float32), (3.0, True, torch.float32),
                                 (1e4, False, torch.float64)):
        s, t, w, y, temp, alpha = _rows((29,), 67, dtype, device, scale=scale,
                                        masked=masked and divergence == "kl", seed=7)
        s.requires_grad_(True)
        opts = dict(divergence=divergence, temperature=temp, alpha=alpha)
        out = pykd.distillation_loss(s, t, weight=w, target=y, soft_index=SOFT, **opts)
        (grad,) = torch.autograd.grad(out, s)
        ref, s64 = _reference(s, t, w, y, "mean", **opts)
        (ref_grad,) = torch.autograd.grad(ref, s64)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
        _check(out, grad, ref, ref_grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_matches_the_dense_op_on_its_teacher(device, divergence, k):
    s, t, w, y, temp, alpha = _rows((23,), 40, torch.float32, device, seed=k)
    top = t.topk(k, dim=-1)
    # The dense teacher with the top-k's distribution: -inf off the top-k.
    dense = torch.full_like(t, float("-inf")).scatter(-1, top.indices, top.values)
    opts = dict(weight=w, target=y, soft_index=SOFT, divergence=divergence, temperature=temp,
                alpha=alpha)
    s1 = s.detach().clone().requires_grad_(True)
    s2 = s.detach().clone().requires_grad_(True)
    out = distillation_loss_topk(s1, top.indices, top.values, **opts)
    ref = pykd.distillation_loss(s2, dense, **opts)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_linear_matches_the_dense_op_on_its_logits(device, chunk):
    s, t, w, y, temp, alpha = _rows((2, 21), 53, torch.float64, device, seed=chunk)
    g = torch.Generator().manual_seed(chunk)
    hs = torch.randn(2, 21, 9, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    ht = torch.randn(2, 21, 6, generator=g, dtype=torch.float64).to(device)
    ws = torch.randn(53, 9, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    wt = torch.randn(53, 6, generator=g, dtype=torch.float64).to(device)
    opts = dict(weight=w.double(), target=y, soft_index=SOFT, divergence="jsd", temperature=temp,
                alpha=alpha)
    out = fused_linear_distillation_loss(hs, ws, ht, wt, chunk_size=chunk, **opts)
    grads = torch.autograd.grad(out, (hs, ws))
    ref = pykd.distillation_loss(hs @ ws.T, ht @ wt.T, **opts)
    ref_grads = torch.autograd.grad(ref, (hs, ws))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "mse"])
def test_a_per_row_copy_of_the_scalars_is_the_scalar_call_to_the_bit(dtype, divergence):
    s, t, w, y, _, _ = _rows((33,), 300, dtype, "cpu", seed=3)
    y = torch.where(y == SOFT, 5, y)
    n = y.shape[0]
    s1 = s.detach().clone().requires_grad_(True)
    s2 = s.detach().clone().requires_grad_(True)
    a = pykd.distillation_loss(s1, t, weight=w, target=y, divergence=divergence,
                               temperature=2.5, alpha=0.25)
    b = pykd.distillation_loss(s2, t, weight=w, target=y, divergence=divergence,
                               temperature=torch.full((n,), 2.5), alpha=torch.full((n,), 0.25))
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(s1.grad, s2.grad)


def test_soft_only_rows_are_the_soft_term_whatever_alpha_and_label_values():
    s, t, w, y, temp, _ = _rows((40,), 17, torch.float64, "cpu", seed=11)
    soft = pykd.distillation_loss(s, t, weight=w, temperature=temp, reduction="none")
    mixed = pykd.distillation_loss(s, t, weight=w, target=y, soft_index=SOFT, temperature=temp,
                                   alpha=0.2, reduction="none")
    rows = y == SOFT
    assert rows.any()
    torch.testing.assert_close(mixed[rows], soft[rows], rtol=0, atol=0)
    assert torch.all(mixed[y == -100] == 0)
    # They count in the mean's normaliser like labelled rows.
    mean = pykd.distillation_loss(s, t, weight=w, target=y, soft_index=SOFT, temperature=temp,
                                  alpha=0.2)
    torch.testing.assert_close(mean, mixed.sum() / w[y != -100].sum())


def test_per_row_options_get_no_gradient_and_compile():
    s, t, w, y, temp, alpha = _rows((6, 4), 11, torch.float32, "cpu", seed=5)
    temp.requires_grad_(True)

    def f(s, t, w, y, temp, alpha):
        return pykd.distillation_loss(s, t, weight=w, target=y, soft_index=SOFT,
                                      temperature=temp, alpha=alpha)

    eager = f(s.requires_grad_(True), t, w, y, temp, alpha)
    (g_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(s, t, w, y, temp, alpha)
    (g_comp,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)
    # The per-row options are data, not parameters: no gradient reaches them.
    again = f(s, t, w, y, temp, alpha)
    assert torch.autograd.grad(again, temp, allow_unused=True)[0] is None


def test_opcheck_with_per_row_options():
    s, t, w, y, temp, alpha = _rows((3, 5), 9, torch.float32, "cpu", seed=2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    opts = ("kl", 1.0, 1.0, 0.5, -100, "mean", temp, alpha, SOFT)
    torch.library.opcheck(torch.ops.pykd._distill_loss_fused.default,
                          (s, t, w, y, *opts, [True, True, False]))
    torch.library.opcheck(torch.ops.pykd.distill_loss.default, (s, t, w, y),
                          dict(row_temperature=temp, row_alpha=alpha, soft_index=SOFT))
    top = t.detach().topk(4, dim=-1)
    torch.library.opcheck(torch.ops.pykd._distill_loss_topk_fused.default,
                          (s, top.indices, top.values, w, y, *opts, None, [True, False]))
    hs = torch.randn(3, 5, 6, requires_grad=True)
    ws = torch.randn(9, 6, requires_grad=True)
    ht, wt = torch.randn(3, 5, 4), torch.randn(9, 4)
    torch.library.opcheck(torch.ops.pykd._fused_linear_distill_loss.default,
                          (hs, ws, None, ht, wt, None, w, y, *opts[:6], 4, *opts[6:],
                           [True, True, False, False]))


BAD = [
    (dict(temperature=torch.ones(7)), ValueError, r"per-row temperature shape \[7\] must be the "
     r"leading shape \[3, 5\]"),
    (dict(alpha=torch.ones(3, 5, dtype=torch.int64)), TypeError,
     "per-row alpha must be floating point, got int64"),
    (dict(soft_index=-100), ValueError, r"soft_index must differ from ignore_index \(-100\)"),
    (dict(soft_index=3), ValueError, r"soft_index 3 is a class in \[0, 9\)"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
@pytest.mark.parametrize("face", ["op", "meta"])
def test_bad_per_row_options_are_refused_alike_by_the_op_and_the_fake(kwargs, error, message,
                                                                      face):
    s, t, w, y, _, _ = _rows((3, 5), 9, torch.float32, "cpu", seed=1)
    if face == "meta":
        s, t, w, y = (x.to("meta") for x in (s, t, w, y))
        kwargs = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
                  for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        pykd.distillation_loss(s, t, weight=w, target=y, **kwargs)


def test_per_row_alpha_needs_a_target():
    s, t, _, _, _, alpha = _rows((3, 5), 9, torch.float32, "cpu")
    for x in ((s, t), (s.to("meta"), t.to("meta"))):
        a = alpha.to(x[0].device)
        with pytest.raises(ValueError, match="a per-row alpha needs a target"):
            pykd.distillation_loss(*x, alpha=a)


@pytest.mark.parametrize("values,message", [
    (dict(temperature=0.0), r"temperature\[4\] = 0.0 must be finite and > 0"),
    (dict(temperature=float("inf")), r"temperature\[4\] = inf must be finite and > 0"),
    (dict(alpha=1.5), r"alpha\[4\] = 1.5 must be in \[0, 1\]"),
    (dict(alpha=float("nan")), r"alpha\[4\] = nan must be in \[0, 1\]"),
])
@pytest.mark.parametrize("op", ["dense", "topk", "linear"])
def test_out_of_range_per_row_values_name_the_row(values, message, op):
    s, t, w, y, temp, alpha = _rows((9,), 8, torch.float32, "cpu", seed=4)
    (what, value), = values.items()
    row = dict(temperature=temp, alpha=alpha)
    row[what] = row[what].clone()
    row[what][4] = value
    with pytest.raises(ValueError, match=message):
        if op == "dense":
            pykd.distillation_loss(s, t, target=y, soft_index=SOFT, **row)
        elif op == "topk":
            top = t.topk(3, dim=-1)
            distillation_loss_topk(s, top.indices, top.values, target=y, soft_index=SOFT, **row)
        else:
            fused_linear_distillation_loss(torch.randn(9, 4), torch.randn(8, 4),
                                           torch.randn(9, 3), torch.randn(8, 3), target=y,
                                           soft_index=SOFT, **row)

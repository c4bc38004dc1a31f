"""torch.ops.pykd.distill_loss against the float64 reference of the contract in docs/loss.md."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import SOFTMAX_DIVERGENCES, reference_loss

import pykd

DIVERGENCES = ["kl", "reverse_kl", "jsd", "mse", "cosine"]
REDUCTIONS = ["mean", "sum", "batchmean", "none"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]),
]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_case(shape, dtype, device="cpu", *, weight=False, target=False, scale=3.0,
              ignore_every=4, weight_dtype=torch.float32):
    """Fresh random logits (drawn in float64, rounded to dtype), optional weights and labels."""
    lead, V = shape[:-1], shape[-1]
    s = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    w = None
    if weight:
        w = (torch.rand(lead, dtype=torch.float64) + 0.1).to(weight_dtype).to(device)
    y = None
    if target:
        y = torch.randint(0, V, lead, dtype=torch.int64)
        flat = y.view(-1)
        flat[::ignore_every] = -100
        y = y.to(device)
    return s, t, w, y


def run_pykd(s, t, w, y, go, *, teacher_grad=True, weight_grad=True, **opts):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    w = None if w is None else w.detach().clone().requires_grad_(weight_grad)
    out = pykd.distillation_loss(s, t, weight=w, target=y, **opts)
    out.backward(go.to(device=out.device, dtype=out.dtype))
    return out, s.grad, t.grad, None if w is None else w.grad


def run_reference(s, t, w, y, go, *, dtype=torch.float64, teacher_grad=True, weight_grad=True,
                  **opts):
    s = s.detach().cpu().to(dtype).requires_grad_(True)
    t = t.detach().cpu().to(dtype).requires_grad_(teacher_grad)
    w = None if w is None else w.detach().cpu().to(dtype).requires_grad_(weight_grad)
    y = None if y is None else y.cpu()
    out = reference_loss(s, t, w, y, dtype=dtype, **opts)
    if out.requires_grad:
        out.backward(go.to(dtype))
    return out, s.grad, t.grad, None if w is None else w.grad


def max_err(a, b):
    if a is None or b is None or a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def assert_matches(ours, ref64, lowp=None, *, dtype, what):
    """fp32/fp64: close to the float64 truth relative to its size. fp16/bf16: error at most twice
    torch's own error in that dtype (docs/loss.md, "Precision"), plus a hair for rounding."""
    for name, a, b, c in zip(("loss", "grad_student", "grad_teacher", "grad_weight"),
                             ours, ref64, lowp or (None,) * 4):
        if b is None:
            assert a is None or not torch.is_tensor(a) or a.abs().max() == 0, f"{what}: {name}"
            continue
        assert a is not None, f"{what}: {name} missing"
        assert a.shape == b.shape, f"{what}: {name} shape {a.shape} vs {b.shape}"
        size = b.detach().abs().max().item() if b.numel() else 0.0
        err = max_err(a, b)
        if c is not None:
            bound = 2 * max_err(c, b) + 1e-6 * (1 + size)
        elif dtype == torch.float32 or a.dtype == torch.float32:  # a float32 weight's grad
            bound = 2e-5 * (1 + size)
        else:
            bound = 1e-10 * (1 + size)
        assert err <= bound, f"{what}: {name} error {err:.3g} > bound {bound:.3g} (size {size:.3g})"


def check_case(shape, dtype, device, divergence, reduction, *, weight, target, go_scale=None,
               teacher_grad=True, weight_grad=True, case=None, vs_torch_same_dtype=False,
               **extra):
    opts = dict(divergence=divergence, reduction=reduction, temperature=2.0,
                alpha=0.6 if target else 1.0, beta=0.3, **extra)
    s, t, w, y = case if case is not None else make_case(shape, dtype, device, weight=weight,
                                                         target=target)
    if reduction == "none":
        go = torch.randn(shape[:-1], dtype=torch.float64)
    else:
        go = torch.tensor(1.0 if go_scale is None else go_scale, dtype=torch.float64)
    ours = run_pykd(s, t, w, y, go, teacher_grad=teacher_grad, weight_grad=weight_grad,
                    **opts)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for g, x in zip(ours[1:], (s, t, w)):
        if g is not None:
            assert g.dtype == x.dtype and g.device == x.device
    ref = run_reference(s, t, w, y, go, teacher_grad=teacher_grad, weight_grad=weight_grad, **opts)
    lowp = None
    if dtype in LOW_PRECISION or vs_torch_same_dtype:
        lowp = run_reference(s, t, w, y, go, dtype=dtype, teacher_grad=teacher_grad,
                             weight_grad=weight_grad, **opts)
    assert_matches(ours, ref, lowp, dtype=dtype,
                   what=f"{divergence}/{reduction}/{dtype}/w={weight}/y={target}")
    return ours, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("weight,target", list(itertools.product([False, True], repeat=2)),
                         ids=lambda v: str(v))
def test_matches_reference(divergence, reduction, dtype, device, weight, target):
    check_case((3, 13, 53), dtype, device, divergence, reduction, weight=weight, target=target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", [(37, 53), (3, 47, 123), (5, 1), (0, 7), (2, 0, 9), (4, 5001),
                                   (7,)], ids=str)
def test_odd_shapes(divergence, shape, device):
    check_case(shape, torch.float32, device, divergence, "mean", weight=True,
               target=len(shape) > 1)


@pytest.mark.parametrize("divergence", SOFTMAX_DIVERGENCES)
def test_max_moves_across_chunks(divergence):
    # Each 2048-column chunk holds larger logits than the last, so the streaming max (and every
    # sum kept at its scale) is rescaled at each chunk boundary.
    V = 3 * 2048 + 37
    ramp = torch.linspace(0, 30, V, dtype=torch.float64)
    s, t, _, y = make_case((6, V), torch.float32, weight=False, target=True)
    case = ((s.double() + ramp).float(), (t.double() + ramp).float(), None, y)
    check_case((6, V), torch.float32, "cpu", divergence, "sum", weight=False, target=True,
               case=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("V", [2 * 8192 + 16, 8197], ids=["aligned-rows", "unaligned-rows"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_rows(divergence, V, dtype):
    # Rows of several chunks whose starts are vector-aligned (every row of the first V) or not
    # (15 rows in 16 of the second), with the target's -1 in a later chunk: both gradients
    # against the float64 reference.
    check_case((5, V), dtype, "cpu", divergence, "sum", weight=True, target=True,
               teacher_grad=True)


@pytest.mark.parametrize("shape", [(1050, 8195), (520, 16401)], ids=["up-front", "row-by-row"])
def test_gradients_of_a_fresh_mapping_are_exact(shape):
    # Gradients of 32 MB and more get their pages populated (or huge pages) before the kernel
    # writes them (csrc/distill_loss_common.cpp): all at once for rows under 64 KB, by the row
    # kernel row by row for longer ones. Both gradients against the float64 reference, with row
    # lengths that make rows (and the tensor) end mid-page.
    check_case(shape, torch.float32, "cpu", "kl", "mean", weight=True, target=True,
               teacher_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous(divergence, device):
    base_s, base_t, _, _ = make_case((9, 2, 61), torch.float32, device)
    _, _, w, y = make_case((9, 2, 31), torch.float32, device, weight=True, target=True)
    # A strided last dim (copied) and permuted leading dims (read through the row stride).
    s = base_s.transpose(0, 1)[..., ::2]
    t = base_t.transpose(0, 1)[..., ::2]
    assert not s.is_contiguous()
    case = (s, t, w.transpose(0, 1), y.transpose(0, 1))
    check_case(tuple(s.shape), torch.float32, device, divergence, "mean", weight=True, target=True,
               case=case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", SOFTMAX_DIVERGENCES)
def test_masked_vocabulary(divergence, dtype, device):
    s, t, w, y = make_case((11, 40), dtype, device, weight=True, target=True)
    both = torch.rand(11, 40) < 0.3
    only_t = (torch.rand(11, 40) < 0.2) & ~both  # p = 0 where q > 0: finite for kl and jsd
    only_s = (torch.rand(11, 40) < 0.2) & ~both  # q = 0 where p > 0: finite for reverse_kl, jsd
    both[:, 0] = only_t[:, 0] = only_s[:, 0] = False  # every row keeps a finite logit
    mask_t = both | (only_t if divergence in ("kl", "jsd") else torch.zeros_like(both))
    mask_s = both | (only_s if divergence in ("reverse_kl", "jsd") else torch.zeros_like(both))
    ninf = float("-inf")
    s = s.masked_fill(mask_s.to(device), ninf)
    t = t.masked_fill(mask_t.to(device), ninf)
    y = torch.where(mask_s.to(device).gather(1, y.clamp_min(0)[:, None]).squeeze(1),
                    torch.full_like(y, -100), y)  # a masked class is never a label
    ours, _ = check_case((11, 40), dtype, device, divergence, "mean", weight=True, target=True,
                         case=(s, t, w, y))
    assert torch.isfinite(ours[0]).all()
    assert ours[1][mask_s].abs().max() == 0 if mask_s.any() else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_magnitudes(divergence, dtype):
    s, t, w, y = make_case((17, 29), dtype, weight=True, target=True, scale=1e4)
    if divergence == "mse":  # sum of squares of 1e4 logits: compare relative to its size
        s, t = s / 100, t / 100
    # At 1e4 the logits' own ulp is ~1e-3, so float32 is held to torch's float32 error.
    check_case((17, 29), dtype, "cpu", divergence, "sum", weight=True, target=True,
               case=(s, t, w, y), vs_torch_same_dtype=dtype == torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_all_ignored_batch_is_zero(divergence, reduction):
    s, t, w, _ = make_case((6, 9), torch.float32, weight=True)
    y = torch.full((6,), -100)
    out, gs, gt, gw = run_pykd(s, t, w, y, torch.tensor(1.0), divergence=divergence,
                               reduction=reduction, alpha=0.5)
    assert out.item() == 0.0
    assert gs.abs().max() == 0 and gt.abs().max() == 0 and gw.abs().max() == 0


def test_zero_weights_mean_is_zero():
    s, t, _, y = make_case((5, 8), torch.float32, target=True)
    w = torch.zeros(5, requires_grad=True)
    out, gs, _, gw = run_pykd(s, t, w, y, torch.tensor(1.0), alpha=0.5)
    assert out.item() == 0.0 and gs.abs().max() == 0 and gw.abs().max() == 0


def test_custom_ignore_index():
    check_case((8, 10), torch.float32, "cpu", "kl", "mean", weight=True, target=True,
               case=make_case((8, 10), torch.float32, weight=True, target=True)[:3]
               + (torch.tensor([3, 7, 7, 0, 1, 7, 2, 9]),), ignore_index=7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("go_scale", [2.5, 0.0])
def test_scaled_backward(divergence, go_scale):
    check_case((7, 33), torch.float32, "cpu", divergence, "mean", weight=True, target=True,
               go_scale=go_scale)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_to_teacher_only_and_weight_dtype(divergence):
    s, t, w, y = make_case((5, 12), torch.bfloat16, weight=True, target=True,
                           weight_dtype=torch.bfloat16)
    s = s.detach()
    t = t.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = pykd.distillation_loss(s, t, weight=w, target=y, divergence=divergence, alpha=0.5)
    out.backward()
    assert t.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref_t = t.detach().double().requires_grad_(True)
    reference_loss(s, ref_t, w.detach(), y, divergence=divergence, alpha=0.5).backward()
    assert max_err(t.grad, ref_t.grad) <= 2e-2 * (1 + ref_t.grad.abs().max().item())


def test_retain_graph_second_backward_matches_first():
    s, t, w, y = make_case((6, 20), torch.float32, weight=True, target=True)
    s.requires_grad_(True)
    out = pykd.distillation_loss(s, t, weight=w, target=y, alpha=0.3, reduction="none")
    go1, go2 = torch.randn(6), torch.randn(6)
    (g1,) = torch.autograd.grad(out, s, go1, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(out, s, go2, retain_graph=True)
    (g3,) = torch.autograd.grad(out, s, go1)
    assert torch.equal(g1, g1_copy), "a later backward changed a gradient handed out earlier"
    torch.testing.assert_close(g3, g1)
    torch.testing.assert_close(g2, g1 * (go2 / go1)[:, None], rtol=1e-4, atol=1e-6)


def test_no_grad_computes_loss_only():
    s, t, _, _ = make_case((4, 30), torch.float32)
    s.requires_grad_(True)
    with torch.no_grad():
        out = pykd.distillation_loss(s, t)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), reference_loss(s.detach(), t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(divergence, reduction):
    s, t, w, y = make_case((4, 7), torch.float64, weight=True, target=True, ignore_every=3,
                           weight_dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    w.requires_grad_(True)

    def fn(s_, t_, w_):
        return pykd.distillation_loss(s_, t_, weight=w_, target=y, divergence=divergence,
                                      temperature=1.5, alpha=0.7, beta=0.4, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s, t, w))


OPCHECK_CASES = [
    ("kl", "mean", True, True), ("jsd", "none", True, False), ("cosine", "sum", False, True),
    ("reverse_kl", "batchmean", False, False), ("mse", "mean", True, True),
]


@pytest.mark.parametrize("divergence,reduction,weight,target", OPCHECK_CASES)
def test_opcheck(divergence, reduction, weight, target):
    s, t, w, y = make_case((3, 5, 9), torch.float32, weight=weight, target=target)
    s.requires_grad_(True)
    t.requires_grad_(True)
    alpha = 0.5 if target else 1.0
    opts = (divergence, 2.0, alpha, 0.5, -100, reduction)
    torch.library.opcheck(torch.ops.pykd._distill_loss_fused.default,
                          (s, t, w, y, *opts, None, None, None, [True, True, w is not None]))
    torch.library.opcheck(torch.ops.pykd.distill_loss.default, (s, t, w, y),
                          dict(zip(("divergence", "temperature", "alpha", "beta", "ignore_index",
                                    "reduction"), opts)))


def test_opcheck_scale_grad():
    g = torch.randn(4, 3, 6)
    torch.library.opcheck(torch.ops.pykd._scale_grad_.default, (g.clone(), torch.tensor(2.0)))
    torch.library.opcheck(torch.ops.pykd._scale_grad_.default, (g.clone(), torch.randn(4, 3)))


class _TinyKD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = torch.nn.Linear(16, 37)

    def forward(self, x, teacher_logits, labels):
        return pykd.distillation_loss(self.student(x), teacher_logits, target=labels,
                                      temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _TinyKD()
    x, t = torch.randn(10, 16), torch.randn(10, 37)
    y = torch.randint(0, 37, (10,))
    y[3] = -100
    eager_loss = model(x, t, y)
    eager_loss.backward()
    eager_grad = model.student.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(x, t, y)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(model.student.weight.grad, eager_grad)


def test_module_face_matches_functional():
    s, t, w, y = make_case((6, 11), torch.float32, weight=True, target=True)
    loss_fn = pykd.DistillationLoss(divergence="jsd", temperature=3.0, alpha=0.25, beta=0.2,
                                    reduction="batchmean")
    assert "divergence='jsd'" in repr(loss_fn) and "temperature=3.0" in repr(loss_fn)
    expected = pykd.distillation_loss(s, t, weight=w, target=y, divergence="jsd",
                                      temperature=3.0, alpha=0.25, beta=0.2,
                                      reduction="batchmean")
    torch.testing.assert_close(loss_fn(s, t, target=y, weight=w), expected)

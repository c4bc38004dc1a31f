"""distill_loss_topk with the teacher's rest mass (``teacher_log_rest``) against a float64
reference, and the identity behind a sampled (Random-Sampling KD) teacher."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import reference_loss, topk_rest_soft
from test_distill_loss import DEVICES, LOW_PRECISION, REDUCTIONS, make_case
from test_distill_loss_topk import assert_compiles_like_eager, compare

import pykd


def teacher_top(t: torch.Tensor, k: int, temperature: float | torch.Tensor):
    """The teacher's top-k (indices, logits) and the log of its mass off them at T, from its
    full logits, as a cache with a rest bucket stores them."""
    top = t.double().topk(k, dim=-1)
    T = torch.as_tensor(temperature, dtype=torch.float64)
    T = T.reshape(*T.shape, 1) if T.dim() else T
    log_p = torch.log_softmax(t.double() / T, dim=-1).gather(-1, top.indices)
    log_rest = torch.log1p(-log_p.exp().sum(-1).clamp(max=1.0))
    return top.indices, top.values, log_rest


def run(s, idx, val, rest, w, y, go, **opts):
    s = s.detach().clone().requires_grad_(True)
    w = None if w is None else w.detach().clone().requires_grad_(True)
    out = pykd.distillation_loss_topk(s, idx, val, weight=w, target=y, teacher_log_rest=rest,
                                      **opts)
    out.backward(go.to(device=out.device, dtype=out.dtype))
    return out, s.grad, None if w is None else w.grad


def run_reference(s, idx, val, rest, w, y, go, dtype, **opts):
    s = s.detach().cpu().to(dtype).requires_grad_(True)
    w = None if w is None else w.detach().cpu().to(dtype).requires_grad_(True)
    idx, val, rest = idx.cpu(), val.cpu(), rest.cpu()

    def soft(rows, temperature):
        return topk_rest_soft(rows, idx, val, rest, temperature)

    out = reference_loss(s, None, w, None if y is None else y.cpu(), dtype=dtype, soft_fn=soft,
                         **opts)
    out.backward(go.to(dtype))
    return out, s.grad, None if w is None else w.grad


def check(s, idx, val, rest, w, y, go, dtype, **opts):
    ours = run(s, idx, val, rest, w, y, go, **opts)
    truth = run_reference(s, idx, val, rest, w, y, go, torch.float64, **opts)
    same = (run_reference(s, idx, val, rest, w, y, go, dtype, **opts)
            if dtype in LOW_PRECISION else None)
    return compare(ours, truth, same, dtype, go)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight,target", list(itertools.product([False, True], repeat=2)),
                         ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_float64_reference(dtype, reduction, weight, target, device):
    shape = (3, 7, 61)
    s, t, w, y = make_case(shape, dtype, device, weight=weight, target=target)
    idx, val, rest = teacher_top(t.cpu(), 9, 2.0)
    go = torch.randn(shape[:-1], dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    check(s, idx.to(device), val.float().to(device), rest.float().to(device), w, y, go, dtype,
          temperature=2.0, alpha=0.6 if target else 1.0, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,V", [(1, 5), (3, 4101), (2048, 4101), (4100, 4101)])
def test_odd_sizes_and_chunk_edges(k, V, device):
    s, t, w, y = make_case((5, V), torch.float32, device, weight=True, target=True)
    idx, val, rest = teacher_top(t.cpu(), k, 1.5)
    check(s, idx.to(device), val.float().to(device), rest.float().to(device), w, y,
          torch.tensor(1.0), torch.float32, temperature=1.5, alpha=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_any_rest_in_zero_to_one_per_row_temperature_and_soft_rows(device):
    # The rest is an input, not derived from the logits: r = 0 (-inf), r = 1 (0.0) and values
    # between, with a temperature per row and soft-only rows.
    s, t, w, y = make_case((12, 37), torch.float64, device, weight=True, target=True)
    y[1] = y[5] = -1
    idx = torch.stack([torch.randperm(37)[:6] for _ in range(12)])
    val = torch.randn(12, 6, dtype=torch.float64) * 2
    rest = torch.rand(12, dtype=torch.float64).log()
    rest[0], rest[3] = float("-inf"), 0.0
    val[2, 4:] = val[0, 5] = float("-inf")  # unused slots: with a rest, classes of its bucket
    temperature = torch.rand(12, dtype=torch.float64) * 3 + 0.5
    check(s, idx.to(device), val.to(device), rest.to(device), w, y, torch.tensor(1.0),
          torch.float64, temperature=temperature.to(device), alpha=0.3, soft_index=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_and_huge_student_logits(device):
    s, t, w, y = make_case((6, 50), torch.float32, device, target=True, scale=1e3)
    s = s.clone()
    s[:, 7] = float("-inf")  # a class the student rules out (kept off the teacher's top-k)
    t = t.clone()
    t[:, 7] = float("-inf")
    y = torch.where(y == 7, 0, y)  # the label is a class the student can hold
    idx, val, rest = teacher_top(t.cpu(), 5, 1.0)
    # Off the top-k the student must hold some mass, or its rest is below what float32 holds
    # (see test_a_student_without_a_tail_stays_finite): its largest logit stays off the top-k.
    top_s = s.cpu().double().argmax(-1)
    keep = ~(idx == top_s[:, None]).any(-1)
    check(s[keep.to(device)], idx[keep].to(device), val[keep].float().to(device),
          rest[keep].float().to(device), None, y[keep.to(device)], torch.tensor(1.0),
          torch.float32, alpha=0.5)


def test_a_student_without_a_tail_stays_finite():
    # All of the student's mass on the top-k: q_rest (~e^-1e4) rounds to 0 in float32 and is
    # floored at float32's epsilon, so the row gets a finite loss and gradient, a strong pull
    # towards the tail, and exactly the floored formula.
    s = torch.full((2, 20), -1e4)
    s[:, :3] = torch.tensor([5.0, 4.0, 3.0])
    s.requires_grad_(True)
    idx = torch.arange(3).expand(2, 3)
    teacher = torch.tensor([[2.0, 1.0, 0.0]] * 2)
    rest = torch.tensor([0.1, 1e-3]).log()
    loss = pykd.distillation_loss_topk(s, idx, teacher, teacher_log_rest=rest, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    r, eps = rest.double().exp(), torch.finfo(torch.float32).eps
    lq = torch.log_softmax(s.detach().double(), -1)[:, :3]
    lp = torch.log_softmax(teacher.double(), -1) + torch.log1p(-r)[:, None]
    floored = (lp.exp() * (lp - lq)).sum(-1) + r * (rest.double() - torch.log(torch.tensor(eps)))
    torch.testing.assert_close(loss.double(), floored, rtol=1e-5, atol=1e-5)
    # The top-k columns still get q - p.
    torch.testing.assert_close(s.grad[:, :3].double(), lq.exp() - lp.exp(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_unused_slots_belong_to_the_rest(device):
    # An engine returned 4 ids, the last slot unused (-inf); the rest counts every class but the
    # 3 used ones. A student equal to the teacher has loss 0 and gradient 0.
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64)
    idx = torch.tensor([[0, 1, 2, 3]])
    val = torch.log(p[:, :4]).clone()
    val[0, 3] = float("-inf")
    rest = torch.log(1 - p[:, :3].sum(-1))
    s = p.log().clone().to(device).requires_grad_(True)
    loss = pykd.distillation_loss_topk(s, idx.to(device), val.to(device),
                                       teacher_log_rest=rest.to(device))
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert s.grad.abs().max().item() < 1e-12


def test_no_rest_is_the_plain_top_k_loss():
    s, t, w, y = make_case((9, 40), torch.float32, weight=True, target=True)
    idx, val, _ = teacher_top(t, 6, 2.0)
    none = torch.full((9,), float("-inf"))
    opts = dict(weight=w, target=y, temperature=2.0, alpha=0.4)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    plain = pykd.distillation_loss_topk(a, idx, val.float(), **opts)
    zero_rest = pykd.distillation_loss_topk(b, idx, val.float(), teacher_log_rest=none, **opts)
    plain.backward()
    zero_rest.backward()
    assert torch.equal(plain, zero_rest) and torch.equal(a.grad, b.grad)


def test_rest_bucket_recovers_the_dense_loss_when_the_teacher_tail_is_the_students():
    # If the student's distribution off the top-k is the teacher's, up to the bucket's mass, the
    # bucketed KL equals the dense KL: nothing is lost by storing k entries and one number.
    V, k = 30, 4
    t = torch.randn(5, V, dtype=torch.float64) * 2
    s = t.clone()
    s[:, :] += torch.randn(5, 1, dtype=torch.float64)  # same softmax, other logits
    idx, val, rest = teacher_top(t, k, 1.0)
    s.scatter_(-1, idx, torch.randn(5, k, dtype=torch.float64))  # differ on the top-k only
    bucketed = pykd.distillation_loss_topk(s, idx, val, teacher_log_rest=rest, reduction="none")
    dense = pykd.distillation_loss(s, t, reduction="none")
    # Off the top-k: log q_c - log p_c is one constant per row, so the dense KL's tail sum
    # collapses to r (log r - log q_rest), the bucket's term.
    torch.testing.assert_close(bucketed, dense, rtol=1e-10, atol=1e-12)


def test_sampled_counts_give_the_empirical_teacher_exactly():
    # A sampled (Random-Sampling KD) teacher is the top-k op over the drawn classes with logits
    # T log(count): its softmax at T is count / n, so the student's gradient is T (q - count/n),
    # whose expectation over the draws is T (q - p): the full kl gradient, unbiased.
    V, n, T = 25, 12, 1.5
    s = torch.randn(4, V, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, V, dtype=torch.float64) * 2
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.softmax(t / T, -1), n, replacement=True, generator=gen)
    counts = torch.zeros(4, V, dtype=torch.float64).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=torch.float64))
    idx = torch.stack([torch.cat([c.nonzero().squeeze(1),
                                  (c == 0).nonzero().squeeze(1)])[:n] for c in counts])
    val = T * counts.gather(-1, idx).log()  # -inf on the classes not drawn (padding)
    loss = pykd.distillation_loss_topk(s, idx, val, temperature=T, reduction="sum")
    loss.backward()
    q = torch.softmax(s.detach() / T, -1)
    torch.testing.assert_close(s.grad, T * (q - counts / n), rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    s, t, w, y = make_case((5, 11), torch.float64, weight=True, target=True, ignore_every=3,
                           weight_dtype=torch.float64)
    idx, val, rest = teacher_top(t, 4, 1.3)

    def fn(a, b):
        return pykd.distillation_loss_topk(a, idx, val, weight=b, target=y, temperature=1.3,
                                           alpha=0.7, reduction="none", teacher_log_rest=rest)

    assert torch.autograd.gradcheck(fn, (s.requires_grad_(True), w.requires_grad_(True)))


def test_opcheck_and_compile():
    s, t, w, y = make_case((2, 3, 13), torch.float32, weight=True, target=True)
    idx, val, rest = teacher_top(t, 5, 2.0)
    val, rest = val.float(), rest.float()
    s.requires_grad_(True)
    opts = ("kl", 2.0, 0.5, 0.3, -100, "mean")
    torch.library.opcheck(torch.ops.pykd._distill_loss_topk_fused.default,
                          (s, idx, val, w, y, *opts, None, None, None, rest, [True, False]))
    torch.library.opcheck(torch.ops.pykd.distill_loss_topk.default, (s, idx, val, w, y),
                          {"temperature": 2.0, "alpha": 0.5, "teacher_log_rest": rest})
    assert_compiles_like_eager(
        lambda x: pykd.distillation_loss_topk(x, idx, val, target=y, alpha=0.5, temperature=2.0,
                                              teacher_log_rest=rest), s)


@pytest.mark.parametrize("face", ["op", "meta"])
@pytest.mark.parametrize("change,error,message", [
    ({"divergence": "jsd"}, ValueError, "teacher_log_rest needs divergence kl"),
    ({"teacher_log_rest": torch.zeros(3)}, ValueError, "leading shape"),
    ({"teacher_log_rest": torch.zeros(4, dtype=torch.long)}, TypeError, "floating point"),
])
def test_bad_rest_is_refused_alike_by_the_op_and_the_fake(change, error, message, face):
    s, t, _, _ = make_case((4, 12), torch.float32)
    top = t.topk(3, dim=-1)
    kwargs = {"teacher_log_rest": torch.full((4,), -1.0), **change}
    args = (s, top.indices, top.values)
    if face == "meta":
        args = tuple(x.to("meta") for x in args)
        kwargs = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v)
                  for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        torch.ops.pykd.distill_loss_topk(*args, **kwargs)


@pytest.mark.parametrize("bad", [0.5, float("nan")])
def test_a_rest_that_is_not_a_log_probability_names_its_row(bad):
    s, t, _, _ = make_case((4, 12), torch.float32)
    top = t.topk(3, dim=-1)
    rest = torch.full((4,), -1.0)
    rest[2] = bad
    with pytest.raises(RuntimeError, match="teacher_log_rest row 2 is not a log-probability"):
        pykd.distillation_loss_topk(s, top.indices, top.values, teacher_log_rest=rest)


def test_module_face_takes_the_rest():
    s, t, w, y = make_case((6, 40), torch.float32, weight=True, target=True)
    idx, val, rest = teacher_top(t, 5, 3.0)
    loss_fn = pykd.TopKDistillationLoss(temperature=3.0, alpha=0.25)
    expected = pykd.distillation_loss_topk(s, idx, val.float(), weight=w, target=y,
                                           temperature=3.0, alpha=0.25,
                                           teacher_log_rest=rest.float())
    got = loss_fn(s, idx, val.float(), target=y, weight=w, teacher_log_rest=rest.float())
    torch.testing.assert_close(got, expected)


def rest_on_label_soft(s, idx, val, rest, y, temperature, classes):
    """Per-row kl soft term of ``rest="target"``, from the dense distribution: the top-k
    entries carrying 1 - r plus r on the label where the label is a class off them; the bucket
    (topk_rest_soft) elsewhere."""
    n = s.shape[0]
    T = torch.as_tensor(temperature, dtype=s.dtype).reshape(-1, 1).expand(n, 1)
    lr = rest.to(s.dtype).reshape(n)
    y = y.reshape(n)
    moves = (y >= 0) & (y < classes) & ~(idx == y[:, None]).any(-1)
    p_top = torch.softmax(val.to(s.dtype) / T, -1) * (-torch.expm1(lr))[:, None]
    p = torch.zeros_like(s).scatter(-1, idx.long(), p_top)
    on_label = torch.nn.functional.one_hot(torch.where(moves, y, 0), classes).to(s.dtype)
    p = p + torch.where(moves, lr.exp(), torch.zeros_like(lr))[:, None] * on_label
    lq = torch.log_softmax(s / T, -1)
    dense = (T * T).reshape(-1) * torch.where(p > 0, p * (p.log() - lq), 0).sum(-1)
    return torch.where(moves, dense, topk_rest_soft(s, idx, val, rest, temperature))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rest_on_the_target_matches_float64_reference(dtype, device):
    # Labels off the top-k (the rest moves onto them), on it, ignored and soft-only; a row with
    # no rest (-inf), one with all of it (0), unused slots, a temperature per row.
    n, V, k = 40, 53, 6
    s, t, w, y = make_case((n, V), dtype, device, weight=True, target=True)
    idx, val, rest = teacher_top(t.cpu(), k, 1.0)
    y = y.cpu()
    y[1] = y[5] = -1
    y[2] = idx[2, 3]
    y[3] = idx[3, 0]
    rest[7], rest[8] = float("-inf"), 0.0
    val = val.clone()
    val[9, 4:] = float("-inf")
    temperature = torch.rand(n, dtype=torch.float64) * 3 + 0.5
    moved = ((y >= 0) & ~(idx == y[:, None]).any(-1)).sum()
    assert 10 < moved < n - 10  # both kinds of rows are exercised
    go = torch.tensor(1.0)
    opts = dict(temperature=temperature.to(device), alpha=0.4, soft_index=-1)
    s_ours = s.detach().clone().requires_grad_(True)
    out = pykd.distillation_loss_topk(s_ours, idx.to(device), val.float().to(device), weight=w,
                                      target=y.to(device), teacher_log_rest=rest.float().to(device),
                                      rest="target", **opts)
    out.backward()
    s_ref = s.detach().cpu().double().requires_grad_(True)

    def soft(rows, temp):
        return rest_on_label_soft(rows, idx, val.float(), rest.float(), y, temp, V)

    ref = reference_loss(s_ref, None, w.cpu(), y, dtype=torch.float64, soft_fn=soft,
                         temperature=temperature, alpha=0.4, soft_index=-1)
    ref.backward(go.double())
    tol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(s_ours.grad.double().cpu(), s_ref.grad, rtol=tol, atol=tol)


def test_rest_on_the_target_needs_a_rest_and_labels():
    s, idx, val = torch.randn(4, 10), torch.arange(3).expand(4, 3), torch.randn(4, 3)
    rest, y = torch.full((4,), -1.0), torch.tensor([5, 1, -100, 9])
    with pytest.raises(ValueError, match="rest must be one of"):
        pykd.distillation_loss_topk(s, idx, val, teacher_log_rest=rest, target=y, rest="label")
    with pytest.raises(ValueError, match="needs teacher_log_rest and target"):
        pykd.distillation_loss_topk(s, idx, val, target=y, rest="target")
    with pytest.raises(ValueError, match="needs teacher_log_rest and target"):
        pykd.distillation_loss_topk(s, idx, val, teacher_log_rest=rest, rest="target")
    with pytest.raises(ValueError, match="leading shape"):
        pykd.distillation_loss_topk(s, idx, val, teacher_log_rest=rest, target=y[:3],
                                    rest="target")

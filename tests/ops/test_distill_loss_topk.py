"""torch.ops.pykd.distill_loss_topk against the dense reference (a renormalised top-k teacher)."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import reference_loss
from test_distill_loss import DEVICES, LOW_PRECISION, REDUCTIONS, make_case

import pykd


def dense_teacher(indices, values, vocab, temperature, dtype=torch.float64):
    """Teacher logits whose softmax at T is the top-k softmax scattered, zero elsewhere."""
    p = torch.softmax(values.to(dtype) / temperature, dim=-1)
    full = torch.zeros(*indices.shape[:-1], vocab, dtype=dtype)
    return temperature * torch.log(full.scatter(-1, indices.long(), p))


def run(s, idx, val, w, y, go, **opts):
    s = s.detach().clone().requires_grad_(True)
    w = None if w is None else w.detach().clone().requires_grad_(True)
    out = pykd.distillation_loss_topk(s, idx, val, weight=w, target=y, **opts)
    out.backward(go.to(device=out.device, dtype=out.dtype))
    return out, s.grad, None if w is None else w.grad


def run_dense(s, idx, val, w, y, go, dtype, **opts):
    t = dense_teacher(idx.cpu(), val.cpu(), s.shape[-1], opts["temperature"], dtype)
    s = s.detach().cpu().to(dtype).requires_grad_(True)
    w = None if w is None else w.detach().cpu().to(dtype).requires_grad_(True)
    out = reference_loss(s, t, w, None if y is None else y.cpu(), dtype=dtype, **opts)
    out.backward(go.to(dtype))
    return out, s.grad, None if w is None else w.grad


def check(case, k, dtype, go, **opts):
    s, t, w, y = case
    top = t.float().topk(k, dim=-1)
    ours = run(s, top.indices, top.values, w, y, go, **opts)
    truth = run_dense(s, top.indices, top.values, w, y, go, torch.float64, **opts)
    same = (run_dense(s, top.indices, top.values, w, y, go, dtype, **opts)
            if dtype in LOW_PRECISION else None)
    return compare(ours, truth, same, dtype, go)


def compare(ours, truth, same, dtype, go):
    """Each of ``ours`` (loss and gradients) against the float64 ``truth``: within twice torch's
    own error in ``dtype`` (``same``, the reference run in it) for bf16/fp16, else a float32 or
    float64 bound; every output must be finite."""
    for i, (a, b) in enumerate(zip(ours, truth)):
        if b is None:
            continue
        assert torch.isfinite(a).all(), f"output {i} is not finite"
        err = (a.detach().double().cpu() - b.double()).abs().max().item() if b.numel() else 0.0
        size = b.abs().max().item() if b.numel() else 0.0
        if same is not None:
            bound = 2 * (same[i].double() - b.double()).abs().max().item() + 1e-6 * (1 + size)
            if not bool((go == 1).all()):
                # The gradient is made for d loss = 1 and then scaled: one more rounding.
                bound += torch.finfo(dtype).eps * size
        elif dtype == torch.float32 or a.dtype == torch.float32:
            bound = 2e-5 * (1 + size)
        else:
            bound = 1e-10 * (1 + size)
        assert err <= bound, f"output {i}: error {err:.3g} > {bound:.3g}"
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight,target", list(itertools.product([False, True], repeat=2)),
                         ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_matches_dense_reference(divergence, dtype, reduction, weight, target, device):
    shape = (3, 7, 61)
    case = make_case(shape, dtype, device, weight=weight, target=target)
    go = torch.randn(shape[:-1], dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    check(case, 9, dtype, go, divergence=divergence, temperature=2.0, alpha=0.6 if target else 1.0,
          beta=0.3, reduction=reduction)


@pytest.mark.parametrize("k", [1, 2, 2048, 4101])
def test_k_from_one_to_the_whole_vocabulary(k):
    # k = V is the dense loss itself; k = 2048 and 4101 cross the kernel's column chunks.
    case = make_case((5, 4101), torch.float32, weight=True, target=True)
    check(case, k, torch.float32, torch.tensor(1.0), divergence="kl", temperature=1.5, alpha=0.5)


def test_k_equal_to_vocab_is_the_dense_loss():
    s, t, w, y = make_case((6, 17), torch.float64, weight=True, target=True)
    top = t.topk(17, dim=-1)
    for divergence in ("kl", "jsd"):
        got = pykd.distillation_loss_topk(s, top.indices, top.values, weight=w, target=y,
                                          divergence=divergence, temperature=2.0, alpha=0.3)
        want = pykd.distillation_loss(s, t, weight=w, target=y, divergence=divergence,
                                      temperature=2.0, alpha=0.3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cache_dtypes_and_padding():
    # int32 indices and float16 logits, as a cache stores them; -inf marks an unused slot.
    s, t, w, y = make_case((8, 30), torch.float32, target=True)
    top = t.topk(6, dim=-1)
    values = top.values.half()
    values[:, -2:] = float("-inf")
    ours = pykd.distillation_loss_topk(s, top.indices.int(), values, target=y, alpha=0.5)
    dense = dense_teacher(top.indices, values.float(), 30, 1.0)
    want = reference_loss(s.double(), dense, None, y, alpha=0.5)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    s, t, _, y = make_case((4, 12), torch.float32, target=True)
    top = t.topk(3, dim=-1)
    with pytest.raises(ValueError, match="divergence must be kl or jsd"):
        pykd.distillation_loss_topk(s, top.indices, top.values, divergence="reverse_kl")
    with pytest.raises(ValueError, match="teacher_logits shape"):
        pykd.distillation_loss_topk(s, top.indices, top.values[:, :2])
    with pytest.raises(TypeError, match="int64 or int32"):
        pykd.distillation_loss_topk(s, top.indices.float(), top.values)
    with pytest.raises(ValueError, match="divergence must be kl or jsd"):
        torch.ops.pykd.distill_loss_topk(s, top.indices, top.values, divergence="mse")
    bad = top.indices.clone()
    bad[2, 1] = 12
    with pytest.raises(RuntimeError, match=r"teacher_indices\[2, 1\] = 12 is outside \[0, 12\)"):
        pykd.distillation_loss_topk(s, bad, top.values)
    dup = top.indices.clone()
    dup[3, 2] = dup[3, 0]
    with pytest.raises(RuntimeError, match="row 3 repeats an index"):
        pykd.distillation_loss_topk(s, dup, top.values)
    with pytest.raises(RuntimeError, match="row 1 has no finite logit"):
        v = top.values.clone()
        v[1] = float("-inf")
        pykd.distillation_loss_topk(s, top.indices, v)


def test_gradcheck_float64():
    s, t, w, y = make_case((5, 11), torch.float64, weight=True, target=True, ignore_every=3,
                           weight_dtype=torch.float64)
    top = t.topk(4, dim=-1)
    for divergence in ("kl", "jsd"):
        def fn(a, b):
            return pykd.distillation_loss_topk(a, top.indices, top.values, weight=b, target=y,
                                               divergence=divergence, temperature=1.3, alpha=0.7,
                                               beta=0.4, reduction="none")

        assert torch.autograd.gradcheck(fn, (s.requires_grad_(True), w.requires_grad_(True)))


def test_opcheck_and_compile():
    s, t, w, y = make_case((2, 3, 13), torch.float32, weight=True, target=True)
    top = t.topk(5, dim=-1)
    s.requires_grad_(True)
    opts = ("jsd", 2.0, 0.5, 0.3, -100, "mean")
    torch.library.opcheck(torch.ops.pykd._distill_loss_topk_fused.default,
                          (s, top.indices, top.values, w, y, *opts, None, None, None, None,
                           [True, False]))
    torch.library.opcheck(torch.ops.pykd.distill_loss_topk.default,
                          (s, top.indices, top.values, w, y),
                          dict(zip(("divergence", "temperature", "alpha", "beta", "ignore_index",
                                    "reduction"), opts)))
    assert_compiles_like_eager(
        lambda x: pykd.distillation_loss_topk(x, top.indices, top.values, target=y, alpha=0.5), s)


def assert_compiles_like_eager(step, s):
    """``step(s)`` and its gradient are the same under ``torch.compile`` (full graph)."""
    torch._dynamo.reset()
    eager = step(s)
    (g_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(s)
    (g,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g, g_eager)


def test_module_face_matches_functional():
    s, t, w, y = make_case((6, 40), torch.float32, weight=True, target=True)
    top = t.topk(5, dim=-1)
    loss_fn = pykd.TopKDistillationLoss(divergence="jsd", temperature=3.0, alpha=0.25, beta=0.2,
                                        reduction="batchmean")
    assert "divergence='jsd'" in repr(loss_fn) and "temperature=3.0" in repr(loss_fn)
    expected = pykd.distillation_loss_topk(s, top.indices, top.values, weight=w, target=y,
                                           divergence="jsd", temperature=3.0, alpha=0.25,
                                           beta=0.2, reduction="batchmean")
    torch.testing.assert_close(loss_fn(s, top.indices, top.values, target=y, weight=w), expected)
    with pytest.raises(ValueError, match="kl or jsd"):
        pykd.TopKDistillationLoss(divergence="reverse_kl")

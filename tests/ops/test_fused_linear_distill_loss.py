"""torch.ops.pykd.fused_linear_distill_loss against the unfused float64 reference."""

from __future__ import annotations

import pytest
import torch
from reference import reference_loss
from test_distill_loss import DEVICES, DIVERGENCES

from pykd.functional import fused_linear_distillation_loss

LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_heads(lead, hs_dim, ht_dim, vocab, dtype, device="cpu", *, bias=True, weight=True,
               target=True):
    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)

    hs, ht = rnd(*lead, hs_dim), rnd(*lead, ht_dim)
    ws, wt = rnd(vocab, hs_dim, scale=hs_dim ** -0.5), rnd(vocab, ht_dim, scale=ht_dim ** -0.5)
    bs = rnd(vocab) if bias else None
    bt = rnd(vocab) if bias else None
    w = (torch.rand(lead, dtype=torch.float64) + 0.1).float().to(device) if weight else None
    y = None
    if target:
        y = torch.randint(0, vocab, lead)
        y.view(-1)[::3] = -100
        y = y.to(device)
    return hs, ws, bs, ht, wt, bt, w, y


def run(case, dtype, chunk_size, **opts):
    """pykd's fused loss and its gradients (hidden, head weight, head bias, row weight)."""
    hs, ws, bs, ht, wt, bt, w, y = case
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None
              for x in (hs, ws, bs, w)]
    loss = fused_linear_distillation_loss(
        leaves[0], leaves[1], ht, wt, student_bias=leaves[2], teacher_bias=bt, weight=leaves[3],
        target=y, chunk_size=chunk_size, **opts)
    loss.backward()
    return [loss] + [x.grad if x is not None else None for x in leaves]


def run_unfused(case, dtype, **opts):
    """The same loss through torch ops in `dtype` (float64: the truth)."""
    hs, ws, bs, ht, wt, bt, w, y = case
    leaves = [x.detach().cpu().to(dtype).requires_grad_(True) if x is not None else None
              for x in (hs, ws, bs, w)]
    s = leaves[0] @ leaves[1].T + (leaves[2] if bs is not None else 0)
    t = ht.cpu().to(dtype) @ wt.cpu().to(dtype).T + (bt.cpu().to(dtype) if bt is not None else 0)
    loss = reference_loss(s, t, leaves[3], None if y is None else y.cpu(), dtype=dtype, **opts)
    loss.backward()
    return [loss] + [x.grad if x is not None else None for x in leaves]


def check(case, dtype, chunk_size, **opts):
    ours = run(case, dtype, chunk_size, **opts)
    truth = run_unfused(case, torch.float64, **opts)
    torch_same = run_unfused(case, dtype, **opts) if dtype in LOW_PRECISION else None
    names = ("loss", "grad_hidden", "grad_head_weight", "grad_head_bias", "grad_weight")
    for i, (name, a, b) in enumerate(zip(names, ours, truth)):
        if b is None:
            continue
        err = (a.detach().double().cpu() - b.double()).abs().max().item()
        size = b.abs().max().item()
        if torch_same is not None:
            # The head's gradient is summed over chunks in its own dtype (one rounding per chunk,
            # where torch's single matmul rounds once): allowed 4x torch's own error.
            factor = 4 if name == "grad_head_weight" else 2
            torch_err = (torch_same[i].double() - b.double()).abs().max().item()
            bound = factor * torch_err + 1e-6 * (1 + size)
        elif dtype == torch.float32 or a.dtype == torch.float32:  # a float32 row weight's grad
            bound = 5e-5 * (1 + size)
        else:
            bound = 1e-10 * (1 + size)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (size {size:.3g})"
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_unfused(divergence, dtype, chunk_size, device):
    case = make_heads((3, 11), 16, 24, 53, dtype, device)
    check(case, dtype, chunk_size, divergence=divergence, temperature=2.0, alpha=0.6, beta=0.3,
          reduction="mean")


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("bias,weight,target", [(False, False, False), (True, True, False),
                                                (False, True, True)])
def test_options(reduction, bias, weight, target):
    case = make_heads((29,), 8, 12, 37, torch.float32, bias=bias, weight=weight, target=target)
    check(case, torch.float32, 5, divergence="kl", temperature=1.5,
          alpha=0.5 if target else 1.0, reduction=reduction)


def test_all_ignored_is_zero():
    case = list(make_heads((6,), 8, 8, 10, torch.float32))
    case[7] = torch.full((6,), -100)
    loss, gh, gw, gb, gwt = run(case, torch.float32, 4, alpha=0.5)
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_teacher_gets_no_gradient_and_empty_batch():
    hs, ws, bs, ht, wt, bt, _, _ = make_heads((0,), 8, 8, 10, torch.float32)
    hs.requires_grad_(True)
    wt.requires_grad_(True)  # a teacher head left trainable by mistake is simply not trained
    loss = fused_linear_distillation_loss(hs, ws, ht, wt)
    loss.backward()
    assert loss.item() == 0 and hs.grad.shape == hs.shape and wt.grad is None


def test_bad_arguments():
    hs, ws, bs, ht, wt, bt, w, y = make_heads((5,), 8, 6, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction 'none' is not supported"):
        fused_linear_distillation_loss(hs, ws, ht, wt, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distillation_loss(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_distillation_loss(hs, ws[:, :7], ht, wt)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_distillation_loss(hs, ws, ht, wt[:9])
    with pytest.raises(TypeError, match="teacher_hidden"):
        fused_linear_distillation_loss(hs, ws, ht.double(), wt)
    with pytest.raises(ValueError, match="reduction 'none' is not supported"):
        torch.ops.pykd.fused_linear_distill_loss(hs, ws, None, ht, wt, None, reduction="none")
    with pytest.raises(RuntimeError, match=r"target\[0\] = 10 is outside"):
        fused_linear_distillation_loss(hs, ws, ht, wt, target=torch.full((5,), 10), alpha=0.5)


def test_gradcheck_float64():
    hs, ws, bs, ht, wt, bt, w, y = make_heads((7,), 5, 4, 9, torch.float64)
    w = w.double().requires_grad_(True)

    def fn(a, b, c, d):
        return fused_linear_distillation_loss(a, b, ht, wt, student_bias=c, teacher_bias=bt,
                                              weight=d, target=y, divergence="jsd", alpha=0.7,
                                              temperature=1.3, chunk_size=3)

    leaves = [x.requires_grad_(True) for x in (hs, ws, bs)]
    assert torch.autograd.gradcheck(fn, (*leaves, w))


def test_opcheck():
    hs, ws, bs, ht, wt, bt, w, y = make_heads((2, 5), 8, 6, 11, torch.float32)
    for x in (hs, ws, bs):
        x.requires_grad_(True)
    opts = ("kl", 2.0, 0.5, 0.5, -100, "mean", 4)
    torch.library.opcheck(torch.ops.pykd._fused_linear_distill_loss.default,
                          (hs, ws, bs, ht, wt, bt, w, y, *opts, None, None, None,
                           [True, True, True, False]))
    torch.library.opcheck(torch.ops.pykd.fused_linear_distill_loss.default,
                          (hs, ws, bs, ht, wt, bt, w, y),
                          dict(zip(("divergence", "temperature", "alpha", "beta", "ignore_index",
                                    "reduction", "chunk_size"), opts)))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 41)
    hs, _, _, ht, wt, bt, _, y = make_heads((12,), 16, 8, 41, torch.float32)

    def step(h):
        return fused_linear_distillation_loss(h, head.weight, ht, wt, student_bias=head.bias,
                                              teacher_bias=bt, target=y, alpha=0.5, chunk_size=5)

    eager = step(hs)
    eager.backward()
    expected = head.weight.grad.clone()
    head.zero_grad()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(hs)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(head.weight.grad, expected)


def test_module_face_matches_functional():
    import pykd

    hs, ws, bs, ht, wt, bt, w, y = make_heads((9,), 8, 6, 15, torch.float32)
    loss_fn = pykd.FusedLinearDistillationLoss(divergence="reverse_kl", temperature=1.5,
                                               alpha=0.4, reduction="sum", chunk_size=4)
    assert "chunk_size=4" in repr(loss_fn)
    expected = fused_linear_distillation_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                                              weight=w, target=y, divergence="reverse_kl",
                                              temperature=1.5, alpha=0.4, reduction="sum",
                                              chunk_size=4)
    got = loss_fn(hs, ws, ht, wt, target=y, weight=w, student_bias=bs, teacher_bias=bt)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="none"):
        pykd.FusedLinearDistillationLoss(reduction="none")

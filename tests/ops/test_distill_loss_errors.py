"""Every bad input of docs/loss.md gives a clear error naming the argument, never a crash."""

from __future__ import annotations

import pytest
import torch

import pykd

S = torch.randn(4, 6)
T = torch.randn(4, 6)
Y = torch.tensor([0, 5, -100, 2])


def call(student=S, teacher=T, **kw):
    return pykd.distillation_loss(student, teacher, **kw)


H = torch.randn(4, 3)  # hidden states of the fused linear loss
HEAD = torch.randn(6, 3)  # its [V, H] heads
TOP = torch.randn(4, 6).topk(3, dim=-1)

# Per op: the functional face, and every argument of a valid call by its schema name.
OPS = {
    "distill_loss": (pykd.distillation_loss, dict(student=S, teacher=T)),
    "fused_linear_distill_loss": (pykd.functional.fused_linear_distillation_loss, dict(
        student_hidden=H, student_weight=HEAD, student_bias=None, teacher_hidden=H,
        teacher_weight=HEAD, teacher_bias=None, chunk_size=2)),
    "distill_loss_topk": (pykd.functional.distillation_loss_topk, dict(
        student=S, teacher_indices=TOP.indices, teacher_logits=TOP.values)),
}
OPTIONS = dict(weight=None, target=None, divergence="kl", temperature=1.0, alpha=1.0, beta=0.5,
               ignore_index=-100, reduction="mean")

# (what, op, arguments changed, exception type, text the message must contain). Each rule lives
# in the C++ op; the fake kernels repeat it (pykd/_checks.py) for torch.compile and meta tensors.
ARGUMENT_ERRORS = [
    ("shape mismatch", "distill_loss", dict(teacher=torch.randn(4, 7)), ValueError,
     "teacher shape [4, 7] must equal student shape [4, 6]"),
    ("teacher dtype", "distill_loss", dict(teacher=T.double()), TypeError,
     "teacher dtype float64 must match student dtype float32"),
    ("integer logits", "distill_loss", dict(student=S.long(), teacher=T.long()), TypeError,
     "student must be float32, float64, float16 or bfloat16, got int64"),
    ("scalar logits", "distill_loss", dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)),
     ValueError, "student must be shaped (*, V) with V >= 1, got []"),
    ("empty vocabulary", "distill_loss", dict(student=torch.randn(4, 0),
                                              teacher=torch.randn(4, 0)), ValueError, "V >= 1"),
    ("zero temperature", "distill_loss", dict(temperature=0.0), ValueError,
     "temperature must be finite and > 0, got 0.0"),
    ("negative temperature", "distill_loss", dict(temperature=-1.5), ValueError,
     "temperature must be finite and > 0, got -1.5"),
    ("nan temperature", "distill_loss", dict(temperature=float("nan")), ValueError,
     "temperature must be finite and > 0, got nan"),
    ("inf temperature", "distill_loss", dict(temperature=float("inf")), ValueError,
     "temperature must be finite and > 0, got inf"),
    ("alpha above 1", "distill_loss", dict(target=Y, alpha=1.5), ValueError,
     "alpha must be in [0, 1], got 1.5"),
    ("alpha below 0", "distill_loss", dict(target=Y, alpha=-0.1), ValueError, "alpha must be in"),
    ("beta 0", "distill_loss", dict(divergence="jsd", beta=0.0), ValueError,
     "beta must be in the open interval (0, 1), got 0.0"),
    ("beta 1", "distill_loss", dict(divergence="jsd", beta=1.0), ValueError, "beta must be in"),
    ("unknown divergence", "distill_loss", dict(divergence="kld"), ValueError,
     "divergence must be one of kl, reverse_kl, jsd, mse, cosine; got 'kld'"),
    ("unknown reduction", "distill_loss", dict(reduction="avg"), ValueError,
     "reduction must be one of mean, sum, batchmean, none; got 'avg'"),
    ("alpha without target", "distill_loss", dict(alpha=0.5), ValueError,
     "alpha must be 1 when no target is given"),
    ("target shape", "distill_loss", dict(target=torch.zeros(3, dtype=torch.long)), ValueError,
     "target shape [3] must be the leading shape [4]"),
    ("target dtype", "distill_loss", dict(target=Y.int()), TypeError,
     "target must be int64 class indices, got int32"),
    ("weight shape", "distill_loss", dict(weight=torch.ones(4, 1)), ValueError,
     "weight shape [4, 1] must be the leading shape [4]"),
    ("weight dtype", "distill_loss", dict(weight=torch.ones(4, dtype=torch.float64)), TypeError,
     "weight must be float32 or the logits dtype float32, got float64"),
    ("teacher device", "distill_loss", dict(teacher=T.to("meta")), ValueError,
     "teacher is on meta but student is on cpu"),
    ("weight device", "distill_loss", dict(weight=torch.ones(4, device="meta")), ValueError,
     "weight is on meta but student is on cpu"),
    ("linear reduction none", "fused_linear_distill_loss", dict(reduction="none"), ValueError,
     "reduction 'none' is not supported"),
    ("linear chunk size", "fused_linear_distill_loss", dict(chunk_size=0), ValueError,
     "chunk_size must be >= 1, got 0"),
    ("linear head shape", "fused_linear_distill_loss", dict(student_weight=torch.randn(6, 4)),
     ValueError, "student_weight must be [V, Hs] with V >= 1 and Hs = 3, got [6, 4]"),
    ("linear teacher head", "fused_linear_distill_loss", dict(teacher_weight=torch.randn(5, 3)),
     ValueError, "teacher_weight must be [V, Ht] = [6, 3], got [5, 3]"),
    ("linear leading dims", "fused_linear_distill_loss", dict(teacher_hidden=torch.randn(5, 3)),
     ValueError, "must share the leading dims, got [4, 3] and [5, 3]"),
    ("linear bias shape", "fused_linear_distill_loss", dict(student_bias=torch.zeros(5)),
     ValueError, "student_bias must be [V] = [6], got [5]"),
    ("linear dtype", "fused_linear_distill_loss", dict(teacher_weight=HEAD.double()), TypeError,
     "teacher_weight dtype float64 must match student_hidden dtype float32"),
    ("linear weight shape", "fused_linear_distill_loss", dict(weight=torch.ones(3)), ValueError,
     "weight shape [3] must be the leading shape [4]"),
    ("topk divergence", "distill_loss_topk", dict(divergence="reverse_kl"), ValueError,
     "divergence must be kl or jsd with a top-k teacher, got 'reverse_kl'"),
    ("topk index dtype", "distill_loss_topk", dict(teacher_indices=TOP.indices.float()),
     TypeError, "teacher_indices must be int64 or int32, got float32"),
    ("topk logits dtype", "distill_loss_topk", dict(teacher_logits=TOP.indices), TypeError,
     "teacher_logits must be floating point, got int64"),
    ("topk index shape", "distill_loss_topk", dict(teacher_indices=TOP.indices[:3]), ValueError,
     "teacher_indices must be (*, k) with k >= 1 and the student's leading dims, got [3, 3]"),
    ("topk logits shape", "distill_loss_topk", dict(teacher_logits=TOP.values[:, :2]), ValueError,
     "teacher_logits shape [4, 2] must equal teacher_indices shape [4, 3]"),
    ("topk device", "distill_loss_topk", dict(teacher_logits=TOP.values.to("meta")), ValueError,
     "teacher_logits is on meta but student is on cpu"),
]


def arguments(op, kw, device=None):
    args = {**OPS[op][1], **OPTIONS, **kw}
    if op != "fused_linear_distill_loss":
        args.pop("chunk_size", None)
    if device is not None:
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return args


def raised(fn, **args):
    with pytest.raises(Exception) as info:
        fn(**args)
    return info.type, str(info.value)


@pytest.mark.parametrize("what,op,kw,exc,text", ARGUMENT_ERRORS,
                         ids=[c[0] for c in ARGUMENT_ERRORS])
def test_argument_errors_are_one_rule_everywhere(what, op, kw, exc, text):
    args = arguments(op, kw)
    face = raised(OPS[op][0], **args)
    assert face[0] is exc and text in face[1] and face[1].startswith(op + ": "), face
    # The same mistake through torch.ops: the same type, word for word the same message.
    assert raised(getattr(torch.ops.pykd, op), **args) == face
    if not any(isinstance(v, torch.Tensor) and v.is_meta for v in kw.values()):
        # And through the fake kernel (meta tensors, as under torch.compile).
        assert raised(getattr(torch.ops.pykd, op), **arguments(op, kw, "meta")) == face


@pytest.mark.parametrize("what,value", [("temperature", "2"), ("alpha", None), ("beta", True)])
def test_options_of_the_wrong_type_are_named(what, value):
    with pytest.raises(TypeError, match=f"distill_loss: {what} must be a real number"):
        pykd.distillation_loss(S, T, target=Y, **{what: value})


def test_non_tensors_are_named():
    with pytest.raises(TypeError, match="distill_loss: teacher must be a tensor, got list"):
        pykd.distillation_loss(S, [[0.0] * 6] * 4)
    with pytest.raises(TypeError, match="chunk_size must be an int, got 1.5"):
        pykd.functional.fused_linear_distillation_loss(H, HEAD, H, HEAD, chunk_size=1.5)


def test_modules_check_options_when_built():
    with pytest.raises(ValueError, match="distill_loss: temperature must be finite and > 0"):
        pykd.DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="fused_linear_distill_loss: reduction 'none' is not"):
        pykd.FusedLinearDistillationLoss(reduction="none")


def test_label_out_of_range_raises():
    for bad in (6, -1, 1000):
        y = torch.tensor([0, bad, 1, 2])
        with pytest.raises(RuntimeError) as info:
            call(target=y, alpha=0.5)
        msg = str(info.value)
        assert f"target[1] = {bad}" in msg and "outside [0, 6)" in msg, msg


def test_negative_weight_raises():
    w = torch.tensor([1.0, 0.5, -0.25, 1.0])
    with pytest.raises(RuntimeError) as info:
        call(weight=w)
    assert "weight[2]" in str(info.value) and "negative" in str(info.value)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_all_neg_inf_row_raises(divergence, which):
    s, t = S.clone(), T.clone()
    (s if which == "student" else t)[2] = float("-inf")
    with pytest.raises(RuntimeError, match="row 2 has no finite logit"):
        call(student=s, teacher=t, divergence=divergence)


def test_all_neg_inf_row_of_an_ignored_label_is_fine():
    s = S.clone()
    s[2] = float("-inf")
    out = call(student=s, teacher=s.clone(), target=Y, alpha=0.5)  # row 2 is ignored
    assert torch.isfinite(out)


def test_all_neg_inf_row_needs_a_softmax_only_for_the_hard_term():
    s, t = S.clone(), T.clone()
    s[1] = float("-inf")
    with pytest.raises(RuntimeError, match="row 1 has no finite logit"):
        call(student=s, teacher=t, divergence="mse", target=Y, alpha=0.5)

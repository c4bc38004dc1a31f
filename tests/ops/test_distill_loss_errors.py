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


# (what, call kwargs, exception type, text the message must contain)
ARGUMENT_ERRORS = [
    ("shape mismatch", dict(teacher=torch.randn(4, 7)), ValueError, "teacher shape"),
    ("teacher dtype", dict(teacher=T.double()), TypeError, "teacher dtype"),
    ("integer logits", dict(student=S.long(), teacher=T.long()), TypeError, "student must be"),
    ("scalar logits", dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)), ValueError,
     "(*, V)"),
    ("empty vocabulary", dict(student=torch.randn(4, 0), teacher=torch.randn(4, 0)), ValueError,
     "V >= 1"),
    ("zero temperature", dict(temperature=0.0), ValueError, "temperature"),
    ("negative temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("nan temperature", dict(temperature=float("nan")), ValueError, "temperature"),
    ("inf temperature", dict(temperature=float("inf")), ValueError, "temperature"),
    ("alpha above 1", dict(target=Y, alpha=1.5), ValueError, "alpha"),
    ("alpha below 0", dict(target=Y, alpha=-0.1), ValueError, "alpha"),
    ("beta 0", dict(divergence="jsd", beta=0.0), ValueError, "beta"),
    ("beta 1", dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    ("unknown divergence", dict(divergence="kld"), ValueError, "divergence"),
    ("unknown reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("alpha without target", dict(alpha=0.5), ValueError, "no target"),
    ("target shape", dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target shape"),
    ("target dtype", dict(target=Y.int()), TypeError, "target must be int64"),
    ("weight shape", dict(weight=torch.ones(4, 1)), ValueError, "weight shape"),
    ("weight dtype", dict(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight must"),
    ("teacher device", dict(teacher=T.to("meta")), ValueError, "teacher is on"),
]


@pytest.mark.parametrize("what,kw,exc,text", ARGUMENT_ERRORS, ids=[c[0] for c in ARGUMENT_ERRORS])
def test_argument_errors_name_the_argument(what, kw, exc, text):
    with pytest.raises(exc, match=None) as info:
        call(**kw)
    assert text in str(info.value), str(info.value)


# The same mistakes reaching the op directly meet the C++ checks (a RuntimeError naming the
# argument) rather than a crash.
OP_ERRORS = [
    (dict(teacher=torch.randn(4, 7)), "teacher shape [4, 7] must equal student shape [4, 6]"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(alpha=0.5), "alpha must be 1 when no target is given"),
    (dict(beta=1.0), "beta must be in the open interval (0, 1)"),
    (dict(divergence="kld"), "divergence must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(target=torch.zeros(3, dtype=torch.long)), "target shape [3] must be the leading shape"),
    (dict(weight=torch.ones(5)), "weight shape [5] must be the leading shape [4]"),
    (dict(teacher=T.half()), "teacher dtype Half must match student dtype Float"),
]


@pytest.mark.parametrize("kw,text", OP_ERRORS, ids=[t for _, t in OP_ERRORS])
def test_op_checks_are_a_second_line(kw, text):
    args = dict(student=S, teacher=T, weight=None, target=None)
    opts = dict(divergence="kl", temperature=1.0, alpha=1.0, beta=0.5, ignore_index=-100,
                reduction="mean")
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    with pytest.raises(RuntimeError, match=None) as info:
        torch.ops.pykd.distill_loss(args["student"], args["teacher"], args["weight"],
                                    args["target"], **opts)
    assert text in str(info.value), str(info.value)


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

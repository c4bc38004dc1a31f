"""Soft-only rows in the Distiller: transfer-set rows (label ``soft_index``) beside labelled ones.

A row labelled ``soft_index`` has no label: its loss is the soft term alone (alpha 1), and it
counts in the step's normaliser like every other row. So one batch mixing labelled and soft-only
rows trains exactly as two micro-batches, one labelled and one without labels, accumulated into
one step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pykd

SOFT = -1
CLASSES, FEATURES = 5, 7


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = torch.nn.Linear(FEATURES, CLASSES).double()
    student = torch.nn.Linear(FEATURES, CLASSES).double()
    return teacher, student


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, FEATURES, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (12,), generator=g)
    labels[[1, 4, 5, 9]] = SOFT
    labels[7] = -100  # padding stays out of both terms
    weight = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "labels": labels, "sample_weight": weight}


class _Net(torch.nn.Module):
    def __init__(self, linear: torch.nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _distiller(teacher, student, **options) -> pykd.Distiller:
    return pykd.Distiller(_Net(teacher), _Net(student), soft_index=SOFT, temperature=2.0,
                          alpha=0.3, optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                          progress=False, **options)


def _expected_loss(teacher, student, batch, temperature=2.0, alpha=0.3) -> torch.Tensor:
    """The objective written out: soft-only rows soft, labelled rows mixed, padding out."""
    s, t = student(batch["x"]), teacher(batch["x"]).detach()
    y, w = batch["labels"], batch["sample_weight"]
    soft = temperature**2 * F.kl_div(F.log_softmax(s / temperature, -1),
                                     F.log_softmax(t / temperature, -1), log_target=True,
                                     reduction="none").sum(-1)
    ce = F.cross_entropy(s, y.clamp_min(0), reduction="none")
    row = torch.where(y == SOFT, soft, alpha * soft + (1 - alpha) * ce)
    keep = y != -100
    w = w / w.sum()  # the Distiller normalises the sample weights over the batch
    return (w * row)[keep].sum() / w[keep].sum()


def test_one_step_follows_the_written_out_objective():
    teacher, student = _models()
    ref_student = copy.deepcopy(student)
    batch = _batch()
    _distiller(teacher, student).fit([batch], epochs=1)
    loss = _expected_loss(teacher, ref_student, batch)
    grads = torch.autograd.grad(loss, list(ref_student.parameters()))
    # Row weights are kept in float32 (pykd.rows.row_weights): float32 closeness, not float64.
    for p, p0, g in zip(student.parameters(), ref_student.parameters(), grads):
        torch.testing.assert_close(p, p0 - g, rtol=1e-5, atol=1e-7)


def test_a_mixed_batch_trains_as_a_labelled_and_an_unlabelled_micro_batch():
    teacher, student = _models()
    twin = copy.deepcopy(student)
    batch = _batch()
    batch["sample_weight"] = torch.ones(12, dtype=torch.float64)  # per micro-batch normalising
    _distiller(teacher, student).fit([batch], epochs=1)

    soft = batch["labels"] == SOFT
    labelled = {"x": batch["x"][~soft], "labels": batch["labels"][~soft]}
    unlabelled = {"x": batch["x"][soft]}
    _distiller(teacher, twin, accumulation_steps=2).fit([labelled, unlabelled], epochs=1)
    for a, b in zip(student.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_metrics_say_what_each_row_kind_gives():
    teacher, student = _models()
    batch = _batch()
    metrics = _distiller(teacher, student).evaluate([batch])
    y = batch["labels"]
    has_label = (y != SOFT) & (y != -100)
    s = student(batch["x"])
    expected_acc = (s.argmax(-1) == y)[has_label].double().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected_acc)
    w = batch["sample_weight"]
    ce = F.cross_entropy(s, y.clamp_min(0), reduction="none")
    assert metrics["ce"] == pytest.approx(((w * ce)[has_label].sum() / w[has_label].sum()).item())
    assert metrics["loss"] == pytest.approx(_expected_loss(teacher, student, batch).item())


def test_alpha_zero_still_runs_the_teacher_for_soft_only_rows():
    teacher, student = _models()
    calls = []
    net = _Net(teacher)
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    distiller = pykd.Distiller(net, _Net(student), soft_index=SOFT, alpha=0.0, progress=False)
    distiller.fit([_batch()], epochs=1)
    assert calls  # the soft-only rows need it
    calls.clear()
    plain = _batch()
    plain["labels"] = plain["labels"].clamp_min(0)
    distiller.fit([plain], epochs=2)
    assert not calls  # labelled rows only: alpha = 0 needs no teacher


@pytest.mark.parametrize("value", [-100, 3, 1.5])
def test_soft_index_must_be_a_negative_int_other_than_ignore_index(value):
    with pytest.raises(ValueError, match="soft_index must be a negative int other than"):
        pykd.DistillationConfig(soft_index=value)


def test_without_soft_index_the_label_is_refused_as_out_of_range():
    teacher, student = _models()
    distiller = pykd.Distiller(_Net(teacher), _Net(student), progress=False)
    with pytest.raises(RuntimeError, match=r"is outside \[0, 5\) and is not ignore_index"):
        distiller.fit([_batch()], epochs=1)

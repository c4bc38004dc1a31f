"""pykd.Distiller under hostile conditions: non-finite losses and gradients, bad inputs, steps
with nothing to learn from, stale checkpoint temporaries and repeated fit calls."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from distiller_models import TinyLM, batches, make, same_weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pykd
from pykd import schedules


class NaNGrad(torch.autograd.Function):
    """The identity, whose backward returns NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class BadGrad(TinyLM):
    """NaN gradients from the batches flagged by the input ``poison`` (unless not ``armed``)."""

    armed = True

    def forward(self, input_ids, attention_mask=None, poison=None):
        out = super().forward(input_ids, attention_mask)
        if self.armed and poison is not None and poison.any():
            out["logits"] = NaNGrad.apply(out["logits"])
        return out


def poisoned(n: int, bad: set[int], size: int = 3) -> list[dict]:
    data = batches(n, size=size)
    for i, b in enumerate(data):
        b["poison"] = torch.full((size,), i in bad)
    return data


class Snapshots(pykd.Callback):
    """The student's weights and the optimizer's state after every step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict] = []
        self.optimizer: list[dict] = []

    def on_step_end(self, distiller, step, metrics):
        self.steps.append(step)
        self.weights.append(copy.deepcopy(distiller.student.state_dict()))
        self.optimizer.append(copy.deepcopy(distiller.optimizer.state_dict()))


def assert_same_state(a, b) -> None:
    """Two state dicts (nested dicts, lists and tensors) are equal, NaN equal to NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def no_grads(*modules: nn.Module) -> bool:
    return all(p.grad is None for m in modules for p in m.parameters())


# ---------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_nan_gradient_with_a_finite_loss_stops_before_the_step(max_grad_norm,
                                                                 accumulation_steps):
    """The optimizer never sees the NaN gradient: weights and optimizer state stay those of the
    last good step, and the error names the step and its batches."""
    snapshots = Snapshots()
    distiller = make(BadGrad(width=12), BadGrad(width=6), max_grad_norm=max_grad_norm,
                     accumulation_steps=accumulation_steps, callbacks=[snapshots], alpha=0.5)
    bad = 3 * accumulation_steps - 1  # the last batch of the third step
    batch = (f"batch {bad}" if accumulation_steps == 1
             else f"batches {bad - 1}-{bad}")
    with pytest.raises(pykd.NonFiniteLossError,
                       match=rf"gradient .* at step 3 \(epoch 0, {batch} of the epoch\)"):
        distiller.fit(poisoned(4 * accumulation_steps, {bad}), epochs=1)
    assert snapshots.steps == [1, 2] and distiller.global_step == 2
    assert_same_state(distiller.student.state_dict(), snapshots.weights[-1])
    assert_same_state(distiller.optimizer.state_dict(), snapshots.optimizer[-1])
    assert no_grads(distiller.student)


@pytest.mark.parametrize("poison", ["one NaN logit", "one inf logit", "all logits NaN"])
def test_non_finite_weights_stop_at_the_first_step(poison):
    """A student whose parameters are non-finite gives a non-finite loss: nothing is stepped.
    (Rows of NaN logits only give the op a NaN loss, as partly NaN rows do.)"""
    student = TinyLM(width=6)
    with torch.no_grad():
        bias = student.head.bias if poison == "all logits NaN" else student.head.bias[:1]
        bias.fill_(float("inf") if poison == "one inf logit" else float("nan"))
    before = copy.deepcopy(student.state_dict())
    distiller = make(student=student, alpha=0.5)
    with pytest.raises(pykd.NonFiniteLossError,
                       match=r"loss \(nan\) at step 1 \(epoch 0, batch 0 of the epoch\)"):
        distiller.fit(batches(2), epochs=1)
    assert_same_state(student.state_dict(), before)
    assert distiller.optimizer.state_dict()["state"] == {} and distiller.global_step == 0
    assert no_grads(student)


def test_fp16_skips_a_step_whose_gradients_overflow_as_grad_scaler_does():
    """Under fp16 a non-finite gradient is the loss scale overflowing: the step is skipped (no
    weight, optimizer, scheduler or step count change), the scale backs off, training goes on."""
    snapshots = Snapshots()
    student = BadGrad(width=6)
    distiller = make(BadGrad(width=12), student, precision="fp16", callbacks=[snapshots],
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
                     scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    scale = distiller.scaler.get_scale()
    distiller.fit(poisoned(3, {1}), epochs=1)
    assert snapshots.steps == [1, 2] and distiller.global_step == 2
    assert distiller.scaler.get_scale() == scale * distiller.scaler.get_backoff_factor()
    assert distiller.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    assert all(torch.isfinite(p).all() for p in student.parameters())

    # The same as a run that never saw the poisoned batch.
    clean = make(distiller.teachers[0], BadGrad(width=6), precision="fp16",
                 optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    clean.student.load_state_dict(snapshots.weights[0])
    clean.optimizer.load_state_dict(snapshots.optimizer[0])
    clean.fit(poisoned(3, {1})[2:], epochs=1)
    same_weights(student, clean.student, rtol=1e-4, atol=1e-6)


def test_mutual_distiller_stops_before_stepping_any_model_on_a_nan_gradient():
    """Model 0's gradient is finite (its peer is detached), yet it is not stepped either."""
    models = [BadGrad(width=6), BadGrad(width=8)]
    models[0].armed = False
    before = [copy.deepcopy(m.state_dict()) for m in models]
    distiller = pykd.MutualDistiller(models, progress=False, max_grad_norm=1.0)
    with pytest.raises(pykd.NonFiniteLossError,
                       match=r"gradient \(norm nan\) of optimizer 1 .* at step 1 "):
        distiller.fit(poisoned(2, {0}), epochs=1)
    for model, state in zip(models, before):
        assert_same_state(model.state_dict(), state)
    assert all(opt.state_dict()["state"] == {} for opt in distiller.optimizers)
    assert no_grads(*models)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan")])
def test_max_grad_norm_must_be_positive(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        make(max_grad_norm=value)


def unlabelled(n: int = 2) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches(n)]


@pytest.mark.parametrize("alpha", [1.5, -0.1, float("nan"), schedules.Linear(1.0, 2.0, steps=4),
                                   schedules.Warmup(2, then=0.5, start=-1.0)])
def test_alpha_outside_0_1_is_refused_when_known(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        make(alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha\[1\] must be in \[0, 1\]"):
        pykd.MutualDistiller([TinyLM(width=6), TinyLM(width=6)], alpha=[0.5, alpha])


def test_an_alpha_schedule_leaving_0_1_is_refused_at_run_time():
    """Unlabelled data never passes alpha to the op, which would refuse it."""
    distiller = make(alpha=lambda step: 1.0 if step < 1 else 1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5 .*step 1"):
        distiller.fit(unlabelled(3), epochs=1)
    assert distiller.global_step == 1
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distiller.evaluate(unlabelled(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_labels_must_be_integer_class_indices(dtype):
    data = batches(1)
    data[0]["labels"] = data[0]["labels"].clamp_min(0).to(dtype)
    with pytest.raises(TypeError, match="labels"):
        make().fit(data, epochs=1)
    with pytest.raises(TypeError, match="labels"):
        make().evaluate(data)


def test_labels_of_the_wrong_shape_are_named():
    data = batches(1, length=5)
    data[0]["labels"] = data[0]["labels"][:, :4]
    with pytest.raises(ValueError, match=r"labels shaped \(3, 4\)"):
        make().fit(data, epochs=1)


@pytest.mark.parametrize("weight", [[-1.0, -1.0, -1.0], [2.0, -1.0, 1.0], [1.0, math.nan, 1.0],
                                    [1.0, math.inf, 1.0]])
def test_sample_weight_must_be_finite_and_non_negative(weight):
    """All -1 would pass a check of the normalised weights (-1 / -3 > 0): the raw ones count."""
    data = batches(2)
    data[1]["sample_weight"] = torch.tensor(weight)
    distiller = make()
    with pytest.raises(ValueError, match=r"sample_weight .*batch 1"):
        distiller.fit(data, epochs=1)
    with pytest.raises(ValueError, match="sample_weight"):
        distiller.evaluate(data[1:])


def test_empty_loaders_are_refused():
    with pytest.raises(ValueError, match="train_loader yielded no batches"):
        make().fit([], epochs=1)
    with pytest.raises(ValueError, match="eval_loader yielded no batches"):
        make().fit(batches(1), epochs=1, eval_loader=[])
    with pytest.raises(ValueError, match="loader yielded no batches"):
        make().evaluate(DataLoader(TensorDataset(torch.zeros(0, 4)), batch_size=2))
    # A generator is used up after one pass: the second epoch would silently train on nothing.
    with pytest.raises(ValueError, match="train_loader yielded no batches in epoch 1"):
        make().fit((b for b in batches(2)), epochs=2)


@pytest.mark.parametrize("top_k", [3, None])
def test_a_cache_of_another_number_of_classes_is_refused(tmp_path, top_k):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 10, (8,)))
    cache = pykd.TeacherCache.build(tmp_path / "c", nn.Linear(4, 10), data, top_k=top_k,
                                    batch_size=4)
    assert cache.vocab_size == 10
    loader = cache.attach(DataLoader(data, batch_size=4))
    with pytest.raises(ValueError, match=r"10 classes.*12"):
        make(cache, nn.Linear(4, 12), alpha=0.5).fit(loader, epochs=1)


# ------------------------------------------------------------------ steps with no weight


def ignored(b: dict) -> dict:
    return {**b, "labels": torch.full_like(b["labels"], -100)}


def adamw(params):
    return torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_step_with_no_labelled_row_is_not_taken(accumulation_steps):
    """AdamW would decay the weights on a zero gradient: a group whose rows all have zero weight
    steps nothing and counts no step. A group with one labelled batch is a step as usual."""
    g0, g1 = batches(2, seed=3)
    data = ([g0, ignored(g1), g1] if accumulation_steps == 1 else
            [ignored(g0), ignored(g1), ignored(g0), g0, g1, ignored(g0)])
    student = TinyLM(width=6)
    reference = copy.deepcopy(student)
    snapshots = Snapshots()
    distiller = make(student=student, optimizer=adamw, accumulation_steps=accumulation_steps,
                     alpha=0.5, callbacks=[snapshots])
    distiller.fit(data, epochs=1)
    assert snapshots.steps == [1, 2] and distiller.global_step == 2
    # The same as a run over the labelled batches alone: ignored rows add nothing to a step.
    make(distiller.teachers[0], reference, optimizer=adamw, alpha=0.5).fit([g0, g1], epochs=1)
    same_weights(student, reference)


def test_a_step_with_only_ignored_labels_but_hidden_rows_is_taken():
    """Hidden-state matching weighs the tokens, not the labels: such a step has weight."""
    match = pykd.HiddenMatch({1: 2}, student_width=6, teacher_width=12)
    distiller = make(hidden=match, optimizer=adamw)
    distiller.fit([ignored(b) for b in batches(2)], epochs=1)
    assert distiller.global_step == 2


def test_evaluate_reports_no_accuracy_without_a_labelled_row():
    distiller = make(alpha=0.5)
    metrics = distiller.evaluate([ignored(b) for b in batches(2)])
    assert "accuracy" not in metrics and "agreement" not in metrics and "kl" not in metrics
    mixed = distiller.evaluate([ignored(batches(1)[0]), *unlabelled(1)])
    assert "accuracy" not in mixed and math.isfinite(mixed["agreement"])
    assert math.isfinite(distiller.evaluate(batches(1))["accuracy"])


# ----------------------------------------------------------------- checkpoints and fit


def test_the_next_save_removes_stale_temporaries_of_that_checkpoint(tmp_path):
    """A write killed midway (SIGKILL: no cleanup runs) leaves its temporary file behind."""
    stale = [tmp_path / ".ckpt.pt.k3j_9x2a.tmp", tmp_path / ".ckpt.pt.abc.tmp"]
    others = [tmp_path / ".ckpt.pt.x.a1b2c3d4.tmp",  # checkpoint "ckpt.pt.x"'s
              tmp_path / ".other.pt.a1b2c3d4.tmp", tmp_path / "ckpt.pt.a1b2c3d4.tmp",
              tmp_path / ".ckpt.pt.a1b2c3d4.tmp.keep", tmp_path / "notes.tmp"]
    for path in stale + others:
        path.write_bytes(b"half a checkpoint")
    make().save_checkpoint(tmp_path / "ckpt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.pt", *(p.name for p in others)])
    make().load_checkpoint(tmp_path / "ckpt.pt")


def test_fit_again_with_the_same_epochs_warns_that_epochs_is_a_total():
    distiller = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.fit(batches(2), epochs=1)
    with pytest.warns(UserWarning, match=r"1 epoch\(s\) are already done.*total.*epochs=2"):
        assert distiller.fit(batches(2), epochs=1) == {}
    assert (distiller.epoch, distiller.global_step) == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.fit(batches(2), epochs=2)
    assert (distiller.epoch, distiller.global_step) == (2, 4)



def test_the_step_norm_is_the_float64_norm_and_keeps_non_finite_entries():
    # pykd.update.total_norm takes BLAS dots for float32 CPU gradients (others: torch's norm):
    # the same norm as a float64 one, NaN/inf where an entry is, a float32-overflowing dot
    # redone, and a non-contiguous gradient read right.
    from pykd.update import total_norm

    torch.manual_seed(0)
    cases = [[torch.randn(300, 700), torch.randn(5, 7), torch.randn(5)],
             [torch.randn(300, 700) * 1e18, torch.randn(3)],  # squares overflow float32
             [torch.randn(300, 700).t()], [torch.randn(10)], [torch.randn(70000).double()]]
    for grads in cases:
        want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
        assert total_norm(grads).item() == pytest.approx(want.item(), rel=1e-5)
    for bad in (float("nan"), float("inf"), float("-inf")):
        g = torch.randn(300, 700)
        g[7, 11] = bad
        norm = total_norm([g, torch.randn(3)]).item()
        assert not math.isfinite(norm) and (math.isnan(norm) == math.isnan(bad))

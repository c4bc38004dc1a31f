"""pykd.Distiller: batch and output formats, normalisation, resume, DDP, adaptive KD, schedules."""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from distiller_models import (
    VOCAB,
    Kill,
    Killed,
    TinyLM,
    TokenDataset,
    batches,
    make,
    same_weights,
    token_batch,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchrun import run_two_processes

import pykd
from pykd import checkpoint, schedules


def manual_step(teacher, student, batch, lr, **loss_options) -> torch.Tensor:
    """One SGD step on one batch with the op's own mean reduction; returns the loss."""
    with torch.no_grad():
        t = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
    s = student(batch["input_ids"], batch["attention_mask"])["logits"]
    loss = pykd.distillation_loss(s, t, target=batch["labels"], **loss_options)
    student.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * p.grad
    return loss.detach()


class Record(pykd.Callback):
    """Every hook call, with the step metrics."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.steps: list[dict] = []

    def on_fit_start(self, distiller):
        self.calls.append(("fit_start",))

    def on_epoch_start(self, distiller, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_step_end(self, distiller, step, metrics):
        self.calls.append(("step_end", step))
        self.steps.append(metrics)

    def on_eval_end(self, distiller, metrics):
        self.calls.append(("eval_end",))

    def on_epoch_end(self, distiller, epoch, metrics):
        self.calls.append(("epoch_end", epoch))

    def on_fit_end(self, distiller):
        self.calls.append(("fit_end",))


# ----------------------------------------------------------------------- formats and rows


@pytest.mark.parametrize("output", ["tensor", "dict", "object"])
@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_output_and_batch_formats_train_like_the_op(output, form):
    """Sequence classification: each model output and batch form gives the op's loss and step."""
    teacher, student = TinyLM(width=12, pooled=True), TinyLM(width=6, pooled=True)
    reference = TinyLM(width=6, pooled=True)
    reference.load_state_dict(student.state_dict())
    teacher.output = student.output = output
    data = [token_batch(4, 5, torch.Generator().manual_seed(i)) for i in range(3)]
    for b in data:
        b["labels"] = torch.randint(0, VOCAB, (4,))
        b["attention_mask"] = torch.ones_like(b["attention_mask"])  # the tuple form has no mask
    loader = data if form == "dict" else [(b["input_ids"], b["labels"]) for b in data]
    record = Record()
    distiller = make(teacher, student, temperature=2.0, alpha=0.3,
                     optimizer=torch.optim.SGD(student.parameters(), lr=0.5), callbacks=[record])
    distiller.fit(loader, epochs=1)
    teacher.output = "dict"
    expected = [manual_step(teacher, reference, b, 0.5, temperature=2.0, alpha=0.3) for b in data]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in record.steps]),
                               torch.stack(expected), rtol=1e-5, atol=1e-6)
    student.output = "dict"
    same_weights(student, reference, rtol=1e-5, atol=1e-6)


def test_token_level_padding_is_ignored():
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    data = batches(2)
    metrics = make(teacher, student, temperature=3.0, alpha=0.5).evaluate(data)
    s_all, t_all, y_all = [], [], []
    with torch.no_grad():
        for b in data:
            s_all.append(student(b["input_ids"])["logits"].flatten(0, 1))
            t_all.append(teacher(b["input_ids"])["logits"].flatten(0, 1))
            y_all.append(b["labels"].flatten())
    s, t, y = torch.cat(s_all), torch.cat(t_all), torch.cat(y_all)
    valid = y != -100
    assert 0 < valid.sum() < len(y)
    expected = pykd.distillation_loss(s, t, target=y, temperature=3.0, alpha=0.5)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["soft"] == pytest.approx(
        pykd.distillation_loss(s, t, target=y, temperature=3.0).item(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(
        (s.argmax(-1) == y)[valid].float().mean().item())
    assert metrics["agreement"] == pytest.approx(
        (s.argmax(-1) == t.argmax(-1))[valid].float().mean().item())


def test_causal_lm_compares_position_t_with_label_t_plus_1():
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    (b,) = batches(1, size=4, length=7)
    with torch.no_grad():
        s = student(b["input_ids"])["logits"]
        t = teacher(b["input_ids"])["logits"]
    labelled = make(teacher, student, causal_lm=True, alpha=0.5).evaluate([b])
    expected = pykd.distillation_loss(s[:, :-1], t[:, :-1], target=b["labels"][:, 1:], alpha=0.5)
    assert labelled["loss"] == pytest.approx(expected.item(), rel=1e-5)

    # Without labels, row t counts where tokens t and t + 1 are both real.
    unlabelled = {k: v for k, v in b.items() if k != "labels"}
    metrics = make(teacher, student, causal_lm=True).evaluate([unlabelled])
    mask = b["attention_mask"].bool()
    rows = (mask[:, :-1] & mask[:, 1:]).float()
    expected = pykd.distillation_loss(s[:, :-1], t[:, :-1], weight=rows)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


class LeftPadded(torch.utils.data.Dataset):
    """Token sequences padded on the left, labels ``-100`` on the padding."""

    def __init__(self) -> None:
        self.ids = torch.randint(1, VOCAB, (8, 6), generator=torch.Generator().manual_seed(2))
        self.mask = (torch.arange(6) >= torch.tensor([2, 0, 3, 1, 2, 4, 0, 1])[:, None]).long()
        self.ids *= self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def test_causal_lm_with_left_padding_counts_no_padding_position(tmp_path):
    """The last pad's shifted label is the first real token, but the pad is no row: a cache
    (which holds nothing there) and the live teacher give the same metrics."""
    torch.manual_seed(0)
    teacher, student, data = TinyLM(width=12), TinyLM(width=6), LeftPadded()
    loader = DataLoader(data, batch_size=4)
    cache = pykd.TeacherCache.build(tmp_path / "c", teacher, data, dtype="float32")
    live = make(teacher, student, causal_lm=True, alpha=0.5).evaluate(loader)
    cached = make(cache, student, causal_lm=True, alpha=0.5).evaluate(cache.attach(loader))
    assert cached == pytest.approx(live, rel=1e-5)


@pytest.mark.parametrize("extras", ["plain", "hidden+sample_weight"])
def test_accumulation_equals_one_big_batch(extras):
    """4 micro-batches with uneven padding == 1 batch of them all: loss and update."""
    data = TokenDataset(8, length=6, seed=3)
    options = {"temperature": 2.0, "alpha": 0.7}
    if extras != "plain":
        options["hidden"] = pykd.HiddenMatch({1: 2, 2: 3}, weight=0.5, student_width=6,
                                             teacher_width=12)
        for i, item in enumerate(data.items):
            item["sample_weight"] = torch.tensor(0.5 + i / 4)

    def one_step(batch_size, steps):
        torch.manual_seed(0)
        teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
        record = Record()
        distiller = make(teacher, student, accumulation_steps=steps, callbacks=[record],
                         optimizer=lambda params: torch.optim.SGD(params, lr=1.0), **options)
        distiller.fit(DataLoader(data, batch_size=batch_size), epochs=1)
        assert len(record.steps) == 1
        return teacher, distiller, record.steps[0]["loss"]

    _, small, small_loss = one_step(2, 4)
    teacher, big, big_loss = one_step(8, 1)
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    same_weights(small.student, big.student, rtol=1e-6, atol=1e-7)
    same_weights(small.projections, big.projections, rtol=1e-6, atol=1e-7)
    if extras == "plain":
        torch.manual_seed(0)
        TinyLM(width=12, depth=3)
        reference = TinyLM(width=6)
        full = next(iter(DataLoader(data, batch_size=8)))
        expected = manual_step(teacher, reference, full, 1.0, **options)
        assert big_loss == pytest.approx(expected.item(), rel=1e-6)
        same_weights(big.student, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_op_gradient_is_never_rescaled(monkeypatch, precision):
    """Normaliser, loss weights and the fp16 loss scale are folded into the op's weights: every
    backward reaches the op with an incoming gradient of exactly 1 (its zero-copy path)."""
    incoming = []
    original = pykd.ops._scaled

    def spy(grad, d_loss, in_place):
        incoming.append(d_loss.item())
        return original(grad, d_loss, in_place)

    monkeypatch.setattr(pykd.ops, "_scaled", spy)
    match = pykd.HiddenMatch({1: 2}, weight=0.5, student_width=6, teacher_width=12)
    make(hidden=match, accumulation_steps=2, alpha=0.5, temperature=2.0, precision=precision,
         sample_weighting="confidence").fit(batches(4), epochs=1)
    assert len(incoming) == 8 and set(incoming) == {1.0}  # 4 micro-batches, logits + hidden


def test_gradient_clipping_bounds_the_update():
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    before = [p.detach().clone() for p in student.parameters()]
    make(teacher, student, max_grad_norm=0.01, temperature=2.0,
         optimizer=lambda params: torch.optim.SGD(params, lr=1.0)).fit(batches(1), epochs=1)
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)])
    assert 0 < change.norm() <= 0.01 + 1e-6


# ------------------------------------------------------------------- checkpoints and errors


def _resumable_run(path: Path, callbacks=(), resume: bool = False, init_seed: int = 0):
    torch.manual_seed(0)
    teacher = TinyLM(width=12, depth=3)  # the same trained teacher in every run
    torch.manual_seed(init_seed)
    student = TinyLM(width=6, dropout=0.2)
    distiller = make(
        teacher, student, temperature=schedules.Linear(3.0, 1.0, steps=8), alpha=0.5,
        accumulation_steps=2, lr=0.02, max_grad_norm=1.0,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
        checkpoint_path=path, checkpoint_every=2, callbacks=list(callbacks), seed=5,
    )
    loader = DataLoader(TokenDataset(20, seed=4, noisy=True), batch_size=3, shuffle=True)
    distiller.fit(loader, epochs=2, resume_from=path if resume else None)
    return distiller


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """Dropout (torch RNG), noisy data (Python and NumPy RNGs), shuffling, accumulation, an LR
    scheduler and a temperature schedule: the resumed run ends with the same weights."""
    _seed_all(0)
    full = _resumable_run(tmp_path / "full.pt")
    assert full.global_step == 8  # 7 batches an epoch in groups of 2 -> 4 steps

    _seed_all(0)
    path = tmp_path / "killed.pt"
    with pytest.raises(Killed):
        _resumable_run(path, callbacks=[Kill(at=3)])  # mid-epoch 0; last checkpoint at step 2
    state = torch.load(path, weights_only=True)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 4)
    _seed_all(123)  # a fresh process: other RNG positions and initial weights
    record = Record()
    resumed = _resumable_run(path, callbacks=[record], resume=True, init_seed=9)
    assert [c[1] for c in record.calls if c[0] == "step_end"] == [3, 4, 5, 6, 7, 8]
    same_weights(resumed.student, full.student, rtol=0, atol=0)


class DrawsRandom(pykd.Callback):
    """Draws from the global RNG after every step, as a callback logging a random sample would."""

    def on_step_end(self, distiller, step, metrics):
        torch.rand(1)


def test_resume_replays_what_callbacks_draw_from_the_rng(tmp_path):
    """The checkpoint is written after the callbacks, so it holds the RNG past their draws."""

    def run(path, callbacks, resume=False):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3))
        make(nn.Linear(8, 3), student, lr=1e-2, checkpoint_path=path, checkpoint_every=2,
             callbacks=[DrawsRandom(), *callbacks]).fit(loader, 2,
                                                         resume_from=path if resume else None)
        return student

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 8, generator=generator),
                         torch.randint(0, 3, (48,), generator=generator))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    with pytest.raises(Killed):
        run(tmp_path / "killed.pt", [Kill(at=5)])  # mid-epoch 0; last checkpoint at step 4
    resumed = run(tmp_path / "killed.pt", [], resume=True)
    same_weights(resumed, run(tmp_path / "full.pt", []), rtol=0, atol=0)


def test_checkpoint_files_get_the_mode_of_a_plain_open(tmp_path):
    make().save_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "ckpt.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    distiller = make()
    path = tmp_path / "ckpt.pt"
    distiller.save_checkpoint(path)
    good = path.read_bytes()

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        distiller.save_checkpoint(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    monkeypatch.undo()
    make().load_checkpoint(path)


def test_checkpoints_are_loaded_as_data_only(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"student": {}}, path)
    with pytest.raises(ValueError, match="missing keys"):
        make().load_checkpoint(path)
    torch.save({"code": Record()}, path)  # an arbitrary object is never unpickled
    with pytest.raises(Exception, match="[Ww]eights only"):
        make().load_checkpoint(path)


class Poisoned(TinyLM):
    """A NaN logit in the batches flagged by the input ``poison``."""

    def forward(self, input_ids, attention_mask=None, poison=None):
        out = super().forward(input_ids, attention_mask)
        if poison.any():
            out["logits"] = out["logits"].masked_fill(torch.arange(VOCAB) == 0, float("nan"))
        return out


def test_non_finite_loss_names_step_and_batch():
    data = batches(6, size=2)
    for i, b in enumerate(data):
        b["poison"] = torch.full((2,), i == 3)
    distiller = make(Poisoned(width=12), Poisoned(width=6), accumulation_steps=2)
    with pytest.raises(pykd.NonFiniteLossError, match=r"at step 2 \(epoch 0, batch 3 "):
        distiller.fit(data, epochs=1)


# ------------------------------------------------------------------------ hidden and teachers


def test_hidden_state_matching_trains_and_checkpoints_a_projection(tmp_path):
    teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
    match = pykd.HiddenMatch({1: 2, 2: 3}, weight=0.25, student_width=6, teacher_width=12)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    distiller = make(teacher, student, hidden=match, optimizer=optimizer)
    assert len(optimizer.param_groups) == 2  # the projections were added to the given optimizer
    data = batches(2)
    metrics = distiller.evaluate(data)
    num = den = 0.0
    with torch.no_grad():
        for b in data:
            s_h = student(b["input_ids"])["hidden_states"]
            t_h = teacher(b["input_ids"])["hidden_states"]
            mask = b["attention_mask"].bool()
            for s_layer, t_layer in match.layers.items():
                projected = distiller.projections[str(s_layer)](s_h[s_layer])
                num += ((projected - t_h[t_layer]) ** 2).sum(-1)[mask].sum().item()
            den += mask.sum().item()
    assert metrics["hidden"] == pytest.approx(0.25 * num / den, rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["soft"] + metrics["hidden"], rel=1e-6)

    before = distiller.projections.state_dict()["1.weight"].clone()
    distiller.fit(data, epochs=1)
    after = distiller.projections.state_dict()["1.weight"]
    assert not torch.equal(before, after)
    distiller.save_checkpoint(tmp_path / "c.pt")
    fresh_student = TinyLM(width=6)
    fresh = make(TinyLM(width=12, depth=3), fresh_student, hidden=match,
                 optimizer=torch.optim.SGD(fresh_student.parameters(), lr=0.1))
    fresh.load_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(fresh.projections.state_dict()["1.weight"], after)


def test_combine_teachers_gives_the_weighted_mixture():
    logits = [torch.randn(5, 7) * 3 for _ in range(3)]
    logits[1][0, 2] = float("-inf")  # a masked entry stays finite in the mixture
    weights = [0.2, 0.3, 0.5]
    combined = pykd.combine_teachers(logits, weights, temperature=2.0)
    mixture = sum(c * torch.softmax(t / 2.0, -1) for c, t in zip(weights, logits))
    torch.testing.assert_close(torch.softmax(combined / 2.0, -1), mixture)


def test_multi_teacher_distiller_matches_the_mixture():
    teachers = [TinyLM(width=12), TinyLM(width=10)]
    student = TinyLM(width=6)
    data = batches(1)
    metrics = make(teachers, student, teacher_weights=[1.0, 3.0], temperature=2.0).evaluate(data)
    with torch.no_grad():
        t = pykd.combine_teachers([m(data[0]["input_ids"])["logits"] for m in teachers],
                                  [0.25, 0.75], temperature=2.0)
        s = student(data[0]["input_ids"])["logits"]
    expected = pykd.distillation_loss(s, t, target=data[0]["labels"], temperature=2.0)
    assert metrics["soft"] == pytest.approx(expected.item(), rel=1e-5)


def _user_weights(teacher_logits, labels):
    return (labels % 2).float()


@pytest.mark.parametrize("mode", ["confidence", "entropy", "correctness", _user_weights])
def test_adaptive_weights(mode):
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    weights = pykd.adaptive_weights(logits, labels, mode, incorrect_weight=0.2)
    p = torch.softmax(logits, -1)
    expected = {
        "confidence": p.max(-1).values,
        "entropy": 1 + (p * p.log()).sum(-1) / math.log(3),
        "correctness": torch.tensor([1.0, 0.2, 0.2]),  # argmax of the uniform row is 0
    }.get(mode, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(weights, expected)

    # Through the Distiller: each row's soft term is scaled by its weight, the normaliser is not.
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    data = batches(1)
    metrics = make(teacher, student, sample_weighting=mode, incorrect_weight=0.2,
                   temperature=2.0).evaluate(data)
    with torch.no_grad():
        t = teacher(data[0]["input_ids"])["logits"]
        s = student(data[0]["input_ids"])["logits"]
    y = data[0]["labels"]
    lam = pykd.adaptive_weights(t, y, mode, incorrect_weight=0.2)
    rows = pykd.distillation_loss(s, t, target=y, temperature=2.0, reduction="none")
    expected_soft = (lam * rows).sum() / (y != -100).sum()
    assert metrics["soft"] == pytest.approx(expected_soft.item(), rel=1e-5)


def test_bad_weighting_functions_are_refused():
    logits, labels = torch.randn(4, 3), torch.arange(4) % 3
    with pytest.raises(ValueError, match="negative"):
        pykd.adaptive_weights(logits, labels, lambda t, y: -torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        pykd.adaptive_weights(logits, labels, lambda t, y: torch.ones(3))
    with pytest.raises(ValueError, match="needs labels"):
        pykd.adaptive_weights(logits, None, "correctness")


# --------------------------------------------------------------- schedules, callbacks, logging


def test_schedule_values():
    assert schedules.Constant(2.0)(10**6) == 2.0
    linear = schedules.Linear(4.0, 1.0, steps=6)
    assert [linear(s) for s in (0, 3, 6, 100)] == [4.0, 2.5, 1.0, 1.0]
    cosine = schedules.Cosine(4.0, 1.0, steps=10)
    assert cosine(0) == 4.0 and cosine(5) == pytest.approx(2.5) and cosine(10) == 1.0
    assert cosine(2) > schedules.Linear(4.0, 1.0, steps=10)(2)  # starts slower than a line
    warm = schedules.Warmup(4, then=schedules.Linear(1.0, 0.0, steps=4), start=0.0)
    assert [warm(s) for s in range(10)] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert schedules.as_schedule(lambda s: s / 2)(3) == 1.5
    with pytest.raises(ValueError):
        schedules.Linear(1.0, 0.0, steps=0)


def test_schedules_drive_temperature_and_alpha_by_step():
    record = Record()
    make(temperature=schedules.Linear(4.0, 1.0, steps=3),
         alpha=schedules.Warmup(2, then=0.5, start=1.0), callbacks=[record]).fit(batches(4), 1)
    assert [m["temperature"] for m in record.steps] == [4.0, 3.0, 2.0, 1.0]
    assert [m["alpha"] for m in record.steps] == [1.0, 0.75, 0.5, 0.5]


def test_callbacks_are_called_in_order():
    record = Record()
    make(callbacks=[record]).fit(batches(2), epochs=2, eval_loader=batches(1, seed=9))
    epoch = [("step_end",), ("step_end",), ("eval_end",)]
    calls = [c if c[0] != "step_end" else ("step_end",) for c in record.calls]
    assert calls == [("fit_start",),
                     ("epoch_start", 0), *epoch, ("epoch_end", 0),
                     ("epoch_start", 1), *epoch, ("epoch_end", 1),
                     ("fit_end",)]


def test_metrics_are_appended_as_json_lines(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    make(metrics_path=path, log_every=2, alpha=0.5).fit(batches(4), 1, eval_loader=batches(1))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in lines] == [("train", 2), ("train", 4), ("eval", 4)]
    for key in ("loss", "soft", "ce", "kl", "agreement", "accuracy", "samples_per_s", "lr"):
        assert key in lines[0] and math.isfinite(lines[0][key])
    assert lines[0]["loss"] == pytest.approx(0.5 * lines[0]["soft"] + 0.5 * lines[0]["ce"],
                                             rel=1e-5)


# ------------------------------------------------------------------------- precision, devices


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_a_bf16_teacher(precision):
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    before = student.head.weight.detach().clone()
    record = Record()
    distiller = make(teacher, student, precision=precision, teacher_dtype=torch.bfloat16,
                     temperature=2.0, alpha=0.5, lr=1e-2, callbacks=[record])
    distiller.fit(batches(2), epochs=1)
    assert teacher.head.weight.dtype == torch.bfloat16
    assert student.head.weight.dtype == torch.float32
    assert all(math.isfinite(m["loss"]) for m in record.steps)
    assert not torch.equal(before, student.head.weight)
    fp32 = make(teacher, TinyLM(width=6)).evaluate(batches(1))
    assert math.isfinite(fp32["loss"])


def test_a_bfloat16_teacher_without_teacher_dtype_gets_its_inputs_in_bfloat16():
    """The user cast the teacher; float32 inputs are cast to its dtype, as teacher_dtype does."""
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).to(torch.bfloat16)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    metrics = make(teacher, nn.Linear(4, 3), alpha=0.5).fit(data, 1, eval_loader=data)
    assert teacher.weight.dtype == torch.bfloat16 and math.isfinite(metrics["loss"])
    explicit = make(nn.Linear(4, 3), nn.Linear(4, 3), teacher_dtype=torch.bfloat16)
    assert math.isfinite(explicit.evaluate(data)["loss"])


def test_teacher_is_frozen_and_left_in_eval_mode():
    teacher = TinyLM(width=12)
    distiller = make(teacher, alpha=0.5)
    distiller.fit(batches(1), epochs=1)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_options_are_checked():
    with pytest.raises(ValueError, match="divergence"):
        make(divergence="l2")
    with pytest.raises(ValueError, match="sample_weighting"):
        make(sample_weighting="vibes")
    with pytest.raises(ValueError, match="precision"):
        make(precision="fp8")
    with pytest.raises(ValueError, match="student_width"):
        make(hidden=pykd.HiddenMatch({1: 1}))
    with pytest.raises(ValueError, match="teacher weights"):
        make([TinyLM(), TinyLM()], teacher_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="causal_lm"):
        make(TinyLM(pooled=True), TinyLM(pooled=True), causal_lm=True).evaluate(batches(1))


# ------------------------------------------------------------------------ several processes


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    import distiller_ddp_worker

    out = tmp_path / "ddp.pt"
    worker = Path(distiller_ddp_worker.__file__)
    run_two_processes(str(worker), str(out), "4", cwd=tempfile.gettempdir(), timeout=180)
    two = torch.load(out, weights_only=True)
    assert two["world_size"] == 2
    saved = torch.load(f"{out}.ckpt", weights_only=True)  # by rank 0, with both ranks' RNGs
    assert (saved["world_size"], len(saved["rng"]), saved["epoch"]) == (2, 2, 2)
    one, metrics = distiller_ddp_worker.train(batch_size=8)
    for key, value in one.student.state_dict().items():
        torch.testing.assert_close(two["student"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in one.projections.state_dict().items():
        torch.testing.assert_close(two["projections"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert two["metrics"] == pytest.approx(metrics, rel=1e-5)


# ---------------------------------------------------------------------------- it helps


def test_distillation_beats_labels_alone():
    """A teacher that saw 2000 noisy labels teaches a student that sees 48 of them; the student
    trained on those 48 labels alone lands far below (about 0.57 against 0.82 accuracy)."""
    torch.manual_seed(0)
    dim, classes = 16, 6
    truth = torch.randn(dim, classes) * 1.5

    def sample(n):
        x = torch.randn(n, dim)
        return x, torch.multinomial(torch.softmax(x @ truth, -1), 1).squeeze(1)

    x_big, y_big = sample(2000)
    teacher = nn.Linear(dim, classes)
    opt = torch.optim.Adam(teacher.parameters(), lr=5e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x_big), y_big).backward()
        opt.step()
    x_small, y_small = sample(48)
    x_test = torch.randn(4000, dim)
    y_test = (x_test @ truth).argmax(-1)
    loader = DataLoader(TensorDataset(x_small, y_small), batch_size=16, shuffle=True)

    def accuracy(alpha):
        torch.manual_seed(1)
        student = nn.Linear(dim, classes)
        make(teacher, student, alpha=alpha, temperature=2.0, lr=3e-2).fit(loader, epochs=40)
        with torch.no_grad():
            return (student(x_test).argmax(-1) == y_test).float().mean().item()

    labels_only, distilled = accuracy(alpha=0.0), accuracy(alpha=0.9)
    assert distilled > labels_only + 0.15, (distilled, labels_only)

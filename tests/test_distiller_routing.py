"""pykd.Distiller: batch keys routed to one model (``inputs=``), and the labels-only fast path
(``alpha=0`` runs no teacher in training steps)."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from distiller_models import VOCAB, TinyLM, TokenDataset, batches
from torch import nn
from torch.utils.data import DataLoader

import pykd
from pykd._batches import IndexedBatch
from pykd.schedules import Constant, Linear

# ------------------------------------------------------------------------ inputs per model


class ShapeStudent(TinyLM):
    """A student that needs a student-only input, ``shape_ids`` (word shapes, say)."""

    def __init__(self) -> None:
        super().__init__(width=6)
        self.shapes = nn.Embedding(4, 6)

    def forward(self, input_ids, shape_ids, attention_mask=None):
        h = torch.tanh(self.embed(input_ids) + self.shapes(shape_ids))
        return {"logits": self.head(h)}


class SampleIdTeacher(TinyLM):
    """A teacher that takes a teacher-only input, ``sample_id``, and records what it got."""

    def __init__(self) -> None:
        super().__init__(width=12)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, sample_id, attention_mask=None):
        self.seen.append(sample_id.clone())
        return super().forward(input_ids, attention_mask)


def with_keys(data: list[dict], **keys) -> list[dict]:
    """The batches with extra keys: ``name=fn(batch) -> tensor``."""
    return [{**batch, **{name: fn(batch) for name, fn in keys.items()}} for batch in data]


def shape_ids(batch: dict) -> torch.Tensor:
    return batch["input_ids"] % 4


def test_a_student_only_input_never_reaches_the_teacher():
    data = with_keys(batches(3), shape_ids=shape_ids)
    # Today's behaviour without the option: every key goes to both models.
    with pytest.raises(TypeError, match="unexpected keyword argument 'shape_ids'"):
        pykd.Distiller(TinyLM(width=12), ShapeStudent(), progress=False).fit(data)

    student = ShapeStudent()
    before = student.shapes.weight.detach().clone()
    distiller = pykd.Distiller(TinyLM(width=12), student, inputs={"shape_ids": "student"},
                               alpha=0.5, lr=1e-2, progress=False)
    distiller.fit(data[:1])  # one step
    assert distiller.global_step == 1
    # The student got its input: the shape embedding it alone reads was trained.
    assert not torch.equal(student.shapes.weight, before)
    metrics = distiller.evaluate(data)
    assert {"kl", "agreement", "ce"} <= metrics.keys()


def test_a_teacher_only_input_never_reaches_the_student():
    data = with_keys(batches(2), sample_id=lambda b: torch.arange(len(b["input_ids"])) + 100)
    teacher = SampleIdTeacher()
    distiller = pykd.Distiller(
        teacher, TinyLM(width=6), progress=False, alpha=0.5,
        distillation=pykd.DistillationConfig(inputs={"sample_id": "teacher",
                                                     "attention_mask": "both"}),
    )
    distiller.fit(data)
    assert distiller.global_step == 2
    # The probe of the first batch, then one forward per step.
    assert [s.tolist() for s in teacher.seen] == [[100, 101, 102]] * 3


def test_routing_with_a_teacher_cache_drops_teacher_keys_from_the_student():
    dataset = TokenDataset(8)
    teacher = TinyLM(width=12)
    with tempfile.TemporaryDirectory() as folder:
        cache = pykd.TeacherCache.build(folder, teacher, dataset, batch_size=4, shard_size=4)
        # A teacher-only key in the training batches (a cache is built from the same data).
        loader = [IndexedBatch(b.index, {**b.batch, "sample_id": b.index + 100})
                  for b in cache.attach(DataLoader(dataset, batch_size=4))]
        distiller = pykd.Distiller(cache, TinyLM(width=6), inputs={"sample_id": "teacher"},
                                   alpha=0.5, progress=False)
        distiller.fit(loader)
        assert distiller.global_step == 2
        cache.close()


@pytest.mark.parametrize("inputs, error, message", [
    ({"shape_ids": "students"}, ValueError,
     r"inputs\['shape_ids'\] must be one of \('teacher', 'student', 'both'\), got 'students'"),
    ({"shape_ids": None}, ValueError, r"inputs\['shape_ids'\] must be one of"),
    ({"labels": "student"}, ValueError, r"inputs\['labels'\]: 'labels' is no model input"),
    ({"sample_weight": "both"}, ValueError, r"inputs\['sample_weight'\]"),
    ({0: "student"}, TypeError, "inputs maps batch keys, which are strings, got 0"),
    ("student", TypeError, "inputs must map batch keys"),
])
def test_bad_routes_are_refused(inputs, error, message):
    with pytest.raises(error, match=message):
        pykd.DistillationConfig(inputs=inputs)
    with pytest.raises(error, match=message):
        pykd.Distiller(nn.Linear(4, 3), nn.Linear(4, 3), inputs=inputs, progress=False)


def test_routes_are_copied_when_checked():
    routes = {"shape_ids": "student"}
    config = pykd.DistillationConfig(inputs=routes)
    routes["shape_ids"] = "nobody"
    assert config.inputs == {"shape_ids": "student"}


def test_routes_need_dict_batches():
    distiller = pykd.Distiller(nn.Linear(4, 3), nn.Linear(4, 3), inputs={"x": "student"},
                               progress=False)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    with pytest.raises(ValueError, match="inputs= routes the keys of dict batches, but batch 0 "
                                         "of epoch 0 is a tuple"):
        distiller.fit(data)
    with pytest.raises(ValueError, match="dict batches, but evaluation batch 0 is a Tensor"):
        distiller.evaluate([torch.randn(5, 4)])


# ------------------------------------------------------------------- the labels-only fast path


class Counter:
    """Counts the forward calls of a module (a forward pre-hook: it also sees the calls whose
    LM head ``fused_lm_head`` skips)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1


class Steps(pykd.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def on_step_end(self, distiller, step, metrics):
        self.metrics.append(metrics)


FUSED = {"fused_lm_head": True, "student_head": "head", "teacher_head": "head"}


def fit(teacher_seed: int, student: nn.Module, data, *, teacherless: bool | None = None,
        **options) -> tuple[pykd.Distiller, Counter, Steps]:
    """A Distiller of a teacher made from ``teacher_seed`` and a copy of ``student``, fitted for
    two epochs with accumulation and metrics on every step; ``teacherless`` overrides the
    objective's choice."""
    torch.manual_seed(teacher_seed)
    teacher = TinyLM(width=12, depth=3)
    counter, steps = Counter(teacher), Steps()
    distiller = pykd.Distiller(teacher, copy.deepcopy(student), lr=1e-2, progress=False,
                               accumulation_steps=2, log_every=1, callbacks=[steps], **options)
    if teacherless is not None:
        distiller.objective.labels_only = teacherless
    torch.manual_seed(7)  # the student's dropout masks, alike in every run
    distiller.fit(data, epochs=2)
    return distiller, counter, steps


@pytest.mark.parametrize("alpha", [0, 0.0, Constant(0)], ids=["int", "float", "Constant"])
@pytest.mark.parametrize("options", [{}, FUSED, {"divergence": "jsd"}],
                         ids=["dense", "fused-head", "jsd"])
def test_alpha_zero_runs_no_teacher(alpha, options):
    student, data = TinyLM(width=6, dropout=0.1), batches(6)
    fast, counter, steps = fit(1, student, data, alpha=alpha, **options)
    assert fast.objective.labels_only
    assert counter.calls == 0
    # The teacher cannot matter: a run with another (random) teacher trains the same student,
    # bit for bit, and so does one that runs its teacher (the op weighs the soft term by 0).
    other, _, _ = fit(2, student, data, alpha=alpha, **options)
    slow, slow_counter, _ = fit(1, student, data, alpha=alpha, teacherless=False, **options)
    assert slow_counter.calls > 0
    for name, value in fast.student.state_dict().items():
        assert torch.equal(value, other.student.state_dict()[name]), name
        assert torch.equal(value, slow.student.state_dict()[name]), name
    # Training logs leave the teacher's metrics out; the loss is the cross entropy.
    assert len(steps.metrics) == 6
    for metrics in steps.metrics:
        assert not {"soft", "kl", "agreement"} & metrics.keys()
        assert {"ce", "accuracy", "loss"} <= metrics.keys()
        assert metrics["ce"] == pytest.approx(metrics["loss"], rel=1e-5)
    # Evaluation runs the teacher for its metrics.
    metrics = fast.evaluate(data)
    assert counter.calls == len(data)
    assert {"soft", "kl", "agreement", "ce", "accuracy"} <= metrics.keys()


@pytest.mark.parametrize("options", [
    {"alpha": 0.5},
    {"alpha": Linear(0.0, 0.5, steps=100)},  # 0 at the first step only
    {"alpha": lambda step: 0.0},  # a function: not known to stay 0
    {"alpha": 0.0, "sample_weighting": "confidence"},
    {"alpha": 0.0, "hidden": pykd.HiddenMatch({1: 2}, student_width=6, teacher_width=12)},
], ids=["alpha-0.5", "linear-from-0", "function", "sample-weighting", "hidden"])
def test_the_teacher_runs_where_it_is_needed(options):
    distiller, counter, steps = fit(1, TinyLM(width=6), batches(4), **options)
    assert not distiller.objective.labels_only
    assert counter.calls == 1 + 8  # the probe, then every micro-batch
    assert all({"kl", "agreement"} <= m.keys() for m in steps.metrics)


def test_batches_without_labels_run_the_teacher():
    # Without labels the objective is the soft term whatever alpha is: the teacher runs there.
    data = batches(4)
    data[1] = {k: v for k, v in data[1].items() if k != "labels"}
    distiller, counter, steps = fit(1, TinyLM(width=6), data, alpha=0)
    assert distiller.objective.labels_only
    assert counter.calls == 2  # batch 1 in each epoch
    # A step with a teacherless micro-batch leaves the teacher's metrics out.
    assert all("kl" not in m for m in steps.metrics)


def test_alpha_zero_reads_no_teacher_cache(monkeypatch):
    dataset = TokenDataset(12)
    with tempfile.TemporaryDirectory() as folder:
        cache = pykd.TeacherCache.build(folder, TinyLM(width=12), dataset, batch_size=4,
                                        shard_size=4)
        lookups = []
        lookup = cache.lookup
        monkeypatch.setattr(cache, "lookup",
                            lambda *a, **k: lookups.append(1) or lookup(*a, **k))
        train = cache.attach(DataLoader(dataset, batch_size=4, shuffle=True))
        distiller = pykd.Distiller(cache, TinyLM(width=6), alpha=0, progress=False)
        distiller.fit(train, epochs=2)
        assert distiller.global_step == 6 and not lookups
        assert "kl" in distiller.evaluate(train) and len(lookups) == 3
        cache.close()


def test_a_probe_of_the_student_leaves_its_state_alone():
    # Without a teacher to probe, the layout is learnt from the student: in eval mode (no
    # batch-norm statistics change) and outside the RNG streams.
    class Normed(TinyLM):
        def __init__(self) -> None:
            super().__init__(width=6)
            self.norm = nn.BatchNorm1d(VOCAB)

        def forward(self, input_ids, attention_mask=None):
            logits = super().forward(input_ids, attention_mask)["logits"]
            return self.norm(logits.transpose(1, 2)).transpose(1, 2)

    student = Normed()
    distiller = pykd.Distiller(TinyLM(width=12), student, alpha=0, progress=False)
    student.train()
    student.head.eval()  # a mixed mode, put back as it was
    state = copy.deepcopy(student.state_dict())
    rng = torch.get_rng_state()
    distiller.objective.prepare(batches(1)[0], "a batch")
    assert distiller.objective.layout.token_logits
    assert torch.equal(torch.get_rng_state(), rng)
    assert student.training and not student.head.training
    for name, value in student.state_dict().items():
        assert torch.equal(value, state[name]), name

"""The objective of :class:`pykd.Distiller`: a student matching frozen teachers (or a cache).

Every loss term goes through :func:`pykd.distillation_loss` (or its fused LM-head form) with
``reduction="sum"`` and per-row weights that already hold the normaliser (and any loss scale), so
``loss.backward()`` reaches the op with an incoming gradient of exactly 1 and the op's gradient is
used without another pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pykd._batches import (
    Batch,
    IndexedBatch,
    Outputs,
    call_model,
    floating_dtype,
    logits_and_hidden,
    routed_inputs,
    to_device,
    token_positions,
)
from pykd.cache import TeacherCache, TopKRows
from pykd.config import DistillationConfig, configure
from pykd.heads import HeadCapture, HeadLike, LinearRows, resolve_head
from pykd.objective import (
    STATS,
    Layout,
    LogitObjective,
    LogitRows,
    TeacherLogits,
    param_device,
    require_hidden,
)
from pykd.rows import Prepared
from pykd.schedules import Constant, as_schedule
from pykd.teachers import (
    adaptive_weights,
    combine_teachers,
    normalize_teacher_weights,
)


@dataclasses.dataclass
class HiddenMatch:
    """Match intermediate hidden states (TinyBERT style) alongside the logits.

    ``layers`` maps a student layer to a teacher layer, both indexing the models'
    ``hidden_states`` (for Hugging Face models index 0 is the embeddings). Student states pass
    through a learnable ``nn.Linear`` when the widths differ; the widths are read from
    ``model.config.hidden_size`` unless given. The term is ``weight * sum over mapped layers``
    of the per-row ``divergence`` (``"mse"``: ``sum_h (t - s)^2``; ``"cosine"``: ``1 - cos``)
    averaged over the non-padding tokens (attention mask) of the batch.
    """

    layers: Mapping[int, int]
    weight: float = 1.0
    divergence: str = "mse"
    student_width: int | None = None
    teacher_width: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("HiddenMatch.layers must map at least one student layer")
        if self.divergence not in ("mse", "cosine"):
            raise ValueError(
                f"hidden divergence must be 'mse' or 'cosine', got {self.divergence!r}"
            )
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"hidden weight must be finite and >= 0, got {self.weight!r}")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_width(model: nn.Module, given: int | None, who: str) -> int:
    width = given if given is not None else getattr(getattr(model, "config", None),
                                                    "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(
            f"HiddenMatch needs the {who}'s hidden width: pass {who}_width=... "
            "(or use a model whose config has hidden_size)"
        )
    return width


def _run(model: nn.Module, inputs: Any, extra: Mapping[str, Any], head: nn.Linear | None,
         who: str) -> Outputs:
    """The model's logits and hidden states; with a fused ``head``, the head's input instead of
    the logits (which are never computed)."""
    if head is None:
        return logits_and_hidden(call_model(model, inputs, extra))
    with HeadCapture(head, who) as capture:
        logits, hidden = logits_and_hidden(call_model(model, inputs, extra))
    return capture.hidden(logits), hidden


@contextlib.contextmanager
def outside_training(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` in eval mode, without gradients and outside the RNG streams (what it draws
    changes no later random number), restoring each submodule's mode after."""
    modes = [(module, module.training) for module in model.modules()]
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training


@dataclasses.dataclass
class _Rows(LogitRows):
    """:class:`LogitRows` that say whether the teachers ran: without them (``labels_only``), the
    teacher's place in the loss is held by the student's own logits, detached."""

    teacherless: bool = False


class _StudentStack(nn.Module):
    """The student and its hidden-state projections as one module, so that DDP syncs both."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict, layers: list[int],
                 extra: Mapping[str, Any], head: nn.Linear | None) -> None:
        super().__init__()
        self.student, self.projections = student, projections
        self.layers, self.extra = layers, dict(extra)
        self._head = (head,)  # in a tuple: the student already registers it as a submodule

    def forward(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, hidden = _run(self.student, inputs, self.extra, self._head[0], "student")
        if not self.layers:
            return logits, []
        hidden = require_hidden(hidden, "student")
        return logits, [self.projections[str(layer)](hidden[layer]) for layer in self.layers]


class TeacherStudentObjective(LogitObjective):
    """A student trained to match frozen teachers: the objective of :class:`pykd.Distiller`,
    whose docstring describes the options (a :class:`pykd.DistillationConfig`, or its fields
    as keywords laid over ``config``) and the loss."""

    checkpoint_format = "pykd.distiller/2"

    def __init__(self, teacher: nn.Module | Sequence[nn.Module] | TeacherCache,
                 student: nn.Module, config: DistillationConfig | None = None,
                 **options: Any) -> None:
        self.config = config = configure(DistillationConfig, config, options)
        device = config.device
        super().__init__(
            device=torch.device(device) if device is not None else param_device(student),
            divergence=config.divergence, temperature=config.temperature,
            alpha=as_schedule(config.alpha), beta=config.beta, ignore_index=config.ignore_index,
            causal_lm=config.causal_lm, chunk_size=config.lm_head_chunk_size,
            hidden_divergence=config.hidden.divergence if config.hidden is not None else None,
            soft_index=config.soft_index, rest=config.rest,
        )
        self.hidden = config.hidden
        self.sample_weighting = config.sample_weighting
        self.incorrect_weight = float(config.incorrect_weight)
        self.fused_lm_head = bool(config.fused_lm_head)
        self.student = student
        student.to(self.device)
        self.inputs = config.inputs
        # A training step of a labelled batch needs no teacher when alpha is the constant 0 and
        # nothing else reads the teacher (see forward).
        alpha = self.alpha
        self.labels_only = (type(alpha) is Constant and alpha.value == 0.0
                            and self.hidden is None and self.sample_weighting is None)
        self.teacher_dtype = config.teacher_dtype
        # Asked of the models only when hidden states are matched and their forward takes it.
        self._hidden_kwarg = {"output_hidden_states": True} if self.hidden is not None else {}
        self._init_teachers(teacher, config.teacher_weights, config.teacher_device,
                            config.teacher_head)
        self._init_student(config.student_head)

    def _init_teachers(self, teacher: nn.Module | Sequence[nn.Module] | TeacherCache,
                       weights: Sequence[float] | None, device: torch.device | str | None,
                       head: HeadLike) -> None:
        self.cache = teacher if isinstance(teacher, TeacherCache) else None
        if self.rest != "bucket" and self.cache is None:
            raise ValueError(f"rest={self.rest!r} spends the rest of a topk+rest TeacherCache; "
                             "a live teacher gives its full distribution")
        self._teacher_devices, self._teacher_extra = [], []
        self._teacher_dtypes: list[torch.dtype | None] = []  # what their floating inputs become
        self._teacher_head: nn.Linear | None = None
        if self.cache is not None:
            self._check_cache(weights)
            self.teachers, self.teacher_weights = [], [1.0]
            return
        single = isinstance(teacher, nn.Module) and not isinstance(teacher, nn.ModuleList)
        self.teachers = [teacher] if single else list(teacher)
        if not self.teachers:
            raise ValueError("give at least one teacher")
        if any(isinstance(model, TeacherCache) for model in self.teachers):
            raise TypeError("a TeacherCache is given on its own as the teacher, not in a list")
        self.teacher_weights = normalize_teacher_weights(weights, len(self.teachers))
        if self.fused_lm_head:
            if len(self.teachers) > 1:
                raise ValueError("fused_lm_head works with one teacher: a mixture of teachers "
                                 "needs their logits")
            self._teacher_head = resolve_head(self.teachers[0], head, "teacher")
        placement = {k: v for k, v in (("device", device), ("dtype", self.teacher_dtype))
                     if v is not None}
        for model in self.teachers:
            model.eval().requires_grad_(False)
            if placement:
                model.to(**placement)
            self._teacher_devices.append(param_device(model, default=self.device))
            self._teacher_dtypes.append(floating_dtype(model))
            self._teacher_extra.append(
                self._hidden_kwarg if _accepts(model, "output_hidden_states") else {}
            )

    def _check_cache(self, weights: Sequence[float] | None) -> None:
        """What training from :attr:`cache` rules out, refused before anything runs."""
        cache = self.cache
        cache.require_complete()
        refused = {
            "teacher_weights": weights is not None,
            "hidden (the cache holds no hidden states)": self.hidden is not None,
            "fused_lm_head (the cache holds logits)": self.fused_lm_head,
            f"rest={self.rest!r} (a {cache.signal or 'full-logits'} cache has no rest)":
                self.rest != "bucket" and cache.signal != "topk+rest",
        }
        if cache.top_k is not None:
            refused["sample_weighting (a top-k cache lacks the full distribution)"] = \
                self.sample_weighting is not None
            allowed = ("kl",) if cache.signal == "topk+rest" else ("kl", "jsd")
            refused[f"divergence={self.divergence!r} (a {cache.signal} cache takes "
                    f"{' or '.join(map(repr, allowed))})"] = self.divergence not in allowed
        if cache.temperature is not None:
            # Its rest or draws hold at the build's temperature only.
            temperature = self.config.temperature
            if type(temperature) is Constant:
                temperature = temperature.value
            if not (isinstance(temperature, numbers.Real)
                    and float(temperature) == cache.temperature):
                raise ValueError(
                    f"the TeacherCache's {cache.signal} signal holds the teacher at temperature "
                    f"{cache.temperature}; train with temperature={cache.temperature} (a "
                    f"constant), got {temperature!r}, or build a cache at that temperature")
        bad = [name for name, hit in refused.items() if hit]
        if bad:
            raise ValueError(f"training from a TeacherCache does not support {', '.join(bad)}")
        if self.causal_lm and not cache.token_level:
            raise ValueError("causal_lm=True needs token-level logits; the cache holds one row "
                             "per sample")
        self.layout = Layout(token_logits=cache.token_level, token_hidden=False)

    def _init_student(self, head: HeadLike) -> None:
        """The projections and the student stack (:attr:`module`)."""
        self.projections = nn.ModuleDict()
        layers: list[int] = []
        if self.hidden is not None:
            s_width = _model_width(self.student, self.hidden.student_width, "student")
            t_width = _model_width(self.teachers[0], self.hidden.teacher_width, "teacher")
            layers = sorted(self.hidden.layers)
            for layer in layers:
                self.projections[str(layer)] = (
                    nn.Linear(s_width, t_width) if s_width != t_width else nn.Identity()
                )
            self.projections.to(self.device)
        self._teacher_layers = [self.hidden.layers[layer] for layer in layers]
        self._student_head = (resolve_head(self.student, head, "student")
                              if self.fused_lm_head else None)
        self.module = _StudentStack(
            self.student, self.projections, layers,
            self._hidden_kwarg if _accepts(self.student, "output_hidden_states") else {},
            self._student_head,
        )

    def added_parameters(self) -> nn.Module:
        return self.projections

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(),
                "projections": self.projections.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.projections.load_state_dict(state["projections"])

    # ---------------------------------------------------------------------- rows and forward

    def prepare(self, raw: Any, where: str) -> Prepared:
        if self.inputs:
            batch = raw.batch if isinstance(raw, IndexedBatch) else raw
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"inputs= routes the keys of dict batches, but {where} is a "
                    f"{type(batch).__name__}: give dict batches, or leave inputs unset"
                )
        return super().prepare(raw, where)

    def probe(self, inputs: Any) -> Layout:
        if self.labels_only:
            return self._probe_student(inputs)
        logits, hidden = self._run_teacher(0, inputs)
        token_hidden = False
        if self.hidden is not None:
            token_hidden = require_hidden(hidden, "teacher")[self._teacher_layers[0]].dim() >= 3
        return self.layout_of(logits, token_hidden)

    def hidden_rows(self, batch: Batch, layout: Layout) -> torch.Tensor | None:
        if self.hidden is None:
            return None
        return (token_positions(batch) if layout.token_hidden
                else torch.ones(batch.size, dtype=torch.bool, device=self.device))

    def _probe_student(self, inputs: Any) -> Layout:
        """The layout of the student's outputs, for an objective whose training runs no teacher.

        The student runs in eval mode, without gradients and outside the RNG streams, so that
        probing (once per run) changes neither its state (batch-norm statistics) nor the
        dropout masks of this run or of a resumed one."""
        with outside_training(self.student, self.device):
            logits, _ = _run(self.student, routed_inputs(inputs, self.inputs, "student"),
                             self.module.extra, self._student_head, "student")
        return self.layout_of(logits)

    def _run_teacher(self, k: int, inputs: Any) -> Outputs:
        inputs = routed_inputs(inputs, self.inputs, "teacher")
        with torch.no_grad():
            return _run(self.teachers[k],
                        to_device(inputs, self._teacher_devices[k], self._teacher_dtypes[k]),
                        self._teacher_extra[k], self._teacher_head, "teacher")

    def forward(self, prep: Prepared, model: nn.Module, hyper: tuple[float, Any]) -> LogitRows:
        temperature = hyper[0]
        # With labels and alpha = 0 the soft term weighs nothing: a training step (the loop puts
        # the module in train mode for those, in eval mode to evaluate) runs no teacher, and the
        # student's own detached logits fill the teacher's place in the op.
        teacherless = (self.labels_only and prep.target is not None and self.module.training
                       and not self._has_soft_only_rows(prep)) or self._uncached(prep)
        outputs = [] if teacherless else [self._run_teacher(k, prep.batch.inputs)
                                          for k in range(len(self.teachers))]
        student, projected = model(routed_inputs(prep.batch.inputs, self.inputs, "student"))
        prep.check_logits(student)  # a head's input has the logits' rows too
        teacher: TeacherLogits
        if self._student_head is not None:
            # The heads' inputs stand for the logits, which the op computes chunk by chunk; the
            # heads' weights take the dtype of the student's hidden states, as under autocast.
            student = LinearRows(student, self._student_head.weight, self._student_head.bias)
            student = student.to(student.hidden.device, student.hidden.dtype)
            if teacherless:
                teacher = LinearRows(student.hidden.detach(), student.weight.detach(),
                                     None if student.bias is None else student.bias.detach())
            else:
                teacher = LinearRows(outputs[0][0], self._teacher_head.weight,
                                     self._teacher_head.bias).to(student.hidden.device,
                                                                 student.hidden.dtype)
        elif teacherless:
            teacher = student.detach()
        elif self.cache is not None:
            teacher = plain = self._cached_teacher(prep.batch, student)
        else:
            teacher_logits = [logits.to(student.device) for logits, _ in outputs]
            if len(teacher_logits) == 1:
                plain = teacher_logits[0]
                teacher = plain.to(student.dtype)
            else:
                teacher = combine_teachers(teacher_logits, self.teacher_weights,
                                           temperature).to(student.dtype)
                plain = (combine_teachers(teacher_logits, self.teacher_weights, 1.0)
                         if self.sample_weighting is not None else teacher)
        weight = prep.logit_w
        if self.sample_weighting is not None and not teacherless:
            weight = weight * adaptive_weights(plain, prep.target, self.sample_weighting,
                                               incorrect_weight=self.incorrect_weight)
        hidden = []
        if self.hidden is not None:
            teacher_hidden = require_hidden(outputs[0][1], "teacher")
            row_weight = prep.hidden_w * self.hidden.weight
            for s_h, t_layer in zip(projected, self._teacher_layers):
                t_h = teacher_hidden[t_layer].to(device=s_h.device, dtype=s_h.dtype)
                hidden.append((s_h, t_h, row_weight))
        return _Rows(student, teacher, prep.target, prep.valid, weight, hidden, teacherless)

    def _uncached(self, prep: Prepared) -> bool:
        """Whether ``prep`` is an evaluation batch without cache indices (a test set the cache
        does not hold): the student is scored on its labels alone, as a labels-only training
        step is, and the metrics that need the teacher are left out (see :meth:`summary`)."""
        if self.cache is None or prep.batch.index is not None or self.module.training:
            return False
        if prep.target is None:
            raise ValueError(
                f"{prep.where} has neither labels nor its samples' cache indices: evaluating a "
                "student trained from a TeacherCache scores it on labels, or on the cached "
                "teacher's rows of an attached loader (cache.attach)"
            )
        return True

    def _has_soft_only_rows(self, prep: Prepared) -> bool:
        """Whether a row of ``prep`` has no label (``soft_index``): its loss is the soft term
        whatever alpha is, so it needs the teacher."""
        return self.soft_index is not None and bool((prep.target == self.soft_index).any())

    # ------------------------------------------------------------------------------- metrics

    def zero_stats(self) -> torch.Tensor:
        # One sum more than STATS: the micro-batches that ran without the teacher.
        return torch.zeros(len(STATS) + 1, dtype=torch.float64, device=self.device)

    def stats(self, rows: _Rows, prep: Prepared, hyper: tuple[float, Any]) -> torch.Tensor:
        sums = self.rows_stats(rows, prep, hyper[0])
        return torch.cat([sums, sums.new_full((1,), float(rows.teacherless))])

    def summary(self, sums: torch.Tensor, hyper: tuple[float, Any],
                has_labels: bool) -> dict[str, float]:
        sums = sums.cpu()  # read once, then on the host
        out = self.rows_summary(sums[:-1], hyper[1], has_labels)
        if sums[-1].item() > 0:
            # Measured against the student itself, the teacher's metrics would mean nothing; nor
            # would the loss built from them (a training step reports its exact loss instead),
            # so an evaluation without the teacher's rows reports ce and accuracy.
            for name in ("soft", "kl", "agreement", "loss"):
                out.pop(name, None)
        return out

    def _cached_teacher(self, batch: Batch, student: torch.Tensor) -> torch.Tensor | TopKRows:
        """The cached teacher rows of ``batch``, laid out like the student's logits."""
        if batch.index is None:
            raise ValueError("training from a TeacherCache needs batches that carry their "
                             "samples' indices: use cache.attach(loader), or batches of "
                             "pykd.IndexedBatch (evaluation takes plain batches with labels)")
        positions = token_positions(batch) if self.cache.token_level else None
        if student.shape[-1] != self.cache.vocab_size:
            # A top-k cache's indices would fit in a larger student's logits without complaint.
            raise ValueError(
                f"the TeacherCache holds a teacher with {self.cache.vocab_size} classes, but the "
                f"student gives {student.shape[-1]} logits per row: the two must be the same"
            )
        values, index, log_rest = self.cache.lookup(batch.index, positions, rest=True)
        if index is None:
            return values.to(student.device, student.dtype)
        # The top-k op reads the cached float16 logits (and rest) as they are.
        return TopKRows(index.to(student.device), values.to(student.device),
                        None if log_rest is None else log_rest.to(student.device))

"""Objectives: what one training step computes, apart from the loop that runs the steps.

:class:`pykd.loop.TrainingLoop` owns fit and evaluate, the optimizer step (accumulation with the
exact normaliser of the whole step, clipping, AMP, non-finite checks), the order of batches,
checkpoints, callbacks, metrics and DDP. An :class:`Objective` owns which models run, the loss
rows of a batch, the loss, the statistics behind the metrics, the trainable modules with their
optimizers, and their state in checkpoints. :class:`pykd.Distiller` runs
:class:`pykd.teacher_student.TeacherStudentObjective`, :class:`pykd.MutualDistiller` its mutual
objective; ``docs/guide.md`` ("Write your own objective") shows a new one.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import nn

from pykd.cache import TopKRows
from pykd.functional import (
    check_loss_options,
    distillation_loss,
    distillation_loss_topk,
    fused_linear_distillation_loss,
)
from pykd.heads import LinearRows
from pykd.rows import Prepared, batch_on, loss_rows, row_weights
from pykd.schedules import Constant, Cosine, Linear, ScheduleLike, Warmup, as_schedule

OptimizerLike = Union[torch.optim.Optimizer, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]
SchedulerLike = Union[
    torch.optim.lr_scheduler.LRScheduler,
    Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
]
Optimizers = tuple[list[torch.optim.Optimizer], list[Union[torch.optim.lr_scheduler.LRScheduler,
                                                            None]]]

# Sums gathered for the metrics; the numerators are divided by their denominators in summary.
STATS = (
    "soft", "ce", "hidden", "kl", "agreement", "accuracy",
    "d_logit", "d_hidden", "rows", "labelled",
    "soft_only", "d_labelled",  # the soft term of soft-only rows; the weights of labelled rows
)


def make_optimizer(optimizer: OptimizerLike | None, module: nn.Module, lr: float,
                   extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``module``'s trainable parameters: ``optimizer`` itself (the
    parameters of ``extra`` it lacks added as a group), ``optimizer(params)`` or AdamW."""
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in (extra.parameters() if extra is not None else ())
               if id(p) not in known]
    if missing:
        optimizer.add_param_group({"params": missing})
    return optimizer


def make_scheduler(scheduler: SchedulerLike | None, optimizer: torch.optim.Optimizer
                   ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``scheduler`` itself, ``scheduler(optimizer)`` or None."""
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return scheduler
    return scheduler(optimizer)


def param_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where ``model``'s first parameter is (``default``, else the CPU, without parameters)."""
    param = next(model.parameters(), None)
    if param is not None:
        return param.device
    return default if default is not None else torch.device("cpu")


class Objective:
    """What one optimizer step of :class:`pykd.loop.TrainingLoop` computes.

    A subclass sets :attr:`module` (everything trained, as one module so that DDP syncs it all)
    and :attr:`device`, and implements :meth:`forward` and :meth:`loss`; the other methods have
    defaults. The loop calls, per step: :meth:`hyperparameters` once, then for each micro-batch
    :meth:`prepare` (before any forward), :meth:`normalisers` (summed over the step's
    micro-batches and processes), :meth:`forward` (under autocast) and :meth:`loss`, whose
    ``backward`` it runs; :meth:`stats` on logging steps and in evaluation.

    Attributes:
        module: the trained module; the loop switches its train/eval mode and wraps it in
            ``DistributedDataParallel`` under ``torch.distributed``.
        device: where batches go and the loss is computed.
        checkpoint_format: the kind of checkpoint, checked when one is loaded.
    """

    module: nn.Module
    device: torch.device
    checkpoint_format = "pykd.objective/1"

    def make_optimizers(self, optimizer: OptimizerLike | None, lr: float,
                        scheduler: SchedulerLike | None) -> Optimizers:
        """The optimizers and their schedulers (None where there is none), stepped together:
        by default one ``AdamW(lr=lr)`` (or ``optimizer``, with the parameters of
        :meth:`added_parameters` it lacks added as a group) over :attr:`module`."""
        built = make_optimizer(optimizer, self.module, lr, extra=self.added_parameters())
        return [built], [make_scheduler(scheduler, built)]

    def added_parameters(self) -> nn.Module | None:
        """Trainable parts the objective adds to the user's models (e.g. projections), which a
        user's optimizer cannot know of; None by default."""
        return None

    def hyperparameters(self, step: int) -> Any:
        """What the step's schedules give (temperature, alpha, ...), passed back to the other
        methods; evaluated once per step at the global step ``step``."""
        return None

    def schedule_metrics(self, hyper: Any) -> dict[str, float]:
        """The values of :meth:`hyperparameters` as metrics of every step."""
        return {}

    def prepare(self, raw: Any, where: str) -> Prepared:
        """A micro-batch on :attr:`device` and its loss rows: by default one per sample,
        weighted by its ``sample_weight``. ``where`` names the batch in error messages."""
        batch = batch_on(raw, self.device, where)
        target, valid = loss_rows(batch, token_logits=False, where=where)
        return Prepared(where, batch, target, valid, row_weights(valid, batch.sample_weight))

    def normalisers(self, prep: Prepared) -> torch.Tensor:
        """The weights of ``prep``'s rows summed per loss term (a 1-d tensor). The loop sums
        them over the step and passes :meth:`loss` their inverses."""
        return prep.logit_w.sum().reshape(1)

    def forward(self, prep: Prepared, model: nn.Module, hyper: Any) -> Any:
        """Run the models on ``prep``: ``model`` is :attr:`module`, DDP-wrapped where there is
        DDP (call it rather than :attr:`module` for the trained part). Returns what
        :meth:`loss` and :meth:`stats` read."""
        raise NotImplementedError

    def loss(self, rows: Any, inverse: torch.Tensor, hyper: Any) -> torch.Tensor:
        """This micro-batch's share of the step's loss. ``inverse[i]`` is the inverse of term
        ``i``'s normaliser over the whole step (times the world size and the fp16 loss scale),
        so a term is the weighted *sum* of its rows times ``inverse[i]``."""
        raise NotImplementedError

    def zero_stats(self) -> torch.Tensor:
        """The sums behind the metrics before any batch (float64 on :attr:`device`)."""
        return torch.zeros(0, dtype=torch.float64, device=self.device)

    def stats(self, rows: Any, prep: Prepared, hyper: Any) -> torch.Tensor:
        """One micro-batch's sums behind the metrics, shaped like :meth:`zero_stats`; they are
        added up and all-reduced before :meth:`summary`."""
        return self.zero_stats()

    def summary(self, sums: torch.Tensor, hyper: Any, has_labels: bool) -> dict[str, float]:
        """The metrics of the summed :meth:`stats` (evaluation, and every ``log_every`` steps)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The top-level checkpoint entries of the trained modules."""
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (``state`` is the whole checkpoint)."""
        self.module.load_state_dict(state["module"])


# ----------------------------------------------------------------- the fused loss on logits rows

@dataclasses.dataclass(frozen=True)
class Layout:
    """Whether the logits and the matched hidden states have a token dimension."""

    token_logits: bool
    token_hidden: bool = False


# Rows of logits as the loss takes them: dense logits, or a linear head's input and weights
# (fused_lm_head); a teacher's may also be its cached top-k.
LogitsLike = Union[torch.Tensor, LinearRows]
TeacherLogits = Union[torch.Tensor, LinearRows, TopKRows]


@dataclasses.dataclass
class LogitRows:
    """What the loss sees of one micro-batch for one student."""

    student: LogitsLike
    teacher: TeacherLogits
    target: torch.Tensor | None
    valid: torch.Tensor
    weight: torch.Tensor  # the prepared logit weights times any adaptive weights
    hidden: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (student, teacher, weight)


def logit_loss(student: LogitsLike, teacher: TeacherLogits, *, weight: torch.Tensor,
               target: torch.Tensor | None, divergence: str, temperature: float, alpha: float,
               beta: float, ignore_index: int, chunk_size: int,
               soft_index: int | None = None, rest: str = "bucket") -> torch.Tensor:
    """The op's loss with ``reduction="sum"``, in the form that fits the rows. ``rest`` is how
    a top-k teacher's rest is spent where the rows have labels (see distillation_loss_topk)."""
    options = {"weight": weight, "target": target, "divergence": divergence,
               "temperature": temperature, "alpha": alpha, "beta": beta,
               "ignore_index": ignore_index, "reduction": "sum", "soft_index": soft_index}
    if isinstance(teacher, TopKRows):
        on_target = rest == "target" and target is not None and teacher.log_rest is not None
        return distillation_loss_topk(student, teacher.index, teacher.logits,
                                      teacher_log_rest=teacher.log_rest,
                                      rest="target" if on_target else "bucket", **options)
    if isinstance(student, LinearRows):
        return fused_linear_distillation_loss(
            student.hidden, student.weight, teacher.hidden, teacher.weight,
            student_bias=student.bias, teacher_bias=teacher.bias, chunk_size=chunk_size,
            **options,
        )
    return distillation_loss(student, teacher, **options)


def _argmax(logits: TeacherLogits, chunk_size: int) -> torch.Tensor:
    if isinstance(logits, LinearRows):
        return logits.argmax(chunk_size)
    if isinstance(logits, TopKRows):
        return logits.argmax()
    return logits.argmax(dim=-1)


def check_alpha(value: Any, name: str, source: str = "") -> None:
    """Refuse an ``alpha`` outside [0, 1]; ``source`` says where it came from."""
    if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}{source}")


def _schedule_bounds(schedule: Callable[[int], float]) -> list[float]:
    """Values between which one of pykd's schedules stays; none are known of other callables."""
    kind = type(schedule)
    if kind is Constant:
        return [schedule.value]
    if kind in (Linear, Cosine):
        return [schedule.start, schedule.end]
    if kind is Warmup:
        return [schedule.start, *_schedule_bounds(schedule.then)]
    return []


def check_alpha_schedule(schedule: Callable[[int], float], name: str = "alpha") -> None:
    """Refuse an ``alpha`` schedule known to leave [0, 1]; other callables are checked as they
    are evaluated (see :meth:`LogitObjective.hyperparameters`)."""
    source = "" if type(schedule) is Constant else f" from {schedule!r}"
    for value in _schedule_bounds(schedule):
        check_alpha(value, name, source)


class LogitObjective(Objective):
    """Logits rows scored by the fused loss: ``alpha * soft + (1 - alpha) * ce`` per row,
    plus hidden-state terms, with the metrics of ``STATS``. The base of the teacher/student
    and the mutual objectives, which say how the rows are made (:meth:`forward`).

    ``alpha`` is a schedule (a callable of the step) of one value or of a tuple of them, one
    per student. :meth:`hyperparameters` gives ``(temperature, alpha)``.
    """

    checkpoint_format = "pykd.logits/1"

    def __init__(self, *, device: torch.device, divergence: str, temperature: ScheduleLike,
                 alpha: Callable[[int], Any], beta: float, ignore_index: int, causal_lm: bool,
                 chunk_size: int = 1024, hidden_divergence: str | None = None,
                 soft_index: int | None = None, rest: str = "bucket") -> None:
        check_loss_options(divergence, 1.0, 1.0, beta, "sum", has_target=True)
        self.device = device
        self.divergence, self.beta, self.ignore_index = divergence, float(beta), int(ignore_index)
        # The label of rows that have none (a transfer set): the soft term alone (docs/loss.md).
        self.soft_index = soft_index
        self.rest = rest  # how a top-k + rest cache's rest is spent (distillation_loss_topk)
        self.temperature, self.alpha = as_schedule(temperature), alpha
        self.causal_lm, self.chunk_size = causal_lm, chunk_size
        self.hidden_divergence = hidden_divergence  # None: no hidden-state terms
        self.layout: Layout | None = None  # learnt from the first batch (see probe)

    def hyperparameters(self, step: int) -> tuple[float, Any]:
        """``(temperature, alpha)`` at ``step``: an ``alpha`` schedule that is any callable
        can only be checked as it is evaluated."""
        value = self.alpha(step)
        many = isinstance(value, tuple)
        for k, a in enumerate(value if many else (value,)):
            check_alpha(a, f"alpha[{k}]" if many else "alpha", f" from its schedule at step {step}")
        return self.temperature(step), value

    def schedule_metrics(self, hyper: tuple[float, Any]) -> dict[str, float]:
        temperature, alpha = hyper
        if isinstance(alpha, tuple):
            return {"temperature": temperature, **{f"alpha/{k}": a for k, a in enumerate(alpha)}}
        return {"temperature": temperature, "alpha": alpha}

    def probe(self, inputs: Any) -> Layout:
        """Learn from a model's output on ``inputs`` whether rows are tokens (once)."""
        raise NotImplementedError

    def layout_of(self, logits: torch.Tensor, token_hidden: bool = False) -> Layout:
        """The layout of ``logits`` (a model's output on a batch), checked against causal_lm."""
        if self.causal_lm and logits.dim() < 3:
            raise ValueError(
                f"causal_lm=True needs [batch, tokens, vocab] logits, got {tuple(logits.shape)}"
            )
        return Layout(token_logits=logits.dim() >= 3, token_hidden=token_hidden)

    def hidden_rows(self, batch: Any, layout: Layout) -> torch.Tensor | None:
        """The rows of the hidden states (bool), None without hidden-state terms."""
        return None

    def prepare(self, raw: Any, where: str) -> Prepared:
        batch = batch_on(raw, self.device, where)
        if self.layout is None:
            self.layout = self.probe(batch.inputs)
        layout = self.layout
        target, valid = loss_rows(batch, token_logits=layout.token_logits,
                                  causal_lm=self.causal_lm, ignore_index=self.ignore_index,
                                  where=where)
        hidden = self.hidden_rows(batch, layout)
        return Prepared(where, batch, target, valid, row_weights(valid, batch.sample_weight),
                        None if hidden is None else row_weights(hidden, batch.sample_weight))

    def normalisers(self, prep: Prepared) -> torch.Tensor:
        zero = torch.zeros((), device=self.device)
        return torch.stack([prep.logit_w.sum(),
                            prep.hidden_w.sum() if prep.hidden_w is not None else zero])

    def loss(self, rows: LogitRows, inverse: torch.Tensor, hyper: tuple[float, Any]
             ) -> torch.Tensor:
        return self.rows_loss(rows, inverse, *hyper)

    def rows_loss(self, rows: LogitRows, inverse: torch.Tensor, temperature: float,
                  alpha: float) -> torch.Tensor:
        """One student's loss on ``rows`` (see :meth:`Objective.loss`)."""
        loss = logit_loss(
            rows.student, rows.teacher, weight=rows.weight * inverse[0], target=rows.target,
            divergence=self.divergence, temperature=temperature,
            alpha=alpha if rows.target is not None else 1.0, beta=self.beta,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            soft_index=self.soft_index, rest=self.rest,
        )
        for s_h, t_h, weight in rows.hidden:
            loss = loss + distillation_loss(s_h, t_h, weight=weight * inverse[1],
                                            divergence=self.hidden_divergence, reduction="sum")
        return loss

    def zero_stats(self) -> torch.Tensor:
        return torch.zeros(len(STATS), dtype=torch.float64, device=self.device)

    def stats(self, rows: LogitRows, prep: Prepared, hyper: tuple[float, Any]) -> torch.Tensor:
        return self.rows_stats(rows, prep, hyper[0])

    @torch.no_grad()
    def rows_stats(self, rows: LogitRows, prep: Prepared, temperature: float) -> torch.Tensor:
        """One student's sums behind the metrics, in the order of ``STATS``."""
        # Under no_grad the op computes no gradient, so the student needs no detaching.
        def term(weight: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
            return logit_loss(
                rows.student, rows.teacher, weight=weight, target=rows.target,
                divergence=divergence, temperature=temperature, alpha=alpha, beta=self.beta,
                ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                soft_index=self.soft_index, rest=self.rest,
            )

        zero = torch.zeros((), device=self.device)
        soft = term(rows.weight, self.divergence, 1.0)
        kl = term(rows.valid.float(), "kl", 1.0)
        prediction = _argmax(rows.student, self.chunk_size)
        agreement = ((prediction == _argmax(rows.teacher, self.chunk_size)) & rows.valid).sum()
        ce = correct = labelled = soft_only = d_labelled = zero
        if rows.target is not None:
            has_label = rows.valid
            if self.soft_index is not None:
                no_label = rows.target == self.soft_index
                has_label = has_label & ~no_label
                if bool(no_label.any()):  # their part of the step's loss, alpha aside
                    soft_only = term(rows.weight * no_label, self.divergence, 1.0)
            label_w = rows.weight * has_label
            ce = term(label_w, "kl", 0.0)
            d_labelled = label_w.sum()
            correct = ((prediction == rows.target) & has_label).sum()
            labelled = has_label.sum()
        else:  # every row of an unlabelled batch is soft-only
            soft_only = soft
        hidden = sum((distillation_loss(s_h.detach(), t_h, weight=w, reduction="sum",
                                        divergence=self.hidden_divergence)
                      for s_h, t_h, w in rows.hidden), zero)
        d_hidden = prep.hidden_w.sum() if prep.hidden_w is not None else zero
        values = (soft, ce, hidden, kl, agreement, correct, prep.logit_w.sum(), d_hidden,
                  rows.valid.sum(), labelled, soft_only, d_labelled)
        return torch.stack([v.to(self.device, torch.float64) for v in values])

    def summary(self, sums: torch.Tensor, hyper: tuple[float, Any],
                has_labels: bool) -> dict[str, float]:
        return self.rows_summary(sums, hyper[1], has_labels)

    def rows_summary(self, sums: torch.Tensor, alpha: float, has_labels: bool
                     ) -> dict[str, float]:
        """One student's metrics from its summed :meth:`rows_stats`."""
        s = dict(zip(STATS, sums.tolist()))

        s["ce_and_soft_only"] = s["ce"] + s["soft_only"]

        def ratio(num: str, den: str) -> float:
            return s[num] / s[den] if s[den] > 0 else 0.0

        out = {"soft": ratio("soft", "d_logit")}
        # A share of no rows is undefined: left out rather than reported as 0. (The loss terms
        # of no rows are 0, as in training, where they add nothing to a step.)
        if s["rows"] > 0:
            out["kl"], out["agreement"] = ratio("kl", "rows"), ratio("agreement", "rows")
        mix = alpha if has_labels else 1.0
        out["loss"] = mix * out["soft"]
        if self.hidden_divergence is not None:
            out["hidden"] = ratio("hidden", "d_hidden")
            out["loss"] += out["hidden"]
        if has_labels:
            # ce is the mean over the labelled rows; the loss weighs every row of the step, the
            # soft-only rows (all soft, alpha aside) and the unlabelled batches' rows included.
            out["ce"] = ratio("ce", "d_labelled")
            if s["labelled"] > 0:
                out["accuracy"] = ratio("accuracy", "labelled")
            out["loss"] += (1.0 - mix) * ratio("ce_and_soft_only", "d_logit")
        return dict(sorted(out.items()))


def require_hidden(hidden: Any, who: str) -> Any:
    """``hidden`` (a model's hidden states), refused where the model returned none."""
    if hidden is None:
        raise ValueError(
            f"hidden-state matching needs the {who} to return hidden_states (a dict key or an "
            "attribute next to logits)"
        )
    return hidden


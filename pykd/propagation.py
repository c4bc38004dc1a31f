"""Knowledge propagation beyond one frozen teacher: mutual learning and teacher-assistant chains.

:class:`MutualDistiller` trains several models together, each from the labels and from the
others' predictions (Deep Mutual Learning, Zhang et al. 2018); :func:`propagate` distils down a
chain of models of decreasing size, one :class:`pykd.Distiller` per link (teacher-assistant KD,
Mirzadeh et al. 2020). Both reuse the Distiller's batches, accumulation, checkpoints, metrics and
DDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pykd._batches import Outputs, call_model, logits_and_hidden
from pykd.distiller import (
    _STATS,
    Distiller,
    OptimizerLike,
    SchedulerLike,
    _check_alpha_schedule,
    _check_rows,
    _make_optimizer,
    _make_scheduler,
    _Prepared,
    _Rows,
)
from pykd.heads import HeadLike
from pykd.schedules import ScheduleLike, as_schedule
from pykd.teachers import combine_teachers

# Distiller options about a frozen teacher or a single student, which mutual learning lacks.
_TEACHER_OPTIONS = frozenset({
    "teacher_weights", "sample_weighting", "incorrect_weight", "hidden", "fused_lm_head",
    "student_head", "teacher_head", "lm_head_chunk_size", "teacher_device", "teacher_dtype",
})

_V = TypeVar("_V")


def _per_model(value: _V | Sequence[_V], n: int, name: str) -> list[_V]:
    """One value per model: a list or tuple of ``n`` of them, or one shared by all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} values of {name} for {n} models")
        return list(value)
    if isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        raise TypeError(f"one {name} cannot serve {n} models: give a list of them, one per "
                        "model, or a factory")
    return [value] * n


class _Cohort(nn.Module):
    """The models trained together, as one module so that DDP syncs them all."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, inputs: Any) -> list[torch.Tensor]:
        return [logits_and_hidden(call_model(model, inputs, {}))[0] for model in self.models]


class MutualDistiller(Distiller):
    """Train several models together, each from the labels and from the others (DML).

    Model ``k`` minimises, over the valid rows of the step::

        alpha_k * soft(p_others -> p_k) + (1 - alpha_k) * ce_k

    where ``p_others`` is the mixture of the other models' tempered distributions, detached (a
    fixed target for model ``k``), and ``soft`` the ``divergence`` at temperature ``T``. For
    ``"kl"`` the mixture gives exactly the gradient of DML's average ``KL(p_l || p_k)`` over the
    peers ``l`` (the two differ by a constant). Each model has its own optimizer, learning rate,
    scheduler and ``alpha``; gradients are clipped per model, and a non-finite gradient of any
    model stops the step of all of them (see :class:`pykd.Distiller`). With two models,
    ``alpha=[0.0, a]`` is online one-way distillation: a teacher that keeps learning from the
    labels alone while it teaches the student.

    Batches need labels. Metrics are per model, suffixed ``/k`` (``accuracy/0``, ``loss/1``, ...,
    ``agreement/k`` being with the peers' mixture), plus ``loss``, the sum of the models' losses.
    Checkpoints hold all models, optimizers and schedulers.

    Args:
        models: two or more models with logits over the same classes.
        alpha: per-model weight of the peers' term against the labels (one value or schedule
            for all, or a list of them).
        optimizer: one per model (a list), or a factory ``fn(params)`` used for each; default
            ``AdamW(lr=lr)``.
        lr: learning rate of the default optimizers, one for all or a list.
        scheduler: an LR scheduler per model (a list, entries may be None) or a factory
            ``fn(optimizer)`` used for each.
        **options: the training options of :class:`pykd.Distiller` (``divergence``,
            ``temperature``, ``beta``, ``ignore_index``, ``causal_lm``, ``accumulation_steps``,
            ``max_grad_norm``, ``precision``, ``device``, ``seed``, checkpoints, metrics,
            ``progress``, ``callbacks``, ``ddp_kwargs``); the teacher-side ones are refused.

    Attributes:
        models: the models; ``optimizers`` and ``schedulers``: theirs, in the same order.
    """

    _format = "pykd.mutual/1"

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        alpha: ScheduleLike | Sequence[ScheduleLike] = 0.5,
        optimizer: OptimizerLike | Sequence[OptimizerLike] | None = None,
        lr: float | Sequence[float] = 1e-4,
        scheduler: SchedulerLike | Sequence[SchedulerLike | None] | None = None,
        **options: Any,
    ) -> None:
        self.models = list(models)
        if len(self.models) < 2:
            raise ValueError(f"mutual learning needs at least two models, got {len(self.models)}")
        refused = sorted(_TEACHER_OPTIONS & options.keys())
        if refused:
            raise TypeError(f"MutualDistiller does not take {', '.join(refused)}")
        alphas = [as_schedule(a) for a in _per_model(alpha, len(self.models), "alpha")]
        for k, schedule in enumerate(alphas):
            _check_alpha_schedule(schedule, f"alpha[{k}]")
        super().__init__(self.models, _Cohort(self.models), optimizer=optimizer, lr=lr,
                         scheduler=scheduler, **options)
        self.alpha = lambda step: tuple(a(step) for a in alphas)

    # Distiller's construction steps, for a cohort of trained models instead of frozen teachers.

    def _init_teachers(self, teacher: Any, weights: Sequence[float] | None,
                       device: torch.device | str | None, head: HeadLike) -> None:
        self.cache, self.teachers, self.teacher_weights = None, [], []

    def _init_student(self, ddp_kwargs: Mapping[str, Any] | None, head: HeadLike) -> None:
        self.projections = nn.ModuleDict()
        self._teacher_layers, self._student_head = [], None
        self._stack = self.student
        self._model = self._wrap_ddp(self._stack, ddp_kwargs)

    def _init_optimizer(self, optimizer: Any, lr: Any, scheduler: Any) -> None:
        n = len(self.models)
        self.optimizers = [
            _make_optimizer(opt, model, rate) for opt, model, rate in
            zip(_per_model(optimizer, n, "optimizer"), self.models, _per_model(lr, n, "lr"))
        ]
        self.schedulers = [_make_scheduler(s, opt) for s, opt in
                           zip(_per_model(scheduler, n, "scheduler"), self.optimizers)]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return self.optimizers

    def _schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler | None]:
        return self.schedulers

    # Rows, losses and metrics: one set per model.

    def _probe_outputs(self, inputs: Any) -> Outputs:
        # Outside the RNG streams, so that probing (once per run) leaves a resumed run's
        # dropout masks as they would have been.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return logits_and_hidden(call_model(self.models[0], inputs, {}))

    def _forward(self, prep: _Prepared, model: nn.Module, temperature: float) -> list[_Rows]:
        if prep.target is None:
            raise ValueError("mutual learning needs labels in every batch")
        logits = model(prep.batch.inputs)
        uniform = [1.0 / (len(logits) - 1)] * (len(logits) - 1)
        rows = []
        for k, own in enumerate(logits):
            _check_rows(prep, own)
            # The peers are detached: model k's objective treats their distribution as a fixed
            # target. Letting the op's teacher gradient reach a peer instead would train it on
            # alpha_k * d KL(p_peer || p_k) / d peer, which is not the peer's own objective
            # (KL(p_others || p_peer) with its alpha; KL is asymmetric). So every model gets
            # its own loss call, in which it is the student.
            peers = [other.detach() for j, other in enumerate(logits) if j != k]
            teacher = peers[0] if len(peers) == 1 else combine_teachers(peers, uniform,
                                                                        temperature)
            rows.append(_Rows(own, teacher.to(own.dtype), prep.target, prep.valid, prep.logit_w,
                              []))
        return rows

    def _loss(self, rows: list[_Rows], inv_logit: torch.Tensor, inv_hidden: torch.Tensor,
              temperature: float, alpha: tuple[float, ...]) -> torch.Tensor:
        # Each model's parameters reach only its own term, so one backward of the sum trains all.
        return sum(super(MutualDistiller, self)._loss(r, inv_logit, inv_hidden, temperature, a)
                   for r, a in zip(rows, alpha))

    def _stats(self, rows: list[_Rows], prep: _Prepared, temperature: float) -> torch.Tensor:
        return torch.cat([super(MutualDistiller, self)._stats(r, prep, temperature)
                          for r in rows])

    def _zero_stats(self) -> torch.Tensor:
        return super()._zero_stats().repeat(len(self.models))

    def _summary(self, sums: torch.Tensor, alpha: tuple[float, ...],
                 has_labels: bool) -> dict[str, float]:
        out = {}
        for k, (part, a) in enumerate(zip(sums.split(len(_STATS)), alpha)):
            summary = super()._summary(part, a, has_labels)
            out.update({f"{name}/{k}": value for name, value in summary.items()})
        out["loss"] = sum(out[f"loss/{k}"] for k in range(len(self.models)))
        return dict(sorted(out.items()))

    def _schedule_metrics(self, temperature: float, alpha: tuple[float, ...]
                          ) -> dict[str, float]:
        return {"temperature": temperature, **{f"alpha/{k}": a for k, a in enumerate(alpha)}}


def propagate(
    models: Sequence[nn.Module],
    train_loader: Iterable[Any],
    *,
    epochs: int = 1,
    eval_loader: Iterable[Any] | None = None,
    link_options: Sequence[Mapping[str, Any]] | None = None,
    **options: Any,
) -> list[dict[str, float]]:
    """Distil down a chain: ``models[0]`` teaches ``models[1]``, which then teaches
    ``models[2]``, and so on (teacher-assistant KD for large size gaps).

    Each link is one :class:`pykd.Distiller` trained for ``epochs`` on ``train_loader``; a
    trained assistant then serves as the next link's frozen teacher (eval mode, no gradients,
    as every Distiller teacher). The last model is left trainable.

    Args:
        models: the chain, largest first; ``models[0]`` is already trained.
        train_loader: the batches of every link.
        epochs: epochs per link.
        eval_loader: batches to evaluate each link's student on (default: ``train_loader``).
        link_options: per-link Distiller options, laid over ``options`` (e.g. a different
            ``lr`` or ``checkpoint_path`` per link).
        **options: Distiller options for every link; an optimizer or scheduler must be a
            factory, since each link trains another model.

    Returns:
        Per link, ``{"link": i, **metrics}``: the student's evaluation metrics at the end of
        the link (``loss``, ``kl``, ``agreement`` with its teacher, ``accuracy``, ...).
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a chain needs at least two models, got {len(models)}")
    links = len(models) - 1
    per_link = list(link_options) if link_options is not None else [{}] * links
    if len(per_link) != links:
        raise ValueError(f"got {len(per_link)} link_options for {links} links")
    for name in ("optimizer", "scheduler"):
        if isinstance(options.get(name), (torch.optim.Optimizer,
                                          torch.optim.lr_scheduler.LRScheduler)):
            raise TypeError(f"{name} is shared by every link: give a factory, or one per link "
                            "in link_options")
    results = []
    for i, (teacher, student) in enumerate(zip(models, models[1:])):
        distiller = Distiller(teacher, student, **{**options, **per_link[i]})
        metrics = distiller.fit(train_loader, epochs=epochs, eval_loader=eval_loader)
        if eval_loader is None:
            metrics = distiller.evaluate(train_loader)
        results.append({"link": i, **metrics})
    return results

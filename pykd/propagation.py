"""Knowledge propagation beyond one frozen teacher: mutual learning and teacher-assistant chains.

:class:`MutualDistiller` trains several models together, each from the labels and from the
others' predictions (Deep Mutual Learning, Zhang et al. 2018); :func:`propagate` distils down a
chain of models of decreasing size, one :class:`pykd.Distiller` per link (teacher-assistant KD,
Mirzadeh et al. 2020). Both run the training loop of the Distiller (:class:`pykd.TrainingLoop`:
batches, accumulation, checkpoints, metrics, DDP); mutual learning with its own objective,
:class:`MutualObjective`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pykd._batches import call_model, logits_and_hidden
from pykd.config import DistillationConfig, TrainingConfig, sort_options
from pykd.distiller import Distiller
from pykd.loop import TrainingLoop
from pykd.objective import (
    STATS,
    Layout,
    LogitObjective,
    LogitRows,
    OptimizerLike,
    Optimizers,
    SchedulerLike,
    check_alpha_schedule,
    make_optimizer,
    make_scheduler,
    param_device,
)
from pykd.rows import Prepared
from pykd.schedules import ScheduleLike, as_schedule
from pykd.teachers import combine_teachers

# The objective options mutual learning shares with the Distiller; the other ones of
# DistillationConfig are about a frozen teacher or a single student.
_MUTUAL_OPTIONS = frozenset({"divergence", "temperature", "beta", "ignore_index", "causal_lm",
                             "device"})

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


class MutualObjective(LogitObjective):
    """Each of several models learns from the labels and from the others' mixture: the
    objective of :class:`MutualDistiller`, whose docstring describes it. ``alpha`` holds one
    value or schedule per model; :meth:`hyperparameters` gives ``(temperature, alphas)``."""

    checkpoint_format = "pykd.mutual/1"

    def __init__(self, models: Sequence[nn.Module], *,
                 alpha: ScheduleLike | Sequence[ScheduleLike] = 0.5, divergence: str = "kl",
                 temperature: ScheduleLike = 1.0, beta: float = 0.5, ignore_index: int = -100,
                 causal_lm: bool = False, device: torch.device | str | None = None) -> None:
        self.models = list(models)
        if len(self.models) < 2:
            raise ValueError(f"mutual learning needs at least two models, got {len(self.models)}")
        alphas = [as_schedule(a) for a in _per_model(alpha, len(self.models), "alpha")]
        for k, schedule in enumerate(alphas):
            check_alpha_schedule(schedule, f"alpha[{k}]")
        self.module = _Cohort(self.models)
        super().__init__(
            device=torch.device(device) if device is not None else param_device(self.module),
            divergence=divergence, temperature=temperature,
            alpha=lambda step: tuple(a(step) for a in alphas), beta=beta,
            ignore_index=ignore_index, causal_lm=causal_lm,
        )
        self.module.to(self.device)

    def make_optimizers(self, optimizer: OptimizerLike | Sequence[OptimizerLike] | None,
                        lr: float | Sequence[float],
                        scheduler: SchedulerLike | Sequence[SchedulerLike | None] | None
                        ) -> Optimizers:
        """One optimizer and scheduler per model (see :class:`MutualDistiller`)."""
        n = len(self.models)
        optimizers = [
            make_optimizer(opt, model, rate) for opt, model, rate in
            zip(_per_model(optimizer, n, "optimizer"), self.models, _per_model(lr, n, "lr"))
        ]
        return optimizers, [make_scheduler(s, opt) for s, opt in
                            zip(_per_model(scheduler, n, "scheduler"), optimizers)]

    def state_dict(self) -> dict[str, Any]:
        # "projections" (always empty) keeps the layout of the checkpoints saved so far.
        return {"student": self.module.state_dict(), "projections": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["student"])

    def probe(self, inputs: Any) -> Layout:
        # Outside the RNG streams, so that probing (once per run) leaves a resumed run's
        # dropout masks as they would have been.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return self.layout_of(logits_and_hidden(call_model(self.models[0], inputs, {}))[0])

    def forward(self, prep: Prepared, model: nn.Module, hyper: tuple[float, tuple[float, ...]]
                ) -> list[LogitRows]:
        if prep.target is None:
            raise ValueError("mutual learning needs labels in every batch")
        logits = model(prep.batch.inputs)
        uniform = [1.0 / (len(logits) - 1)] * (len(logits) - 1)
        rows = []
        for k, own in enumerate(logits):
            prep.check_logits(own)
            # The peers are detached: model k's objective treats their distribution as a fixed
            # target. Letting the op's teacher gradient reach a peer instead would train it on
            # alpha_k * d KL(p_peer || p_k) / d peer, which is not the peer's own objective
            # (KL(p_others || p_peer) with its alpha; KL is asymmetric). So every model gets
            # its own loss call, in which it is the student.
            peers = [other.detach() for j, other in enumerate(logits) if j != k]
            teacher = peers[0] if len(peers) == 1 else combine_teachers(peers, uniform, hyper[0])
            rows.append(LogitRows(own, teacher.to(own.dtype), prep.target, prep.valid,
                                  prep.logit_w, []))
        return rows

    def loss(self, rows: list[LogitRows], inverse: torch.Tensor,
             hyper: tuple[float, tuple[float, ...]]) -> torch.Tensor:
        # Each model's parameters reach only its own term, so one backward of the sum trains all.
        temperature, alphas = hyper
        return sum(self.rows_loss(r, inverse, temperature, a) for r, a in zip(rows, alphas))

    def zero_stats(self) -> torch.Tensor:
        return super().zero_stats().repeat(len(self.models))

    def stats(self, rows: list[LogitRows], prep: Prepared,
              hyper: tuple[float, tuple[float, ...]]) -> torch.Tensor:
        return torch.cat([self.rows_stats(r, prep, hyper[0]) for r in rows])

    def summary(self, sums: torch.Tensor, hyper: tuple[float, tuple[float, ...]],
                has_labels: bool) -> dict[str, float]:
        out = {}
        for k, (part, a) in enumerate(zip(sums.split(len(STATS)), hyper[1])):
            summary = self.rows_summary(part, a, has_labels)
            out.update({f"{name}/{k}": value for name, value in summary.items()})
        out["loss"] = sum(out[f"loss/{k}"] for k in range(len(self.models)))
        return dict(sorted(out.items()))


class MutualDistiller(TrainingLoop):
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
        lr: learning rate of the default optimizers, one for all or a list (default 1e-4).
        scheduler: an LR scheduler per model (a list, entries may be None) or a factory
            ``fn(optimizer)`` used for each.
        **options: the training options of :class:`pykd.Distiller` (``divergence``,
            ``temperature``, ``beta``, ``ignore_index``, ``causal_lm``, ``accumulation_steps``,
            ``max_grad_norm``, ``precision``, ``device``, ``seed``, checkpoints, metrics,
            ``progress``, ``callbacks``, ``ddp_kwargs``); the teacher-side ones are refused.
        training: the loop's options as a :class:`pykd.TrainingConfig`, under ``options``.

    Attributes:
        models: the models; ``optimizers`` and ``schedulers``: theirs, in the same order.
    """

    objective: MutualObjective

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        alpha: ScheduleLike | Sequence[ScheduleLike] = 0.5,
        optimizer: OptimizerLike | Sequence[OptimizerLike] | None = None,
        lr: float | Sequence[float] | None = None,
        scheduler: SchedulerLike | Sequence[SchedulerLike | None] | None = None,
        training: TrainingConfig | None = None,
        **options: Any,
    ) -> None:
        shaping, loop_options = sort_options("MutualDistiller", options, DistillationConfig,
                                             TrainingConfig)
        refused = sorted(shaping.keys() - _MUTUAL_OPTIONS)
        if refused:
            raise TypeError(f"MutualDistiller does not take {', '.join(refused)}")
        objective = MutualObjective(models, alpha=alpha, **shaping)
        self.models = objective.models
        given = {"optimizer": optimizer, "lr": lr, "scheduler": scheduler}
        loop_options.update({name: value for name, value in given.items() if value is not None})
        super().__init__(objective, training, **loop_options)


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

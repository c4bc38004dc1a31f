"""Hooks into :meth:`pykd.TrainingLoop.fit` (so :class:`pykd.Distiller` and
:class:`pykd.MutualDistiller` too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykd.loop import TrainingLoop


class Callback:
    """Base class for callbacks; every hook does nothing unless overridden.

    Each hook gets the loop that runs it (a :class:`pykd.Distiller`, a
    :class:`pykd.MutualDistiller` or another :class:`pykd.TrainingLoop`). Hooks run on every
    process (check ``distiller.rank`` to act on one only). ``metrics`` are plain numbers:
    ``on_step_end`` always gets ``step``, ``epoch``, ``loss`` (the exact loss of the whole
    step), ``lr`` and the objective's schedules (``temperature`` and ``alpha``), and on logging
    steps (every ``log_every``) also the objective's summary (the loss parts, ``kl``,
    ``agreement``, ``accuracy``) and ``samples_per_s``. An exception raised from a hook stops
    training.
    """

    def on_fit_start(self, distiller: TrainingLoop) -> None:
        """Before the first step (after resuming from a checkpoint, if any)."""

    def on_epoch_start(self, distiller: TrainingLoop, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_step_end(self, distiller: TrainingLoop, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based, counted over the whole run), before that
        step's checkpoint (if any) is written. Steps not taken (all rows of zero weight, or an
        fp16 overflow) call no hook."""

    def on_epoch_end(self, distiller: TrainingLoop, epoch: int, metrics: dict[str, float]) -> None:
        """After ``epoch``, before its checkpoint (if any) is written; ``metrics`` are the
        evaluation results, empty without eval data."""

    def on_eval_end(self, distiller: TrainingLoop, metrics: dict[str, float]) -> None:
        """After an evaluation inside :meth:`~pykd.Distiller.fit`."""

    def on_fit_end(self, distiller: TrainingLoop) -> None:
        """After the last epoch."""

"""Hooks into :meth:`pykd.Distiller.fit`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykd.distiller import Distiller


class Callback:
    """Base class for callbacks; every hook does nothing unless overridden.

    Hooks run on every process (check ``distiller.rank`` to act on one only). ``metrics`` are
    plain numbers: ``on_step_end`` always gets ``step``, ``epoch``, ``loss`` (the exact loss of
    the whole step), ``lr``, ``temperature`` and ``alpha``,
    and on logging steps (every ``log_every``) also the loss parts, ``kl``, ``agreement``,
    ``accuracy`` and ``samples_per_s``. An exception raised from a hook stops training.
    """

    def on_fit_start(self, distiller: Distiller) -> None:
        """Before the first step (after resuming from a checkpoint, if any)."""

    def on_epoch_start(self, distiller: Distiller, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_step_end(self, distiller: Distiller, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based, counted over the whole run), before that
        step's checkpoint (if any) is written. Steps not taken (all rows of zero weight, or an
        fp16 overflow) call no hook."""

    def on_epoch_end(self, distiller: Distiller, epoch: int, metrics: dict[str, float]) -> None:
        """After ``epoch``, before its checkpoint (if any) is written; ``metrics`` are the
        evaluation results, empty without eval data."""

    def on_eval_end(self, distiller: Distiller, metrics: dict[str, float]) -> None:
        """After an evaluation inside :meth:`~pykd.Distiller.fit`."""

    def on_fit_end(self, distiller: Distiller) -> None:
        """After the last epoch."""

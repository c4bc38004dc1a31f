"""Schedules for the distillation temperature and ``alpha``, driven by the global step.

A schedule is any callable ``step -> float``, where ``step`` counts the optimizer steps already
taken (0 for the first). :class:`pykd.Distiller` accepts a plain number (constant), one of the
classes below, or your own function.

Example:
    >>> from pykd.schedules import Cosine, Linear, Warmup
    >>> Linear(4.0, 1.0, steps=100)(50)
    2.5
    >>> Warmup(10, then=Cosine(4.0, 1.0, steps=90))(5)
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

ScheduleLike = Union[float, int, Callable[[int], float]]


class Schedule:
    """Base class: a value as a function of the global step."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """The same ``value`` at every step."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


def _progress(step: int, steps: int) -> float:
    return min(max(step, 0), steps) / steps


class _Ramp(Schedule):
    """From ``start`` at step 0 to ``end`` at step ``steps``, then ``end``."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.start}, {self.end}, steps={self.steps})"


class Linear(_Ramp):
    """Linear interpolation from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.steps)


class Cosine(_Ramp):
    """Half-cosine from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    def __call__(self, step: int) -> float:
        shape = (1.0 - math.cos(math.pi * _progress(step, self.steps))) / 2.0
        return self.start + (self.end - self.start) * shape


class Warmup(Schedule):
    """Linear warm-up from ``start`` to ``then`` over ``steps`` steps, then ``then``.

    ``then`` is a number or another schedule; after the warm-up it is evaluated at
    ``step - steps``, so ``Warmup(100, Cosine(4.0, 1.0, 900))`` warms up to 4 and then decays.
    """

    def __init__(self, steps: int, then: ScheduleLike, start: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        self.steps, self.then, self.start = int(steps), as_schedule(then), float(start)

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return self.then(step - self.steps)
        return self.start + (self.then(0) - self.start) * _progress(step, self.steps)

    def __repr__(self) -> str:
        return f"Warmup({self.steps}, then={self.then!r}, start={self.start})"


def as_schedule(value: ScheduleLike) -> Callable[[int], float]:
    """A number becomes :class:`Constant`; a callable ``step -> float`` is returned as is."""
    if isinstance(value, (int, float)):
        return Constant(value)
    if callable(value):
        return value
    raise TypeError(f"expected a number or a callable step -> float, got {type(value).__name__}")

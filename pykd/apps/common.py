"""Helpers shared by ``pykd demo`` and the scripts in ``examples/``: counting parameters, timing
a model, keying cached files by their settings, scoring, and the embeddings a small student
starts from (``principal_embeddings``, which lives in :mod:`pykd.students` and is re-exported
here). One copy each, so that every app measures and keys things the same way."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from pykd.checkpoint import write_atomic
from pykd.students import principal_embeddings  # re-exported: moved to the library layer

__all__ = [
    "accuracy_and_macro_f1",
    "count_parameters",
    "mean_std",
    "median_latency_ms",
    "principal_embeddings",
    "settings_digest",
    "warmup_linear_decay",
    "write_json",
]

T = TypeVar("T")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (``parameters()`` yields a tied weight once)."""
    return sum(p.numel() for p in model.parameters())


def median_latency_ms(
    calls: Mapping[str, Callable[[T], object]],
    inputs: Sequence[T],
    *,
    warmup: Sequence[T] = (),
    median: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Median wall milliseconds of each call over ``inputs``, one input at a time.

    Every call first runs once on each ``warmup`` input, untimed (first calls allocate and warm
    caches). The calls take turns on every input, so load from other processes falls on all of
    them alike; with one call this is simply its warm-up followed by its timed runs. ``median``
    picks the middle of the sorted times (``statistics.median_high`` takes the upper one of an
    even count instead of averaging two). Grad mode is the caller's: wrap the call in
    ``torch.inference_mode()`` or ``torch.no_grad()`` as the model is meant to be served.
    """
    if not calls or not inputs:
        raise ValueError("median_latency_ms needs at least one call and one input")
    for x in warmup:
        for call in calls.values():
            call(x)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for x in inputs:
        for name, call in calls.items():
            start = time.perf_counter()
            call(x)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * median(t) for name, t in times.items()}


def settings_digest(settings: Any, length: int = 16) -> str:
    """A short hex key of JSON-able ``settings`` (key order does not matter): cached files are
    named by it, so that a file is reused only by a run with the same settings. Keep each app's
    ``length`` as it is: a new one renames, and so orphans, every file cached before."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON with a final newline, written atomically (a results file is
    never left half written)."""
    write_atomic(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of a metric over runs (the sample std; 0 for a single run)."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def accuracy_and_macro_f1(pred: torch.Tensor, target: torch.Tensor,
                          num_classes: int) -> tuple[float, float]:
    """Accuracy and the unweighted mean over classes of F1 (a class never predicted nor present
    scores 0, as in scikit-learn's default)."""
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError("pred and target must be non-empty and of the same shape")
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return (pred == target).float().mean().item(), sum(f1s) / num_classes


def warmup_linear_decay(total_steps: int, warmup: int = 0) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at
    ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor

"""What the Distiller derives from teacher logits: mixtures of teachers and per-row weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import torch

WeightFn = Callable[[torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]
WEIGHTINGS = ("confidence", "entropy", "correctness")


def normalize_teacher_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Teacher mixing weights ``c_k``: given (positive, rescaled to sum 1) or uniform."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(c) for c in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} teacher weights for {n} teachers")
    if not all(math.isfinite(c) and c > 0 for c in weights):
        raise ValueError(f"teacher weights must be finite and > 0, got {weights}")
    total = sum(weights)
    return [c / total for c in weights]


def combine_teachers(
    logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 1.0
) -> torch.Tensor:
    """Teacher logits whose tempered softmax is the weighted mixture of the teachers' ones.

    Returns ``T * log(sum_k c_k softmax(t_k / T))``, computed with ``logsumexp`` in float32, so
    that ``softmax(result / T)`` is exactly the mixture ``sum_k c_k softmax(t_k / T)``. The
    weights must sum to 1 (see :func:`normalize_teacher_weights`).

    Args:
        logits: one ``(*, V)`` tensor per teacher, all of the same shape and on one device.
        weights: the mixing weights ``c_k``.
        temperature: ``T > 0``.

    Returns:
        ``(*, V)`` float32 logits.
    """
    if len(logits) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(logits)} teachers")
    if len(logits) == 1:
        return logits[0].float()
    log_probs = torch.stack([
        torch.log_softmax(t.float() / temperature, dim=-1) + math.log(c)
        for t, c in zip(logits, weights)
    ])
    return temperature * torch.logsumexp(log_probs, dim=0)


def adaptive_weights(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    mode: str | WeightFn,
    *,
    incorrect_weight: float = 0.1,
) -> torch.Tensor:
    """Per-row weights ``lambda_i >= 0`` computed from the teacher, detached, float32.

    Modes, with ``p = softmax(teacher_logits)``:

    - ``"confidence"``: ``max_v p_v`` — trust confident teacher predictions more.
    - ``"entropy"``: ``1 - H(p) / log V`` — 1 for a one-hot teacher, 0 for a uniform one.
    - ``"correctness"``: 1 where the teacher's argmax equals the label, ``incorrect_weight``
      elsewhere (needs labels).
    - a function ``fn(teacher_logits, labels) -> weights`` of the leading shape ``(*)``.

    Args:
        teacher_logits: ``(*, V)`` teacher logits (temperature 1).
        labels: ``(*)`` int64 labels aligned with the rows, or None.
        mode: one of the names above or a function.
        incorrect_weight: weight of rows the teacher gets wrong, for ``"correctness"``.

    Returns:
        ``(*)`` float32 weights.
    """
    logits = teacher_logits.detach().float()
    if callable(mode):
        weights = mode(logits, labels)
        if not isinstance(weights, torch.Tensor) or weights.shape != logits.shape[:-1]:
            shape = getattr(weights, "shape", type(weights).__name__)
            raise ValueError(
                f"the weighting function must return a tensor of shape {tuple(logits.shape[:-1])}"
                f", got {shape}"
            )
        weights = weights.detach().float()
        # A user function is the one source that can break the op's w_i >= 0 contract.
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("the weighting function returned negative or non-finite weights")
    elif mode == "confidence":
        weights = torch.softmax(logits, dim=-1).amax(dim=-1)
    elif mode == "entropy":
        vocab = logits.shape[-1]
        log_p = torch.log_softmax(logits, dim=-1)
        # 0 log 0 = 0: masked (-inf) entries contribute nothing.
        entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(dim=-1)
        if vocab == 1:
            return torch.ones_like(entropy)
        # Rounding can push H(p) a hair above log V.
        weights = (1.0 - entropy / math.log(vocab)).clamp_min(0.0)
    elif mode == "correctness":
        if labels is None:
            raise ValueError("sample_weighting='correctness' needs labels in the batches")
        if not 0.0 <= incorrect_weight:
            raise ValueError(f"incorrect_weight must be >= 0, got {incorrect_weight!r}")
        right = logits.argmax(dim=-1) == labels
        weights = torch.where(right, 1.0, float(incorrect_weight))
    else:
        raise ValueError(
            f"sample weighting must be one of {WEIGHTINGS} or a function, got {mode!r}"
        )
    return weights

"""Functional face of pykd's fused distillation loss (its contract: ``docs/loss.md``)."""

from __future__ import annotations

import math

import torch

from pykd._extension import require_extension

DIVERGENCES = ("kl", "reverse_kl", "jsd", "mse", "cosine")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
_LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_loss_options(
    divergence: str, temperature: float, alpha: float, beta: float, reduction: str,
    has_target: bool,
) -> None:
    """Raise ValueError for loss options outside the spec; needs no tensor."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must be in the open interval (0, 1), got {beta!r} "
            "(at its ends jsd is 0: use divergence='kl' or 'reverse_kl')"
        )
    if not has_target and alpha != 1.0:
        raise ValueError(
            f"alpha={alpha!r} mixes in a hard-label term, but no target was given: "
            "pass target=... or keep alpha=1"
        )


def _check_tensors(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None,
    target: torch.Tensor | None,
) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher must be tensors")
    if student.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"student must be float32, float64, float16 or bfloat16, got {student.dtype}"
        )
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"teacher dtype {teacher.dtype} must match student dtype {student.dtype} "
            "(cast the teacher's logits, e.g. teacher.to(student.dtype))"
        )
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student must be shaped (*, V) with V >= 1, got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher shape {tuple(teacher.shape)} must equal student shape {tuple(student.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    _check_row_inputs(student.shape[:-1], student.dtype, student.device, weight, target)


def _check_row_inputs(
    lead: torch.Size, dtype: torch.dtype, device: torch.device, weight: torch.Tensor | None,
    target: torch.Tensor | None,
) -> None:
    if weight is not None:
        if weight.shape != lead:
            raise ValueError(
                f"weight shape {tuple(weight.shape)} must be the leading shape {tuple(lead)}"
            )
        if weight.dtype not in (torch.float32, dtype):
            raise TypeError(f"weight must be float32 or {dtype}, got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but student is on {device}")
    if target is not None:
        if target.shape != lead:
            raise ValueError(
                f"target shape {tuple(target.shape)} must be the leading shape {tuple(lead)}"
            )
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 class indices, got {target.dtype}")
        if target.device != device:
            raise ValueError(f"target is on {target.device} but student is on {device}")


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused, weighted distillation loss between student and teacher outputs.

    Per row ``i`` (the leading dims of ``student`` flattened), with ``p = softmax(teacher / T)``
    and ``q = softmax(student / T)``, the soft term is one of

    - ``"kl"``: ``T^2 * KL(p || q)`` (Hinton et al. 2015)
    - ``"reverse_kl"``: ``T^2 * KL(q || p)``
    - ``"jsd"``: ``T^2 * (beta * KL(p || m) + (1 - beta) * KL(q || m))``,
      ``m = beta * p + (1 - beta) * q``
    - ``"mse"``: ``sum_v (teacher - student)^2`` (no temperature)
    - ``"cosine"``: ``1 - cos(student, teacher)`` (no temperature; for hidden states)

    With ``target``, the row is ``w_i * (alpha * soft + (1 - alpha) * CE(student, y_i))``; rows
    whose label is ``ignore_index`` count for nothing. Without it, ``w_i * soft`` (``alpha`` must
    be 1). Reductions: ``"mean"`` (divides by the sum of weights of the valid rows), ``"sum"``,
    ``"batchmean"`` (divides by the number of valid rows) and ``"none"`` (per-row, float32).

    Gradients flow to ``student``, to ``teacher`` if it requires grad (mutual learning) and to
    ``weight`` if it requires grad. They are computed in the same pass as the loss whenever
    autograd will need them, so run evaluation under ``torch.no_grad()``.

    Args:
        student: ``(*, V)`` logits (float32, float64, float16 or bfloat16).
        teacher: same shape and dtype as ``student``.
        weight: optional ``(*)`` per-row weights ``w_i >= 0`` (float32 or the logits dtype).
        target: optional ``(*)`` int64 hard labels in ``[0, V)`` or ``ignore_index``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"mse"`` or ``"cosine"``.
        temperature: ``T > 0``, for the softmax divergences.
        alpha: weight of the soft term in ``[0, 1]``.
        beta: jsd mixing weight in ``(0, 1)``.
        ignore_index: label value of rows to ignore.
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"`` or ``"none"``.

    Returns:
        The loss: float32 (float64 for float64 logits), a scalar or ``(*)`` for ``"none"``.

    Example:
        >>> import torch, pykd
        >>> student = torch.randn(8, 100, requires_grad=True)
        >>> teacher = torch.randn(8, 100)
        >>> labels = torch.randint(0, 100, (8,))
        >>> loss = pykd.functional.distillation_loss(
        ...     student, teacher, target=labels, temperature=2.0, alpha=0.5)
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([8, 100])
    """
    require_extension()
    check_loss_options(divergence, temperature, alpha, beta, reduction, target is not None)
    _check_tensors(student, teacher, weight, target)
    return torch.ops.pykd.distill_loss(
        student, teacher, weight, target,
        divergence=divergence, temperature=float(temperature), alpha=float(alpha),
        beta=float(beta), ignore_index=int(ignore_index), reduction=reduction,
    )


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Distillation loss of two linear heads without ever materialising the [N, V] logits.

    Computes exactly ``distillation_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, ...)`` (same options, same semantics), but
    ``chunk_size`` rows at a time: per chunk the two projections, the fused loss and gradient
    kernel, and the chunk's share of the student's hidden, weight and bias gradients. Peak extra
    memory is three ``chunk_size x V`` buffers whatever N is. The teacher is frozen: its hidden
    states and head get no gradient. ``reduction="none"`` is not supported (use ``"sum"`` with
    per-row weights).

    Args:
        student_hidden: ``(*, Hs)`` student hidden states (the input of its LM head).
        student_weight: ``[V, Hs]`` student head weight (``nn.Linear.weight``).
        teacher_hidden: ``(*, Ht)`` teacher hidden states, same leading dims.
        teacher_weight: ``[V, Ht]`` teacher head weight.
        student_bias, teacher_bias: optional ``[V]`` head biases.
        weight, target, divergence, temperature, alpha, beta, ignore_index, reduction: as in
            :func:`distillation_loss`.
        chunk_size: rows per chunk; larger is faster until the chunk's logits stop fitting.

    Example:
        >>> import torch, pykd
        >>> hs = torch.randn(64, 32, requires_grad=True)
        >>> head = torch.nn.Linear(32, 1000)
        >>> ht, teacher_head = torch.randn(64, 48), torch.nn.Linear(48, 1000)
        >>> loss = pykd.functional.fused_linear_distillation_loss(
        ...     hs, head.weight, ht, teacher_head.weight.detach(), student_bias=head.bias,
        ...     temperature=2.0, chunk_size=16)
        >>> loss.backward()
    """
    require_extension()
    check_loss_options(divergence, temperature, alpha, beta, reduction, target is not None)
    if reduction == "none":
        raise ValueError("reduction='none' is not supported by the fused linear loss; "
                         "use reduction='sum' with per-row weights")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, x in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be [V, H], got {tuple(x.shape)}")
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight {tuple(student_weight.shape)} must be [V, Hs] with "
                         f"Hs = student_hidden.shape[-1] = {student_hidden.shape[-1]}")
    if teacher_weight.shape != (student_weight.shape[0], teacher_hidden.shape[-1]):
        raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} must be [V, Ht] = "
                         f"{(student_weight.shape[0], teacher_hidden.shape[-1])}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                         f"{tuple(student_hidden.shape)} must share the leading dims")
    for name, x in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight), ("student_bias", student_bias),
                    ("teacher_bias", teacher_bias)):
        if x is not None and (x.dtype != student_hidden.dtype or x.device != student_hidden.device):
            raise TypeError(f"{name} must have student_hidden's dtype {student_hidden.dtype} and "
                            f"device {student_hidden.device}, got {x.dtype} on {x.device}")
    if student_hidden.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"student_hidden must be float32, float64, float16 or bfloat16, got "
                        f"{student_hidden.dtype}")
    _check_row_inputs(student_hidden.shape[:-1], student_hidden.dtype, student_hidden.device,
                      weight, target)
    return torch.ops.pykd.fused_linear_distill_loss(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        teacher_bias, weight, target, divergence=divergence, temperature=float(temperature),
        alpha=float(alpha), beta=float(beta), ignore_index=int(ignore_index),
        reduction=reduction, chunk_size=chunk_size,
    )


def distillation_loss_topk(
    student: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss against a teacher stored as its top-k logits (a teacher-output cache).

    The teacher's distribution is the softmax of its k logits at temperature T, with **zero mass
    on every other class** (the k entries are renormalised, not padded with the missing tail).
    So the loss equals :func:`distillation_loss` with dense teacher logits
    ``T * log(scatter(softmax(teacher_logits / T)))`` (``-inf`` off the top-k), and with k = V it
    is the dense loss exactly. Only ``"kl"`` and ``"jsd"`` are allowed: reverse KL is infinite
    where the teacher has no mass, and mse/cosine need values the cache does not hold.
    Indices in a row must be distinct. The teacher gets no gradient.

    Args:
        student: ``(*, V)`` student logits.
        teacher_indices: ``(*, k)`` int64 or int32 class indices in ``[0, V)``.
        teacher_logits: ``(*, k)`` the teacher's logits at those indices (any float dtype, e.g.
            the float16 of a cache); ``-inf`` marks unused slots.
        weight, target, divergence, temperature, alpha, beta, ignore_index, reduction: as in
            :func:`distillation_loss`.

    Example:
        >>> import torch, pykd
        >>> student = torch.randn(6, 100, requires_grad=True)
        >>> top = torch.randn(6, 100).topk(8, dim=-1)
        >>> loss = pykd.functional.distillation_loss_topk(
        ...     student, top.indices, top.values.half(), temperature=2.0)
        >>> loss.backward()
    """
    require_extension()
    check_loss_options(divergence, temperature, alpha, beta, reduction, target is not None)
    if divergence not in ("kl", "jsd"):
        raise ValueError(f"divergence must be 'kl' or 'jsd' with a top-k teacher, got "
                         f"{divergence!r} (reverse KL is infinite off the teacher's top-k)")
    if student.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"student must be float32, float64, float16 or bfloat16, got "
                        f"{student.dtype}")
    lead = student.shape[:-1]
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"student must be shaped (*, V) with V >= 1, got {tuple(student.shape)}")
    if teacher_indices.shape[:-1] != lead or teacher_indices.dim() != student.dim():
        raise ValueError(f"teacher_indices {tuple(teacher_indices.shape)} must be (*, k) with the "
                         f"student's leading dims {tuple(lead)}")
    if teacher_logits.shape != teacher_indices.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
                         f"teacher_indices shape {tuple(teacher_indices.shape)}")
    if teacher_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_indices must be int64 or int32, got {teacher_indices.dtype}")
    if not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logits", teacher_logits)):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but student is on {student.device}")
    _check_row_inputs(lead, student.dtype, student.device, weight, target)
    return torch.ops.pykd.distill_loss_topk(
        student, teacher_indices, teacher_logits, weight, target, divergence=divergence,
        temperature=float(temperature), alpha=float(alpha), beta=float(beta),
        ignore_index=int(ignore_index), reduction=reduction,
    )

"""Functional face of pykd's fused distillation loss (its contract: ``docs/loss.md``)."""

from __future__ import annotations

import torch

from pykd._checks import DIVERGENCES as DIVERGENCES
from pykd._checks import REDUCTIONS as REDUCTIONS
from pykd._checks import as_int, as_options, check_tensors
from pykd._checks import check_loss_options as check_loss_options
from pykd._extension import require_extension

REST_MODES = ("bucket", "target")

# The argument checks live in the ops (docs/loss.md, "Bad input"); pykd._checks says why. What runs
# here is only the conversion to the schema's types, which must happen before the dispatcher sees
# the arguments.


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float | torch.Tensor = 1.0,
    alpha: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_index: int | None = None,
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
    whose label is ``ignore_index`` count for nothing, and rows whose label is ``soft_index``
    have no label: their loss is ``w_i * soft`` (alpha 1), so unlabelled (transfer-set) rows can
    share a batch with labelled ones. Without ``target``, every row is ``w_i * soft`` (``alpha``
    must be 1). ``temperature`` and ``alpha`` may be given per row, as ``(*)`` tensors (e.g. a
    lower temperature on hard tokens); they get no gradient. Reductions: ``"mean"`` (divides by
    the sum of weights of the valid rows, soft-only rows included), ``"sum"``, ``"batchmean"``
    (divides by the number of valid rows) and ``"none"`` (per-row, float32).

    Gradients flow to ``student``, to ``teacher`` if it requires grad (mutual learning) and to
    ``weight`` if it requires grad. They are computed in the same pass as the loss whenever
    autograd will need them, so run evaluation under ``torch.no_grad()``.

    Args:
        student: ``(*, V)`` logits (float32, float64, float16 or bfloat16).
        teacher: same shape and dtype as ``student``.
        weight: optional ``(*)`` per-row weights ``w_i >= 0`` (float32 or the logits dtype).
        target: optional ``(*)`` int64 hard labels in ``[0, V)``, ``ignore_index`` or
            ``soft_index``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"mse"`` or ``"cosine"``.
        temperature: ``T > 0``, for the softmax divergences: a number or a ``(*)`` tensor.
        alpha: weight of the soft term in ``[0, 1]``: a number or a ``(*)`` tensor (with a
            ``target`` only).
        beta: jsd mixing weight in ``(0, 1)``.
        ignore_index: label value of rows to ignore.
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"`` or ``"none"``.
        soft_index: label value of rows without a label (soft term only); outside ``[0, V)``
            and not ``ignore_index``. None: no such rows.

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

        Unlabelled rows (label -1 here) beside labelled ones, each row with its own temperature:

        >>> labels[:3] = -1
        >>> loss = pykd.functional.distillation_loss(
        ...     student, teacher, target=labels, soft_index=-1, alpha=0.5,
        ...     temperature=torch.linspace(1.0, 4.0, 8))
    """
    require_extension()
    op = "distill_loss"
    check_tensors(op, student=student, teacher=teacher, weight=weight, target=target)
    return torch.ops.pykd.distill_loss(
        student, teacher, weight, target,
        **as_options(op, divergence, temperature, alpha, beta, ignore_index, reduction,
                     soft_index),
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
    temperature: float | torch.Tensor = 1.0,
    alpha: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_index: int | None = None,
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
        weight, target, divergence, temperature, alpha, beta, ignore_index, reduction,
            soft_index: as in :func:`distillation_loss`.
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
    op = "fused_linear_distill_loss"
    check_tensors(op, student_hidden=student_hidden, student_weight=student_weight,
                  student_bias=student_bias, teacher_hidden=teacher_hidden,
                  teacher_weight=teacher_weight, teacher_bias=teacher_bias, weight=weight,
                  target=target)
    return torch.ops.pykd.fused_linear_distill_loss(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        teacher_bias, weight, target,
        **as_options(op, divergence, temperature, alpha, beta, ignore_index, reduction,
                     soft_index),
        chunk_size=as_int(op, "chunk_size", chunk_size),
    )


def distillation_loss_topk(
    student: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float | torch.Tensor = 1.0,
    alpha: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_index: int | None = None,
    teacher_log_rest: torch.Tensor | None = None,
    rest: str = "bucket",
) -> torch.Tensor:
    """Distillation loss against a teacher stored as its top-k logits (a teacher-output cache).

    The teacher's distribution is the softmax of its k logits at temperature T, with **zero mass
    on every other class** (the k entries are renormalised, not padded with the missing tail).
    So the loss equals :func:`distillation_loss` with dense teacher logits
    ``T * log(scatter(softmax(teacher_logits / T)))`` (``-inf`` off the top-k), and with k = V it
    is the dense loss exactly. Only ``"kl"`` and ``"jsd"`` are allowed: reverse KL is infinite
    where the teacher has no mass, and mse/cosine need values the cache does not hold.
    Indices in a row must be distinct. The teacher gets no gradient.

    Zero mass off the top-k pushes the student's tail towards zero, which hurts when the teacher
    often ranks the right class below k. ``teacher_log_rest`` (kl only) gives each row the log
    of the teacher's mass **outside** its k entries at T, ``r``: the k entries then carry
    ``1 - r`` (their softmax times ``1 - r``) and the other classes form one bucket of mass
    ``r``, compared with the student's mass there. The soft term is the KL between these
    ``k + 1``-bucket distributions, ``T^2 [sum_j p_j log(p_j / q_j) + r log(r / q_rest)]``, and
    the student's gradient off the top-k becomes ``T q_c (1 - r / q_rest)``: a student whose tail
    is as heavy as the teacher's gets no push there. ``q_rest`` is computed as
    ``1 - sum_j q_j`` and floored at the accumulation dtype's epsilon. With a rest, an unused
    slot (``-inf`` logit) is one of the bucket's classes, not one of zero mass.

    ``rest="target"`` spends the rest differently where a row's label is a class off the k
    entries: the teacher then puts its mass ``r`` on that label (one more entry) instead of on
    a bucket, so the student's tail is shaped by what the data say came next, not left as it
    is. Rows whose label is among the k, ``ignore_index`` or ``soft_index`` keep the bucket.

    Args:
        student: ``(*, V)`` student logits.
        teacher_indices: ``(*, k)`` int64 or int32 class indices in ``[0, V)``.
        teacher_logits: ``(*, k)`` the teacher's logits at those indices (any float dtype, e.g.
            the float16 of a cache); ``-inf`` marks unused slots.
        weight, target, divergence, temperature, alpha, beta, ignore_index, reduction,
            soft_index: as in :func:`distillation_loss`.
        teacher_log_rest: ``(*)`` log of the teacher's probability mass off the k entries at
            the temperature used (``<= 0``; ``-inf`` for none), or None for a renormalised
            top-k teacher. Needs ``divergence="kl"``.
        rest: ``"bucket"`` (the default) or ``"target"`` (the rest on an off-k label; needs
            ``teacher_log_rest`` and ``target``).

    Example:
        >>> import torch, pykd
        >>> student = torch.randn(6, 100, requires_grad=True)
        >>> teacher = torch.randn(6, 100)
        >>> top = teacher.topk(8, dim=-1)
        >>> log_p = torch.log_softmax(teacher, dim=-1).gather(-1, top.indices)
        >>> log_rest = torch.log1p(-log_p.exp().sum(-1))  # the mass the k entries miss
        >>> loss = pykd.functional.distillation_loss_topk(
        ...     student, top.indices, top.values, teacher_log_rest=log_rest)
        >>> loss.backward()
        >>> student = torch.randn(6, 100, requires_grad=True)
        >>> loss = pykd.functional.distillation_loss_topk(
        ...     student, top.indices, top.values.half(), temperature=2.0)
        >>> loss.backward()
    """
    require_extension()
    op = "distill_loss_topk"
    check_tensors(op, student=student, teacher_indices=teacher_indices,
                  teacher_logits=teacher_logits, weight=weight, target=target,
                  teacher_log_rest=teacher_log_rest)
    if rest not in REST_MODES:
        raise ValueError(f"{op}: rest must be one of {REST_MODES}, got {rest!r}")
    if rest == "target":
        if teacher_log_rest is None or target is None:
            raise ValueError(f"{op}: rest='target' needs teacher_log_rest and target")
        # The op checks the shapes; these transforms need them to agree first.
        if (teacher_log_rest.shape != teacher_indices.shape[:-1]
                or target.shape != teacher_indices.shape[:-1]):
            raise ValueError(f"{op}: rest='target' needs target and teacher_log_rest of the "
                             f"teacher's leading shape {tuple(teacher_indices.shape[:-1])}")
        teacher_indices, teacher_logits, teacher_log_rest = _rest_on_target(
            teacher_indices, teacher_logits, teacher_log_rest, target,
            classes=student.shape[-1], temperature=temperature)
    return torch.ops.pykd.distill_loss_topk(
        student, teacher_indices, teacher_logits, weight, target,
        **as_options(op, divergence, temperature, alpha, beta, ignore_index, reduction,
                     soft_index),
        teacher_log_rest=teacher_log_rest,
    )


@torch.no_grad()
def _rest_on_target(teacher_indices: torch.Tensor, teacher_logits: torch.Tensor,
                   teacher_log_rest: torch.Tensor, target: torch.Tensor, *, classes: int,
                   temperature: float | torch.Tensor = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-k + rest teacher with its rest moved onto each row's label where that label is a
    class in ``[0, classes)`` off the k entries: ``k + 1`` entries per row, the last one the
    label with logit ``T log r`` (the others rescaled to carry ``1 - r``) and no rest left, or,
    in the other rows, an unused slot (``-inf`` at a class not in the row) and the rest as it
    was. The values come out in float32 (float64 for float64 inputs) for the op as they are.
    """
    k = teacher_indices.shape[-1]
    index = teacher_indices.long()
    label = target.long()
    moves = (label >= 0) & (label < classes) & ~(index == label[..., None]).any(-1)
    # A class not in the row for the unused slot: one of 0..k always is. Classes above k go to
    # a last column that is never chosen; O(rows * k), whatever k is.
    seen = torch.zeros(*index.shape[:-1], k + 2, dtype=torch.bool, device=index.device)
    seen.scatter_(-1, index.clamp(0, k + 1), True)
    spare = (~seen[..., :k + 1]).int().argmax(-1)
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    t = torch.as_tensor(temperature, dtype=dtype, device=index.device)
    t_row = t[..., None] if t.dim() else t
    logits = teacher_logits.to(dtype)
    log_rest = teacher_log_rest.to(dtype)
    # log p_j at T for the k entries once they carry 1 - r; a row of unused slots stays -inf.
    log_kept = torch.log(-torch.expm1(log_rest))
    scaled = torch.log_softmax(logits / t_row, dim=-1) + log_kept[..., None]
    scaled = torch.where(torch.isneginf(logits), logits, t_row * scaled)
    logits = torch.where(moves[..., None], scaled, logits)
    extra_index = torch.where(moves, label, spare)
    extra_logit = torch.where(moves, t * log_rest, torch.full_like(log_rest, float("-inf")))
    log_rest = torch.where(moves, torch.full_like(log_rest, float("-inf")), log_rest)
    return (torch.cat([index, extra_index[..., None]], -1),
            torch.cat([logits, extra_logit[..., None]], -1), log_rest)

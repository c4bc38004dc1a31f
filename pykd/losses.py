"""nn.Module faces of pykd's losses: each holds its options, checked when it is made."""

from __future__ import annotations

import torch
from torch import nn

from pykd._checks import check_fused_linear_options, check_loss_options, check_topk_options
from pykd.functional import (
    distillation_loss,
    distillation_loss_topk,
    fused_linear_distillation_loss,
)


class _LossOptions(nn.Module):
    """The options every distillation loss takes (docs/loss.md), checked when the module is made
    (by the op's own rule, ``_check``; alpha < 1 needs a target only at call time) and shown in
    its repr."""

    _check = staticmethod(check_loss_options)

    def __init__(
        self,
        divergence: str = "kl",
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        soft_index: int | None = None,
    ) -> None:
        self._check(divergence, temperature, alpha, beta, reduction, has_target=True)
        if soft_index is not None and soft_index == ignore_index:
            raise ValueError(f"soft_index must differ from ignore_index ({ignore_index})")
        super().__init__()
        self.divergence = divergence
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.soft_index = None if soft_index is None else int(soft_index)

    def _options(self) -> dict[str, object]:
        return dict(divergence=self.divergence, temperature=self.temperature, alpha=self.alpha,
                    beta=self.beta, ignore_index=self.ignore_index, reduction=self.reduction,
                    soft_index=self.soft_index)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


class DistillationLoss(_LossOptions):
    """Module form of :func:`pykd.functional.distillation_loss` with fixed options (rows
    labelled ``soft_index``, if given, have no label: the soft term alone).

    Example:
        >>> import torch, pykd
        >>> loss_fn = pykd.DistillationLoss(divergence="kl", temperature=2.0, alpha=0.7)
        >>> student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> loss = loss_fn(student, teacher, target=torch.tensor([1, 2, -100, 3]))
        >>> loss.backward()
    """

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distillation_loss(student, teacher, weight=weight, target=target, **self._options())


class TopKDistillationLoss(_LossOptions):
    """Module form of :func:`pykd.functional.distillation_loss_topk`: the student against a
    teacher given as its top-k (index, logit) pairs per row, e.g. from a ``TeacherCache``.

    Example:
        >>> import torch, pykd
        >>> loss_fn = pykd.TopKDistillationLoss(temperature=2.0, alpha=0.5)
        >>> student = torch.randn(6, 100, requires_grad=True)
        >>> top = torch.randn(6, 100).topk(8, dim=-1)
        >>> loss = loss_fn(student, top.indices, top.values, target=torch.randint(0, 100, (6,)))
        >>> loss.backward()
    """

    _check = staticmethod(check_topk_options)

    def forward(
        self,
        student: torch.Tensor,
        teacher_indices: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        teacher_log_rest: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distillation_loss_topk(student, teacher_indices, teacher_logits, weight=weight,
                                      target=target, teacher_log_rest=teacher_log_rest,
                                      **self._options())


class FusedLinearDistillationLoss(_LossOptions):
    """Module form of :func:`pykd.functional.fused_linear_distillation_loss`.

    For LM heads: takes the hidden states that feed the student's and the teacher's vocabulary
    projections, and the projections' weights, so the [N, V] logits are never materialised.

    Example:
        >>> import torch, pykd
        >>> student_head, teacher_head = torch.nn.Linear(32, 500), torch.nn.Linear(64, 500)
        >>> loss_fn = pykd.FusedLinearDistillationLoss(temperature=2.0, chunk_size=64)
        >>> hs, ht = torch.randn(128, 32, requires_grad=True), torch.randn(128, 64)
        >>> loss = loss_fn(hs, student_head.weight, ht, teacher_head.weight.detach(),
        ...                student_bias=student_head.bias)
        >>> loss.backward()
    """

    @staticmethod
    def _check(*options, has_target: bool) -> None:
        check_loss_options(*options, has_target=has_target, op="fused_linear_distill_loss")

    def __init__(
        self,
        divergence: str = "kl",
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int = 1024,
        soft_index: int | None = None,
    ) -> None:
        check_fused_linear_options(reduction, int(chunk_size))
        super().__init__(divergence, temperature, alpha, beta, ignore_index, reduction,
                         soft_index)
        self.chunk_size = int(chunk_size)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, weight=weight, target=target,
            chunk_size=self.chunk_size, **self._options(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"

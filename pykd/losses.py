"""nn.Module faces of pykd's losses."""

from __future__ import annotations

import torch
from torch import nn

from pykd._checks import check_fused_linear_options, check_loss_options
from pykd.functional import distillation_loss, fused_linear_distillation_loss


class DistillationLoss(nn.Module):
    """Module form of :func:`pykd.functional.distillation_loss` with fixed options.

    Example:
        >>> import torch, pykd
        >>> loss_fn = pykd.DistillationLoss(divergence="kl", temperature=2.0, alpha=0.7)
        >>> student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> loss = loss_fn(student, teacher, target=torch.tensor([1, 2, -100, 3]))
        >>> loss.backward()
    """

    def __init__(
        self,
        divergence: str = "kl",
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        # alpha < 1 needs a target at call time; everything else can be checked now.
        check_loss_options(divergence, temperature, alpha, beta, reduction, has_target=True)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distillation_loss(
            student, teacher, weight=weight, target=target, divergence=self.divergence,
            temperature=self.temperature, alpha=self.alpha, beta=self.beta,
            ignore_index=self.ignore_index, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )


class FusedLinearDistillationLoss(nn.Module):
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

    def __init__(
        self,
        divergence: str = "kl",
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        check_loss_options(divergence, temperature, alpha, beta, reduction, has_target=True,
                           op="fused_linear_distill_loss")
        check_fused_linear_options(reduction, int(chunk_size))
        self.divergence = divergence
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
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
            divergence=self.divergence, temperature=self.temperature, alpha=self.alpha,
            beta=self.beta, ignore_index=self.ignore_index, reduction=self.reduction,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}"
        )

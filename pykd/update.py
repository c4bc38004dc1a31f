"""The end of an optimizer step: the non-finite checks, clipping, fp16 loss scaling, the
optimizers' and schedulers' steps, and their state in checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch

Scheduler = torch.optim.lr_scheduler.LRScheduler


class NonFiniteLossError(FloatingPointError):
    """The loss of a micro-batch, or the gradient of a step, was NaN or infinite.

    Raised before the optimizer step, with the gradients cleared: the weights, the optimizer and
    scheduler states and ``global_step`` are those of the last good step.
    """


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``grads`` together (as ``torch.nn.utils.get_total_norm``), NaN or inf
    where an entry is. It runs every step, so float32 gradients on the CPU take BLAS dots,
    which read them about twice as fast as the norm kernel (the demo's 7.8 MB embedding
    gradient: 170 vs 310 us on 2 cores), and more exactly (float32 norms of millions of
    entries drift by ~1e-5 here, BLAS dots by ~1e-7). The host reads each dot at no cost: the
    sum is a Python float. A dot that overflows float32 (norm above ~1.8e19) is redone in
    float64, so only non-finite entries give a non-finite norm."""
    if not all(g.device.type == "cpu" and g.dtype == torch.float32 and g.layout == torch.strided
               for g in grads) or not grads:
        return torch.nn.utils.get_total_norm(grads)
    total = 0.0
    for g in grads:
        flat = g.reshape(-1)
        square = torch.dot(flat, flat).item()
        if math.isinf(square):
            square = torch.dot(flat.double(), flat.double()).item()
        total += square
    return torch.tensor(math.sqrt(total), dtype=torch.float32)


class Updater:
    """The optimizers (stepped together), their schedulers and the fp16 ``GradScaler``."""

    def __init__(self, optimizers: list[torch.optim.Optimizer],
                 schedulers: list[Scheduler | None], scaler: torch.amp.GradScaler | None,
                 max_grad_norm: float | None) -> None:
        # The loop's own lists, not copies: the two always see the same optimizers.
        self.optimizers, self.schedulers = optimizers, schedulers
        self.scaler, self.max_grad_norm = scaler, max_grad_norm

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def loss_scale(self, device: torch.device) -> torch.Tensor:
        """The fp16 loss scale (1 without a scaler), folded into the loss weights."""
        one = torch.ones((), device=device)
        return self.scaler.scale(one) if self.scaler is not None else one

    def grad_norms(self) -> list[torch.Tensor]:
        """Each optimizer's gradient norm (unscaled under fp16), left on its device: one fused
        pass that the finiteness check and the clipping share."""
        norms = []
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            norms.append(total_norm([p.grad for p in _params(optimizer) if p.grad is not None]))
        return norms

    def go_ahead(self, losses: list[float], denominators: list[float], norms: list[float],
                 loss_scale: torch.Tensor, where: str, first: int) -> bool:
        """Whether the step over the micro-batches from batch ``first`` on is taken; ``where``
        says which step it is ("at step 3 (epoch 0, {batches} of the epoch)").

        A non-finite loss raises; so does a non-finite gradient norm, except under fp16 where it
        is the loss scale overflowing and the step is skipped as ``GradScaler`` skips it (the
        scale backs off). A step whose rows all have zero weight is skipped too: it could only
        apply weight decay and momentum. A step not taken leaves no gradient, and the weights,
        optimizer and scheduler states as they were.
        """
        last_good = "the weights and optimizer state are left as they were before this step"
        for j, value in enumerate(losses):
            if not math.isfinite(value):
                self.discard(loss_scale)
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) {where.format(batches=f'batch {first + j}')}; "
                    f"{last_good}. Check the inputs and logits of that batch, the learning rate, "
                    "or use precision='bf16' instead of 'fp16'"
                )
        if not any(denominators):
            self.discard(loss_scale)
            return False
        bad = [k for k, norm in enumerate(norms) if not math.isfinite(norm)]
        if not bad:
            return True
        if self.scaler is not None:
            self.discard(None)
            return False
        self.discard(loss_scale)
        batches = (f"batch {first}" if len(losses) == 1
                   else f"batches {first}-{first + len(losses) - 1}")
        owner = f" of optimizer {bad[0]}" if len(norms) > 1 else ""
        raise NonFiniteLossError(
            f"non-finite gradient (norm {norms[bad[0]]}){owner} with a finite loss "
            f"{where.format(batches=batches)}; {last_good}. Check the backward of the model "
            "(custom autograd functions, hooks) and the learning rate"
        )

    def discard(self, loss_scale: torch.Tensor | None) -> None:
        """Clear the gradients of a step not taken; under fp16, close the scaler's step with
        ``loss_scale`` (the scale as it was) or, given None, backed off as after an overflow."""
        self.zero_grad()
        if self.scaler is not None:
            self.scaler.update(loss_scale)

    def apply(self, norms: list[torch.Tensor]) -> float:
        """Clip each optimizer's parameters (by its ``norms``), step the optimizers and the
        schedulers, and clear the gradients. Returns the learning rate the step used."""
        lr = self.optimizers[0].param_groups[0]["lr"]
        if self.max_grad_norm is not None:
            for optimizer, norm in zip(self.optimizers, norms):
                torch.nn.utils.clip_grads_with_norm_(_params(optimizer), self.max_grad_norm, norm)
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        for scheduler in self.schedulers:
            if scheduler is not None:
                scheduler.step()
        return lr

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries ``optimizer``, ``scheduler`` (lists) and ``scaler``."""
        return {
            "optimizer": [optimizer.state_dict() for optimizer in self.optimizers],
            "scheduler": [None if scheduler is None else scheduler.state_dict()
                          for scheduler in self.schedulers],
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def check_state(self, state: dict[str, Any], path: Any) -> None:
        """Refuse a checkpoint with other optimizers, schedulers or scaler than these."""
        for name, saved, target in (("optimizers", state["optimizer"], self.optimizers),
                                    ("schedulers", state["scheduler"], self.schedulers),
                                    ("scaler", [state["scaler"]], [self.scaler])):
            if [x is None for x in saved] != [x is None for x in target]:
                raise ValueError(f"{path}: the checkpoint and this run disagree on {name}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (checked first with :meth:`check_state`)."""
        for optimizer, saved in zip(self.optimizers, state["optimizer"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["scheduler"]):
            if scheduler is not None:
                scheduler.load_state_dict(saved)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

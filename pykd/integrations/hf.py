"""Hugging Face ``transformers`` integration: a :class:`transformers.Trainer` that distils.

:class:`DistillationTrainer` trains ``model`` (the student) with the Trainer's loop (optimizer,
scheduler, gradient accumulation, mixed precision, logging, checkpoints) and replaces its loss by
pykd's fused distillation loss against a frozen ``teacher_model``::

    from pykd.integrations.hf import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                  train_dataset=train, temperature=2.0, alpha=0.5)
    trainer.train()

Importing this module imports ``transformers`` (``pip install "pykd[hf]"``); ``import pykd``
alone does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised by tests with transformers hidden
    raise ImportError(
        "pykd.integrations.hf needs Hugging Face transformers; install it with "
        'pip install "pykd[hf]"'
    ) from exc

from pykd._batches import shift_left
from pykd.functional import distillation_loss

__all__ = ["DistillationTrainer"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _is_causal_lm(model: nn.Module) -> bool:
    """Guess whether ``model`` predicts the next token (its logits must be shifted)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False  # decoder logits are aligned with unshifted labels
    if getattr(config, "is_decoder", False):
        return True
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover - layout of very old or future releases
        causal_names = set()
    return any(n in causal_names or n.endswith(_CAUSAL_SUFFIXES) for n in names)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}")


class DistillationTrainer(transformers.Trainer):
    """A :class:`transformers.Trainer` whose loss is pykd's fused distillation loss.

    The student (``model``) and the frozen teacher run on the same batch (the teacher without
    ``labels``, under ``torch.no_grad()``); their ``logits`` go through
    :func:`pykd.functional.distillation_loss` with ``ignore_index=-100``. Per valid row the loss
    is ``alpha * soft + (1 - alpha) * CE(student, label)``; a batch without ``labels`` uses the
    soft term alone (``alpha = 1``) and, for ``[B, T, V]`` logits, weighs the positions by the
    ``attention_mask`` if there is one.

    Sequence classification (``[B, C]`` logits, ``[B]`` labels) and token-level models
    (``[B, T, V]`` logits, ``[B, T]`` labels with ``-100`` padding) both work. For a causal LM
    the logits at position ``t`` are scored against the label at ``t + 1``
    (``logits[:, :-1]`` vs ``labels[:, 1:]``), as the models' own loss does.

    Gradient accumulation follows the Trainer's convention: when it passes
    ``num_items_in_batch`` (the count of labels other than ``-100`` over all the micro-batches
    of an optimizer step), the loss is the sum over the rows divided by that count, so every
    token weighs the same however the tokens fall into micro-batches. The division is done by
    per-row weights inside the fused op (which computes the gradient in its forward pass) rather
    than by scaling the loss afterwards, which would cost another pass over the logits.

    Args:
        model: the student, a ``transformers`` model (or module returning ``logits``).
        teacher_model: the teacher; same output shape as the student (same label set or
            vocabulary). It is put in eval mode, its parameters stop requiring gradients and it
            follows the student's device.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"mse"`` or ``"cosine"``.
        temperature: softmax temperature ``T`` of the soft term.
        alpha: weight of the soft term; ``1 - alpha`` weighs the cross entropy with the labels.
        beta: mixing weight of ``"jsd"``.
        causal_lm: shift logits and labels as for next-token prediction. ``None`` decides from
            the student's class and config (``is_decoder``, ``*ForCausalLM``, ``*LMHeadModel``).
        **trainer_kwargs: passed to :class:`transformers.Trainer` (``args``, ``train_dataset``,
            ``data_collator``, ...). ``compute_loss_func`` is not accepted: the loss is pykd's.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        *,
        divergence: str = "kl",
        temperature: float = 2.0,
        alpha: float = 0.5,
        beta: float = 0.5,
        causal_lm: bool | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DistillationTrainer needs the student as model=")
        if not isinstance(teacher_model, nn.Module):
            raise TypeError("DistillationTrainer needs teacher_model=, an nn.Module")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func cannot be combined with DistillationTrainer, "
                             "whose loss is the distillation loss")
        if trainer_kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported by DistillationTrainer; pass model=")
        self.divergence = divergence
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.causal_lm = _is_causal_lm(model) if causal_lm is None else bool(causal_lm)
        super().__init__(model=model, **trainer_kwargs)

        teacher_model.eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        self.teacher_model = teacher_model
        self._move_teacher(self._student_device())

        # The loss is normalised by `num_items_in_batch` whenever the batch has labels, so ask the
        # Trainer to count them (it only does for models that take loss kwargs) and not to divide
        # the loss by the accumulation steps again. Count as the loss does: shifted for a causal LM.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = self.causal_lm

    def _student_device(self) -> torch.device | None:
        for p in self.model.parameters():
            return p.device
        return None

    def _move_teacher(self, device: torch.device | None) -> None:
        if device is not None:
            self.teacher_model.to(device)
        self._teacher_device = device

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)  # no labels: the model's own loss would be wasted work
        student = _logits(outputs)
        if student.device != self._teacher_device:
            self._move_teacher(student.device)
        if self.teacher_model.training:
            self.teacher_model.eval()  # someone called .train() on it
        with torch.no_grad():
            teacher = _logits(self.teacher_model(**inputs)).to(student.dtype)
        if teacher.shape != student.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student.shape)} must have the same shape (same label set "
                             "or vocabulary)")

        weight = None
        if labels is not None:
            labels = labels.to(student.device)
            if self.causal_lm:  # shift the labels, not the logits (that would copy [B, T, V])
                labels = shift_left(labels, -100)
        elif student.dim() == 3 and inputs.get("attention_mask") is not None:
            weight = inputs["attention_mask"].to(device=student.device, dtype=torch.float32)

        n_classes = student.shape[-1]
        student = student.reshape(-1, n_classes)
        teacher = teacher.reshape(-1, n_classes)
        if labels is not None:
            labels = labels.reshape(-1)
        if weight is not None:
            weight = weight.reshape(-1)

        reduction = "mean"
        if labels is not None and num_items_in_batch is not None:
            reduction = "sum"
            weight = torch.ones(student.shape[0], dtype=torch.float32, device=student.device)
            weight.mul_(self._items_scale(num_items_in_batch, student.device))

        loss = distillation_loss(
            student, teacher, weight=weight, target=labels, divergence=self.divergence,
            temperature=self.temperature, alpha=self.alpha if labels is not None else 1.0,
            beta=self.beta, ignore_index=-100, reduction=reduction,
        )
        return (loss, outputs) if return_outputs else loss

    def _items_scale(self, num_items_in_batch: torch.Tensor | int, device: torch.device) -> Any:
        """``1 / num_items_in_batch``, times the device count the Trainer would multiply by."""
        n = num_items_in_batch
        if isinstance(n, torch.Tensor):
            n = n.detach().reshape(-1)[0].to(device=device, dtype=torch.float32)
        scale = 1.0
        if getattr(self.args, "average_tokens_across_devices", False):
            # The count is summed over the processes while their gradients are averaged.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp_size
            if self.args.n_gpu > 1:
                scale = self.args.n_gpu
        return scale / n

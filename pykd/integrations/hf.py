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

import itertools
from collections.abc import Iterator, Mapping
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

from pykd._batches import parse_batch, to_device
from pykd.config import DistillationConfig
from pykd.functional import distillation_loss
from pykd.rows import loss_rows

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
    ``attention_mask`` if there is one. The rows scored are those :class:`pykd.Distiller` scores
    on the same batch (:func:`pykd.rows.loss_rows`): a causal LM's position counts only where
    the next token exists and is not padding, and, with labels and an ``attention_mask``, where
    the position itself is in the mask.

    Sequence classification (``[B, C]`` logits, ``[B]`` labels) and token-level models
    (``[B, T, V]`` logits, ``[B, T]`` labels with ``-100`` padding) both work. For a causal LM
    the logits at position ``t`` are scored against the label at ``t + 1``
    (``logits[:, :-1]`` vs ``labels[:, 1:]``), as the models' own loss does.

    Gradient accumulation (and data parallelism) gives the gradient of one step on the whole
    batch, with or without labels: the Trainer's ``num_items_in_batch`` is replaced by the number
    of loss rows over all the micro-batches of an optimizer step (and, with
    ``average_tokens_across_devices``, over all processes), the rows described above. Each
    micro-batch's loss is its sum over its rows divided by that count, so every row weighs the
    same however the rows fall into micro-batches. The division is done by per-row
    weights inside the fused op (which computes the gradient in its forward pass) rather than by
    scaling the loss afterwards, which would cost another pass over the logits.

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
        soft_index: the label of rows without one (a transfer set beside the labelled data):
            their loss is the soft term alone and they count like labelled rows, as in
            :class:`pykd.Distiller` (a negative int other than -100); None: no such rows.
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
        soft_index: int | None = None,
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
        # The Distiller's rule for the label, checked alike.
        self.soft_index = DistillationConfig(soft_index=soft_index).soft_index
        super().__init__(model=model, **trainer_kwargs)

        teacher_model.eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        self.teacher_model = teacher_model
        self._move_teacher(self._student_device())

        # The loss is normalised by the count of get_batch_samples whatever the batch holds; saying
        # that the model takes loss kwargs stops the Trainer dividing it by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        # Whether an unlabelled batch's rows are tokens ([B, T, V] logits) or sequences: known
        # from the first logits seen, or from one teacher forward when counting comes first.
        self._token_logits: bool | None = True if self.causal_lm else None

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
        teacher = self._teacher_logits(inputs, student.device).to(student.dtype)
        if teacher.shape != student.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student.shape)} must have the same shape (same label set "
                             "or vocabulary)")
        self._token_logits = student.dim() == 3

        target, rows = self._loss_rows(inputs, labels)
        if num_items_in_batch is None:  # called on a lone batch: the mean over its rows
            count, scale = rows.sum(), 1
        else:
            count, scale = num_items_in_batch, self._processes_counted()
        count = torch.as_tensor(count, dtype=torch.float32, device=student.device)
        # A count of 0 means no row weighs anything: a zero loss, not 0 / 0.
        inverse = torch.where(count > 0, scale / count, 0.0)
        weight = rows.to(device=student.device, dtype=torch.float32).reshape(-1) * inverse
        if target is not None:
            target = target.to(student.device).reshape(-1)

        n_classes = student.shape[-1]
        loss = distillation_loss(
            student.reshape(-1, n_classes), teacher.reshape(-1, n_classes), weight=weight,
            target=target, divergence=self.divergence, temperature=self.temperature,
            alpha=self.alpha if target is not None else 1.0, beta=self.beta, ignore_index=-100,
            reduction="sum", soft_index=self.soft_index,
        )
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, *args: Any, **kwargs: Any
    ) -> tuple[list, torch.Tensor | None]:
        """The next ``num_batches`` micro-batches of the epoch and their count of loss rows.

        The Trainer's own count is of the labels other than ``-100`` and is None without labels,
        which would make the step the mean of the micro-batches' means. (The extra arguments,
        the device in recent releases, are not needed: the count goes to ``args.device``.)
        """
        batches = list(itertools.islice(epoch_iterator, num_batches))
        return batches, self._count_loss_rows(batches)

    def _get_num_items_in_batch(
        self, batch_samples: list, device: Any = None
    ) -> torch.Tensor | None:
        # Recent releases also count an evaluation batch here: it must be counted as it is scored.
        return self._count_loss_rows(batch_samples)

    def _count_loss_rows(self, batches: list) -> torch.Tensor | None:
        """The rows the loss of ``batches`` uses, summed over the processes if their gradients
        are averaged with ``average_tokens_across_devices``."""
        if not batches:
            return None
        device = self.args.device
        count = torch.zeros(1, dtype=torch.int64, device=device)
        for batch in batches:
            inputs = dict(batch)
            count += self._loss_rows(inputs, inputs.pop("labels", None))[1].sum().to(device)
        if self._processes_counted() > 1:
            count = self.accelerator.gather(count)
        return count.sum()

    def _processes_counted(self) -> int:
        """How many processes the count spans. Their gradients are averaged, so each process's
        share of the loss (its rows' sum over the count) is multiplied by this many. (One under
        DataParallel: its one process scores the whole batch, from the gathered logits.)"""
        if getattr(self.args, "average_tokens_across_devices", False):
            # Tensor-parallel replicas of a batch count it once each and are among the
            # processes, so the count and this factor both grow by their number.
            return self.accelerator.num_processes
        return 1

    def _loss_rows(
        self, inputs: Mapping[str, Any], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The target of each loss row (None without labels) and which rows count, both shaped
        like the logits without their last dimension: the rows of :func:`pykd.rows.loss_rows`,
        as the Distiller scores them."""
        batch = parse_batch(dict(inputs) if labels is None else {**inputs, "labels": labels})
        if labels is None and self._token_logits is None:
            # Counting before any loss: ask the teacher, once.
            device = self._student_device() or self.args.device
            self._token_logits = self._teacher_logits(inputs, device).dim() == 3
        return loss_rows(batch, token_logits=bool(self._token_logits), causal_lm=self.causal_lm,
                         ignore_index=-100)

    def _teacher_logits(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """The frozen teacher's logits on ``inputs`` (no labels), run on ``device``."""
        if device != self._teacher_device:
            self._move_teacher(device)
        if self.teacher_model.training:
            self.teacher_model.eval()  # someone called .train() on it
        with torch.no_grad():
            return _logits(self.teacher_model(**to_device(inputs, device)))

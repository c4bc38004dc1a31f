"""``pykd.Distiller``: teacher-to-student training on top of the fused distillation loss.

A :class:`pykd.loop.TrainingLoop` running a
:class:`pykd.teacher_student.TeacherStudentObjective`: the loop owns the steps, order,
checkpoints, callbacks, metrics and DDP; the objective what one step computes. See
``docs/guide.md`` for a tour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pykd.cache import TeacherCache
from pykd.config import DistillationConfig, TrainingConfig, flat_signature, sort_options
from pykd.loop import TrainingLoop
from pykd.objective import OptimizerLike, SchedulerLike
from pykd.onpolicy import OnPolicyObjective
from pykd.teacher_student import HiddenMatch, TeacherStudentObjective
from pykd.update import NonFiniteLossError

__all__ = ["Distiller", "HiddenMatch", "NonFiniteLossError", "OptimizerLike", "SchedulerLike"]


class Distiller(TrainingLoop):
    """Train a student to match one or more frozen teachers with the fused distillation loss.

    The objective of one optimizer step over the whole (accumulated, all-process) batch is::

        alpha * soft + (1 - alpha) * ce + hidden

    where ``soft`` is the ``divergence`` between teacher and student at temperature ``T`` and
    ``ce`` the student's cross entropy with the labels, both averaged over the valid rows
    (labels != ``ignore_index``; padding by attention mask without labels) weighted by the
    batch's ``sample_weight``; the adaptive weights of ``sample_weighting`` multiply the rows
    but do not enter the normaliser. Without labels the objective is ``soft + hidden``.

    Before each optimizer step the losses of its micro-batches and its gradient norm are read
    (in one sync with the device). A NaN or infinite loss, or gradient norm, raises
    :class:`NonFiniteLossError` naming the step, epoch and batch, with the gradients cleared
    and the weights, optimizer and scheduler states and ``global_step`` left as the last good
    step left them; under ``precision="fp16"`` a non-finite gradient with finite losses is the
    loss scale overflowing, and the step is skipped as ``GradScaler`` skips it instead. A step
    whose rows all have zero weight (every label ``ignore_index`` or zero sample weight, and no
    hidden-state rows) is not taken either: it could only apply weight decay and momentum.
    Skipped steps count no ``global_step`` and call no ``on_step_end``.

    The options are keywords, as below, or two configs: ``distillation``, a
    :class:`pykd.DistillationConfig` (``teacher_weights`` to ``inputs``), and ``training``,
    a :class:`pykd.TrainingConfig` (``optimizer`` to ``ddp_kwargs``); keywords are laid over the
    configs.

    Args:
        teacher: a teacher module, or a sequence of them for a mixture (``teacher_weights``).
            Teachers are put in eval mode, frozen and run under ``torch.no_grad()``. Or a
            :class:`pykd.TeacherCache` of one teacher's outputs, to train without the teacher
            (batches from :meth:`~pykd.TeacherCache.attach`).
        student: the model to train.
        teacher_weights: mixing weights ``c_k`` of several teachers (rescaled to sum 1;
            uniform by default). The student matches ``p = sum_k c_k softmax(t_k / T)``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"mse"`` or ``"cosine"``.
        temperature: ``T``, a number or a schedule of the global step (:mod:`pykd.schedules`).
        alpha: weight of the soft term against the label cross entropy; number or schedule,
            in [0, 1] (checked with or without labels). The constant 0 (``0`` or
            ``schedules.Constant(0)``) without ``hidden`` or ``sample_weighting`` trains on the
            labels alone: training steps of labelled batches run no teacher (nor read a
            cache), and their metrics leave out ``soft``, ``kl`` and ``agreement``;
            :meth:`evaluate` still runs the teacher and reports them.
        beta: JSD mixing weight.
        ignore_index: label of rows to ignore (padding).
        soft_index: the label of rows that have none (a transfer set's augmented copies beside
            the labelled examples, in the same batch): their loss is the soft term alone,
            whatever ``alpha`` is, and they count in the normaliser like labelled rows. A
            negative int other than ``ignore_index`` (e.g. -1); None: no such rows. Metrics:
            ``ce`` and ``accuracy`` are over the labelled rows only.
        rest: how a ``"topk+rest"`` cache's rest (the teacher's mass off its k entries) is
            spent: ``"bucket"`` (one class the student matches in total) or ``"target"``
            (on the row's label where the label is off the k; the bucket elsewhere and in
            batches without labels). See :func:`pykd.functional.distillation_loss_topk`.
        causal_lm: compare the logits at position ``t`` with the label at ``t + 1``.
        on_policy: a :class:`pykd.OnPolicy`: on a share ``lmbda`` of the steps the student
            samples continuations of the batch's prompts (causal LMs) or sources
            (encoder-decoders) and learns the teacher's distributions on them (GKD; use
            ``divergence="jsd"`` and ``beta``). Needs a live teacher and dict batches; see
            :mod:`pykd.onpolicy` and the guide.
        sample_weighting: adaptive per-row weights from the teacher: ``"confidence"``,
            ``"entropy"``, ``"correctness"`` or ``fn(teacher_logits, labels) -> weights``
            (see :func:`pykd.teachers.adaptive_weights`).
        incorrect_weight: weight of rows the teacher gets wrong under ``"correctness"``.
        hidden: intermediate hidden-state matching, see :class:`HiddenMatch`.
        fused_lm_head: compute the logits loss from the final hidden states and the weights of
            the two models' linear heads with
            :func:`pykd.functional.fused_linear_distillation_loss`, so that neither model's
            ``[N, V]`` logits are ever materialised (the heads' inputs are captured while the
            heads themselves are skipped, see :mod:`pykd.heads`). Each model must return its
            head's output unchanged as its logits. One teacher only; not with
            ``sample_weighting`` (which needs the teacher's logits).
        student_head, teacher_head: where the heads are for ``fused_lm_head``: a dotted
            submodule name (``"lm_head"``, ``"cls.predictions.decoder"``) or a function
            ``fn(model) -> nn.Linear``.
        lm_head_chunk_size: rows of logits computed at a time under ``fused_lm_head``.
        optimizer: an optimizer over the student's parameters (the projections of ``hidden``
            are added as a parameter group) or a factory ``fn(params) -> optimizer``; default
            ``AdamW(lr=lr)``.
        lr: learning rate of the default optimizer.
        scheduler: an LR scheduler or a factory ``fn(optimizer) -> scheduler``; stepped after
            every optimizer step.
        accumulation_steps: micro-batches per optimizer step; the loss and gradients equal those
            of one batch holding them all.
        max_grad_norm: clip the gradient norm of the student and projections to this (> 0).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the student runs under
            ``torch.autocast`` in that dtype; ``"fp16"`` adds a ``GradScaler`` whose scale is
            folded into the loss weights.
        device: the student's device (default: where its parameters are).
        teacher_device: the teachers' device (default: where their parameters are).
        teacher_dtype: cast the teachers to this dtype, e.g. ``torch.bfloat16``; by default
            each keeps its own. A teacher's floating inputs are cast to its parameters' dtype,
            its outputs to the student's dtype for the loss.
        inputs: which model gets which key of a dict batch: ``{"key": "teacher" | "student" |
            "both"}``; a key not named goes to both (``"labels"`` and ``"sample_weight"`` go to
            neither and cannot be named). E.g. ``{"shape_ids": "student"}`` for an input the
            teacher's ``forward`` does not take. Tuple and tensor batches have no keys: they
            are refused (``ValueError``) while ``inputs`` names any.
            :meth:`pykd.TeacherCache.build` gives its teacher every key.
        seed: seeds the shuffling of the training data, together with the epoch.
        checkpoint_path: a file to save checkpoints to (atomically) at every epoch end, after
            the callbacks.
        checkpoint_every: also save every this many optimizer steps.
        metrics_path: append a JSON line of metrics every ``log_every`` steps and per evaluation.
        log_every: steps between detailed metrics (loss parts, kl, agreement, samples/s).
        progress: show tqdm progress bars.
        callbacks: :class:`pykd.Callback` instances.
        ddp_kwargs: keyword arguments for ``DistributedDataParallel`` (under torchrun).

    Attributes:
        student, teachers, projections, optimizer, scheduler, scaler: the pieces above
            (``projections`` is a ``ModuleDict`` keyed by student layer, empty without
            ``hidden``; ``scaler`` is None unless ``precision="fp16"``).
        cache: the :class:`pykd.TeacherCache` given as the teacher (``teachers`` is then
            empty), or None.
        global_step: optimizer steps taken; the schedules are evaluated at it.
        epoch, batch_in_epoch: the epoch in progress and the batches of it already consumed.
        rank, world_size, device: this process's place under ``torch.distributed`` and the
            student's device.
        objective: the :class:`pykd.teacher_student.TeacherStudentObjective` that computes
            each step (its loss options: ``divergence``, ``temperature``, ``alpha``, ...;
            ``labels_only``: whether training steps of labelled batches skip the teacher); the
            rest is the :class:`pykd.TrainingLoop` this class extends.

    Example:
        >>> import torch, pykd
        >>> teacher, student = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        >>> data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
        >>> distiller = pykd.Distiller(teacher, student, temperature=2.0, alpha=0.5,
        ...                            lr=1e-2, progress=False)
        >>> distiller.fit(data, epochs=2)
        {}
        >>> sorted(distiller.evaluate(data))[:3]
        ['accuracy', 'agreement', 'ce']
    """

    objective: TeacherStudentObjective

    def __init__(self, teacher: nn.Module | Sequence[nn.Module] | TeacherCache,
                 student: nn.Module, *, distillation: DistillationConfig | None = None,
                 training: TrainingConfig | None = None, **options: Any) -> None:
        objective_options, loop_options = sort_options(
            "Distiller", options, DistillationConfig, TrainingConfig)
        on_policy = objective_options.get("on_policy", getattr(distillation, "on_policy", None))
        kind = TeacherStudentObjective if on_policy is None else OnPolicyObjective
        objective = kind(teacher, student, distillation, **objective_options)
        super().__init__(objective, training, **loop_options)

    # The objective's pieces, where users of the Distiller have always found them.

    @property
    def student(self) -> nn.Module:
        """The model being trained."""
        return self.objective.student

    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teachers (empty when training from a cache)."""
        return self.objective.teachers

    @property
    def teacher_weights(self) -> list[float]:
        """The teachers' mixing weights, summing to 1."""
        return self.objective.teacher_weights

    @property
    def cache(self) -> TeacherCache | None:
        """The :class:`pykd.TeacherCache` given as the teacher, or None."""
        return self.objective.cache

    @property
    def projections(self) -> nn.ModuleDict:
        """The hidden-state projections, keyed by student layer (empty without ``hidden``)."""
        return self.objective.projections

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the student and projections."""
        return self.optimizers[0]

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The LR scheduler, stepped after every optimizer step, or None."""
        return self.schedulers[0]


Distiller.__init__.__signature__ = flat_signature(  # type: ignore[attr-defined]
    Distiller.__init__, DistillationConfig, TrainingConfig)

"""``pykd.Distiller``: teacher-to-student training on top of the fused distillation loss.

Every loss term goes through :func:`pykd.distillation_loss` (or its fused LM-head form) with
``reduction="sum"`` and per-row weights that already hold the normaliser (and any loss scale), so
``loss.backward()`` reaches the op with an incoming gradient of exactly 1 and the op's gradient is
used without another pass. See ``docs/guide.md`` for a tour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler, Sampler
from tqdm.auto import tqdm

from pykd._batches import (
    Batch,
    Outputs,
    call_model,
    floating_dtype,
    loader_like,
    logits_and_hidden,
    parse_batch,
    rebuildable,
    shift_left,
    to_device,
    token_positions,
)
from pykd.cache import TeacherCache, TopKRows
from pykd.callbacks import Callback
from pykd.checkpoint import PathLike, load_checked, rng_state, save_atomic, set_rng_state
from pykd.functional import (
    check_loss_options,
    distillation_loss,
    distillation_loss_topk,
    fused_linear_distillation_loss,
)
from pykd.heads import HeadCapture, HeadLike, LinearRows, resolve_head
from pykd.schedules import Constant, Cosine, Linear, ScheduleLike, Warmup, as_schedule
from pykd.teachers import (
    WEIGHTINGS,
    WeightFn,
    adaptive_weights,
    combine_teachers,
    normalize_teacher_weights,
)

OptimizerLike = Union[torch.optim.Optimizer, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]
SchedulerLike = Union[
    torch.optim.lr_scheduler.LRScheduler,
    Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CHECKPOINT_KEYS = (
    "format", "student", "projections", "optimizer", "scheduler", "scaler", "global_step", "epoch",
    "batch_in_epoch", "rng", "world_size",
)
# Sums gathered for the metrics; the numerators are divided by their denominators in _summary.
_STATS = (
    "soft", "ce", "hidden", "kl", "agreement", "accuracy",
    "d_logit", "d_hidden", "rows", "labelled",
)


class NonFiniteLossError(FloatingPointError):
    """The loss of a micro-batch, or the gradient of a step, was NaN or infinite.

    Raised before the optimizer step, with the gradients cleared: the weights, the optimizer and
    scheduler states and ``global_step`` are those of the last good step.
    """


@dataclasses.dataclass
class HiddenMatch:
    """Match intermediate hidden states (TinyBERT style) alongside the logits.

    ``layers`` maps a student layer to a teacher layer, both indexing the models'
    ``hidden_states`` (for Hugging Face models index 0 is the embeddings). Student states pass
    through a learnable ``nn.Linear`` when the widths differ; the widths are read from
    ``model.config.hidden_size`` unless given. The term is ``weight * sum over mapped layers``
    of the per-row ``divergence`` (``"mse"``: ``sum_h (t - s)^2``; ``"cosine"``: ``1 - cos``)
    averaged over the non-padding tokens (attention mask) of the batch.
    """

    layers: Mapping[int, int]
    weight: float = 1.0
    divergence: str = "mse"
    student_width: int | None = None
    teacher_width: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("HiddenMatch.layers must map at least one student layer")
        if self.divergence not in ("mse", "cosine"):
            raise ValueError(
                f"hidden divergence must be 'mse' or 'cosine', got {self.divergence!r}"
            )
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"hidden weight must be finite and >= 0, got {self.weight!r}")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Whether the logits and the matched hidden states have a token dimension."""

    token_logits: bool
    token_hidden: bool


@dataclasses.dataclass
class _Prepared:
    """A micro-batch on the student's device with its rows worked out before any forward."""

    where: str  # which batch it is, for error messages
    batch: Batch
    target: torch.Tensor | None
    valid: torch.Tensor  # (*) bool, the rows of the logits that count
    logit_w: torch.Tensor  # (*) float32: valid * sample weight, summed into the normaliser
    hidden_w: torch.Tensor | None  # the same for the rows of the hidden states


# Rows of logits as the loss takes them: dense logits, or a linear head's input and weights
# (fused_lm_head); the teacher's may also be its cached top-k.
_Logits = Union[torch.Tensor, LinearRows]
_TeacherLogits = Union[torch.Tensor, LinearRows, TopKRows]


@dataclasses.dataclass
class _Rows:
    """What the loss sees for one micro-batch."""

    student: _Logits
    teacher: _TeacherLogits
    target: torch.Tensor | None
    valid: torch.Tensor
    weight: torch.Tensor  # logit_w times the adaptive weights
    hidden: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (student, teacher, weight)


def _require_hidden(hidden: Sequence[torch.Tensor] | None, who: str) -> Sequence[torch.Tensor]:
    if hidden is None:
        raise ValueError(
            f"hidden-state matching needs the {who} to return hidden_states (a dict key or an "
            "attribute next to logits)"
        )
    return hidden


def _row_weights(rows: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    weights = rows.float()
    if sample_weight is not None:
        weights = weights * sample_weight.float().view(-1, *([1] * (rows.dim() - 1)))
    return weights


def _check_sample_weight(weight: torch.Tensor | None, where: str) -> None:
    # The raw weights: after normalising, all -1 would pass (-1 / -3 > 0), and mixed signs can
    # too where the op does not check (CUDA), giving a NaN loss that blames the logits.
    if weight is None:
        return
    if weight.is_complex():
        raise TypeError(f"sample_weight must be real, got {weight.dtype} ({where})")
    bad = ~(torch.isfinite(weight) & (weight >= 0))
    if bool(bad.any()):
        raise ValueError(f"sample_weight must be finite and >= 0, got "
                         f"{weight[bad][0].item()!r} ({where})")


def _check_labels(labels: torch.Tensor, where: str) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype} ({where}); "
                        "converting would truncate them")


def _check_rows(prep: _Prepared, logits: torch.Tensor) -> None:
    """The batch's rows (its labels, or its token positions without them) are the logits'."""
    lead = tuple(logits.shape[:-1])
    if tuple(prep.valid.shape) == lead:
        return
    given = ("labels" if prep.target is not None
             else "the token positions (attention_mask or input_ids)")
    raise ValueError(f"{given} shaped {tuple(prep.valid.shape)} do not match the logits shaped "
                     f"{tuple(logits.shape)} ({prep.where}): one per row of logits, shaped "
                     f"{lead}")


def _check_alpha(value: Any, name: str, source: str = "") -> None:
    if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}{source}")


def _schedule_bounds(schedule: Callable[[int], float]) -> list[float]:
    """Values between which one of pykd's schedules stays; none are known of other callables."""
    kind = type(schedule)
    if kind is Constant:
        return [schedule.value]
    if kind in (Linear, Cosine):
        return [schedule.start, schedule.end]
    if kind is Warmup:
        return [schedule.start, *_schedule_bounds(schedule.then)]
    return []


def _check_alpha_schedule(schedule: Callable[[int], float], name: str = "alpha") -> None:
    """Refuse an ``alpha`` schedule known to leave [0, 1]; other callables are checked as they
    are evaluated (see ``Distiller._alpha_at``)."""
    source = "" if type(schedule) is Constant else f" from {schedule!r}"
    for value in _schedule_bounds(schedule):
        _check_alpha(value, name, source)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _logit_loss(student: _Logits, teacher: _TeacherLogits, *, weight: torch.Tensor,
                target: torch.Tensor | None, divergence: str, temperature: float, alpha: float,
                beta: float, ignore_index: int, chunk_size: int) -> torch.Tensor:
    """The op's loss with ``reduction="sum"``, in the form that fits the rows."""
    options = {"weight": weight, "target": target, "divergence": divergence,
               "temperature": temperature, "alpha": alpha, "beta": beta,
               "ignore_index": ignore_index, "reduction": "sum"}
    if isinstance(teacher, TopKRows):
        return distillation_loss_topk(student, teacher.index, teacher.logits, **options)
    if isinstance(student, LinearRows):
        return fused_linear_distillation_loss(
            student.hidden, student.weight, teacher.hidden, teacher.weight,
            student_bias=student.bias, teacher_bias=teacher.bias, chunk_size=chunk_size,
            **options,
        )
    return distillation_loss(student, teacher, **options)


def _argmax(logits: _TeacherLogits, chunk_size: int) -> torch.Tensor:
    if isinstance(logits, LinearRows):
        return logits.argmax(chunk_size)
    if isinstance(logits, TopKRows):
        return logits.argmax()
    return logits.argmax(dim=-1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


class _OrderSampler(Sampler[int]):
    """The sample order the Distiller controls, so a resumed run sees the same batches.

    A permutation seeded from (seed, epoch) (or the identity), padded by wrapping around to a
    multiple of the world size when every process must run the same number of steps, strided
    across processes like ``DistributedSampler`` and minus the samples already consumed.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world: int,
                 pad: bool, skip: int) -> None:
        if shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if pad and n % world:
            total = math.ceil(n / world) * world
            order = (order * math.ceil(total / n))[:total]
        self.indices = order[rank::world][skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_width(model: nn.Module, given: int | None, who: str) -> int:
    width = given if given is not None else getattr(getattr(model, "config", None),
                                                    "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(
            f"HiddenMatch needs the {who}'s hidden width: pass {who}_width=... "
            "(or use a model whose config has hidden_size)"
        )
    return width


def _run(model: nn.Module, inputs: Any, extra: Mapping[str, Any], head: nn.Linear | None,
         who: str) -> Outputs:
    """The model's logits and hidden states; with a fused ``head``, the head's input instead of
    the logits (which are never computed)."""
    if head is None:
        return logits_and_hidden(call_model(model, inputs, extra))
    with HeadCapture(head, who) as capture:
        logits, hidden = logits_and_hidden(call_model(model, inputs, extra))
    return capture.hidden(logits), hidden


class _StudentStack(nn.Module):
    """The student and its hidden-state projections as one module, so that DDP syncs both."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict, layers: list[int],
                 extra: Mapping[str, Any], head: nn.Linear | None) -> None:
        super().__init__()
        self.student, self.projections = student, projections
        self.layers, self.extra = layers, dict(extra)
        self._head = (head,)  # in a tuple: the student already registers it as a submodule

    def forward(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, hidden = _run(self.student, inputs, self.extra, self._head[0], "student")
        if not self.layers:
            return logits, []
        hidden = _require_hidden(hidden, "student")
        return logits, [self.projections[str(layer)](hidden[layer]) for layer in self.layers]


class Distiller:
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
            in [0, 1] (checked with or without labels).
        beta: JSD mixing weight.
        ignore_index: label of rows to ignore (padding).
        causal_lm: compare the logits at position ``t`` with the label at ``t + 1``.
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

    _format = "pykd.distiller/2"  # the kind of checkpoint, checked when one is loaded

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module] | TeacherCache,
        student: nn.Module,
        *,
        teacher_weights: Sequence[float] | None = None,
        divergence: str = "kl",
        temperature: ScheduleLike = 1.0,
        alpha: ScheduleLike = 1.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        causal_lm: bool = False,
        sample_weighting: str | WeightFn | None = None,
        incorrect_weight: float = 0.1,
        hidden: HiddenMatch | None = None,
        fused_lm_head: bool = False,
        student_head: HeadLike = "lm_head",
        teacher_head: HeadLike = "lm_head",
        lm_head_chunk_size: int = 1024,
        optimizer: OptimizerLike | None = None,
        lr: float = 1e-4,
        scheduler: SchedulerLike | None = None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        precision: str = "fp32",
        device: torch.device | str | None = None,
        teacher_device: torch.device | str | None = None,
        teacher_dtype: torch.dtype | None = None,
        seed: int = 0,
        checkpoint_path: PathLike | None = None,
        checkpoint_every: int | None = None,
        metrics_path: PathLike | None = None,
        log_every: int = 50,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
        ddp_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        check_loss_options(divergence, 1.0, 1.0, beta, "sum", has_target=True)
        if sample_weighting is not None and not callable(sample_weighting) \
                and sample_weighting not in WEIGHTINGS:
            raise ValueError(
                f"sample_weighting must be one of {WEIGHTINGS}, a function or None, "
                f"got {sample_weighting!r}"
            )
        if incorrect_weight < 0:
            raise ValueError(f"incorrect_weight must be >= 0, got {incorrect_weight!r}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps!r}")
        # A negative norm would flip the sign of the update, 0 would zero it (NaN: both).
        if max_grad_norm is not None and not (isinstance(max_grad_norm, numbers.Real)
                                              and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}")
        if metrics_path is not None and log_every < 1:
            raise ValueError("metrics_path needs log_every >= 1")
        if not isinstance(lm_head_chunk_size, int) or lm_head_chunk_size < 1:
            raise ValueError(f"lm_head_chunk_size must be a positive int, got "
                             f"{lm_head_chunk_size!r}")
        if fused_lm_head and sample_weighting is not None:
            raise ValueError("sample_weighting needs the teacher's logits, which fused_lm_head "
                             "never computes; use one or the other")
        self.divergence, self.beta, self.ignore_index = divergence, float(beta), int(ignore_index)
        self.temperature, self.alpha = as_schedule(temperature), as_schedule(alpha)
        # Checked here as well as in the op, which never sees alpha without labels.
        _check_alpha_schedule(self.alpha)
        self.causal_lm, self.hidden = causal_lm, hidden
        self.sample_weighting, self.incorrect_weight = sample_weighting, float(incorrect_weight)
        self.fused_lm_head, self.lm_head_chunk_size = bool(fused_lm_head), lm_head_chunk_size
        self.accumulation_steps, self.max_grad_norm = int(accumulation_steps), max_grad_norm
        self.seed, self.log_every, self.progress = int(seed), int(log_every), progress
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.metrics_path = None if metrics_path is None else Path(metrics_path)
        self.callbacks = list(callbacks)

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

        self.student = student
        self.device = torch.device(device) if device is not None else _param_device(student)
        student.to(self.device)
        self.teacher_dtype = teacher_dtype
        # Asked of the models only when hidden states are matched and their forward takes it.
        self._hidden_kwarg = {"output_hidden_states": True} if hidden is not None else {}
        self._layout: _Layout | None = None
        self._init_teachers(teacher, teacher_weights, teacher_device, teacher_head)
        self._init_student(ddp_kwargs, student_head)
        self._init_optimizer(optimizer, lr, scheduler)
        self._amp_dtype = _PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._clock = time.perf_counter()
        self._samples_since_log = 0

    def _init_teachers(self, teacher: nn.Module | Sequence[nn.Module] | TeacherCache,
                       weights: Sequence[float] | None, device: torch.device | str | None,
                       head: HeadLike) -> None:
        self.cache = teacher if isinstance(teacher, TeacherCache) else None
        self._teacher_devices, self._teacher_extra = [], []
        self._teacher_dtypes: list[torch.dtype | None] = []  # what their floating inputs become
        self._teacher_head: nn.Linear | None = None
        if self.cache is not None:
            self._check_cache(weights)
            self.teachers, self.teacher_weights = [], [1.0]
            return
        single = isinstance(teacher, nn.Module) and not isinstance(teacher, nn.ModuleList)
        self.teachers = [teacher] if single else list(teacher)
        if not self.teachers:
            raise ValueError("give at least one teacher")
        if any(isinstance(model, TeacherCache) for model in self.teachers):
            raise TypeError("a TeacherCache is given on its own as the teacher, not in a list")
        self.teacher_weights = normalize_teacher_weights(weights, len(self.teachers))
        if self.fused_lm_head:
            if len(self.teachers) > 1:
                raise ValueError("fused_lm_head works with one teacher: a mixture of teachers "
                                 "needs their logits")
            self._teacher_head = resolve_head(self.teachers[0], head, "teacher")
        placement = {k: v for k, v in (("device", device), ("dtype", self.teacher_dtype))
                     if v is not None}
        for model in self.teachers:
            model.eval().requires_grad_(False)
            if placement:
                model.to(**placement)
            self._teacher_devices.append(_param_device(model, default=self.device))
            self._teacher_dtypes.append(floating_dtype(model))
            self._teacher_extra.append(
                self._hidden_kwarg if _accepts(model, "output_hidden_states") else {}
            )

    def _check_cache(self, weights: Sequence[float] | None) -> None:
        """What training from :attr:`cache` rules out, refused before anything runs."""
        cache = self.cache
        cache.require_complete()
        refused = {
            "teacher_weights": weights is not None,
            "hidden (the cache holds no hidden states)": self.hidden is not None,
            "fused_lm_head (the cache holds logits)": self.fused_lm_head,
        }
        if cache.top_k is not None:
            refused["sample_weighting (a top-k cache lacks the full distribution)"] = \
                self.sample_weighting is not None
            refused[f"divergence={self.divergence!r} (a top-k cache takes 'kl' or 'jsd')"] = \
                self.divergence not in ("kl", "jsd")
        bad = [name for name, hit in refused.items() if hit]
        if bad:
            raise ValueError(f"training from a TeacherCache does not support {', '.join(bad)}")
        if self.causal_lm and not cache.token_level:
            raise ValueError("causal_lm=True needs token-level logits; the cache holds one row "
                             "per sample")
        self._layout = _Layout(token_logits=cache.token_level, token_hidden=False)

    def _init_student(self, ddp_kwargs: Mapping[str, Any] | None, head: HeadLike) -> None:
        """Projections, the student stack and, under torch.distributed, its DDP wrapper."""
        self.projections = nn.ModuleDict()
        layers: list[int] = []
        if self.hidden is not None:
            s_width = _model_width(self.student, self.hidden.student_width, "student")
            t_width = _model_width(self.teachers[0], self.hidden.teacher_width, "teacher")
            layers = sorted(self.hidden.layers)
            for layer in layers:
                self.projections[str(layer)] = (
                    nn.Linear(s_width, t_width) if s_width != t_width else nn.Identity()
                )
            self.projections.to(self.device)
        self._teacher_layers = [self.hidden.layers[layer] for layer in layers]
        self._student_head = (resolve_head(self.student, head, "student")
                              if self.fused_lm_head else None)
        self._stack = _StudentStack(
            self.student, self.projections, layers,
            self._hidden_kwarg if _accepts(self.student, "output_hidden_states") else {},
            self._student_head,
        )
        self._model = self._wrap_ddp(self._stack, ddp_kwargs)

    def _wrap_ddp(self, module: nn.Module, ddp_kwargs: Mapping[str, Any] | None) -> nn.Module:
        if self.world_size == 1:
            return module
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **dict(ddp_kwargs or {}))

    def _init_optimizer(self, optimizer: OptimizerLike | None, lr: float,
                        scheduler: SchedulerLike | None) -> None:
        self.optimizer = _make_optimizer(optimizer, self._stack, lr, extra=self.projections)
        self.scheduler = _make_scheduler(scheduler, self.optimizer)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def _schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler | None]:
        return [self.scheduler]

    def _alpha_at(self, step: int) -> Any:
        """``alpha`` (a tuple of them in subclasses) at ``step``: a schedule that is any callable
        can only be checked as it is evaluated."""
        value = self.alpha(step)
        many = isinstance(value, tuple)
        for k, a in enumerate(value if many else (value,)):
            _check_alpha(a, f"alpha[{k}]" if many else "alpha",
                         f" from its schedule at step {step}")
        return value

    # ----------------------------------------------------------------------------- public API

    def fit(
        self,
        train_loader: Iterable[Any],
        epochs: int = 1,
        eval_loader: Iterable[Any] | None = None,
        *,
        resume_from: PathLike | None = None,
    ) -> dict[str, float]:
        """Train for ``epochs`` epochs in all (counting those of a resumed checkpoint).

        A ``DataLoader`` over a map-style dataset with a sequential or shuffling sampler is
        re-created with the Distiller's own order (shuffled from ``(seed, epoch)`` when the
        loader shuffles), sharded across processes under ``torch.distributed``; any other
        iterable of batches is used as it is (already sharded, deterministic to resume).

        Args:
            train_loader: the training batches (see :class:`Distiller` for batch formats).
            epochs: the total number of epochs.
            eval_loader: batches to :meth:`evaluate` after every epoch.
            resume_from: a checkpoint to continue from (weights, optimizer, position, RNG).

        Returns:
            The metrics of the last evaluation, or ``{}`` without ``eval_loader``.

        Raises:
            ValueError: ``train_loader`` yields no batch in an epoch (an iterator used up by an
                earlier epoch, say), or ``eval_loader`` none at all.
            NonFiniteLossError: a loss or gradient is NaN or infinite (see :class:`Distiller`).
        """
        if not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if 0 < epochs <= self.epoch:
            # Calling fit once per epoch in a loop is a common habit that would train only once.
            warnings.warn(
                f"fit(epochs={epochs}) trains nothing: {self.epoch} epoch(s) are already done and "
                "epochs counts all of them in total (so that a resumed run stops where the "
                f"uninterrupted one would); pass epochs={self.epoch + epochs} to train {epochs} "
                "more", UserWarning, stacklevel=2,
            )
        self._emit("on_fit_start")
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)
        self._clock, self._samples_since_log = time.perf_counter(), 0
        metrics: dict[str, float] = {}
        while self.epoch < epochs:
            epoch = self.epoch
            self._emit("on_epoch_start", epoch)
            self._train_epoch(train_loader, epoch, epochs)
            metrics = {}
            if eval_loader is not None:
                metrics = self._evaluate(eval_loader, "eval_loader")
                self._write_metrics({"split": "eval", "step": self.global_step,
                                     "epoch": epoch, **metrics})
                self._emit("on_eval_end", metrics)
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self._emit("on_epoch_end", epoch, metrics)
            # Saved after the evaluation and the callbacks, so that the RNG states it holds are
            # past whatever they drew and a resumed run draws the same numbers.
            if self.checkpoint_path is not None:
                self.save_checkpoint(self.checkpoint_path)
        self._emit("on_fit_end")
        return metrics

    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Metrics of the student on ``loader``, at the current temperature and alpha.

        Returns a dict with ``loss`` (the training objective), ``soft`` (the divergence term),
        ``kl`` (``T^2 KL(teacher || student)`` per valid row, unweighted), ``agreement`` (share
        of rows where the student's argmax equals the teacher's) and, where there are labels,
        ``ce`` and ``accuracy``; ``hidden`` with hidden-state matching. Under
        ``torch.distributed`` each process evaluates its shard and the sums are all-reduced, so
        every process must call it.

        ``accuracy`` is left out where no row is labelled (every label ``ignore_index``), and
        ``kl`` and ``agreement`` where no row counts at all: a share of no rows is undefined.

        Raises:
            ValueError: ``loader`` yields no batch.
        """
        return self._evaluate(loader, "loader")

    @torch.no_grad()
    def _evaluate(self, loader: Iterable[Any], name: str) -> dict[str, float]:
        was_training = self._stack.training
        self._stack.eval()
        temperature, alpha = self.temperature(self.global_step), self._alpha_at(self.global_step)
        sums = self._zero_stats()
        labelled, count = False, 0
        batches, total = self._epoch_batches(loader, epoch=0, skip=0, train=False)
        bar = tqdm(batches, total=total, desc="eval", unit="batch", leave=False,
                   disable=not self.progress or self.rank != 0)
        try:
            for i, raw in enumerate(bar):
                prep = self._prepare(raw, f"evaluation batch {i}")
                labelled |= prep.target is not None
                with self._autocast():
                    rows = self._forward(prep, self._stack, temperature)
                sums += self._stats(rows, prep, temperature)
                count += 1
        finally:
            bar.close()
            self._stack.train(was_training)
        # The batch count travels with the sums: one process may have none where others do.
        totals = self._all_reduce(torch.cat([sums, sums.new_tensor([count])]))
        if totals[-1].item() == 0:
            raise ValueError(f"{name} yielded no batches to evaluate")
        return self._summary(totals[:-1], alpha, labelled)

    def save_checkpoint(self, path: PathLike) -> None:
        """Save everything needed to resume (on process 0; every process must call this)."""
        rngs = [rng_state()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        save_atomic({
            "format": self._format,
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict(),
            "optimizer": [optimizer.state_dict() for optimizer in self._optimizers()],
            "scheduler": [None if scheduler is None else scheduler.state_dict()
                          for scheduler in self._schedulers()],
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rngs,
            "world_size": self.world_size,
        }, path)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore a :meth:`save_checkpoint` file, including this process's RNG states.

        The file is read as data (``weights_only=True``); a file of another kind, or one saved
        with another number of processes, raises ``ValueError``.
        """
        state = load_checked(path, _CHECKPOINT_KEYS)
        if state["format"] != self._format:
            raise ValueError(f"{path}: checkpoint format {state['format']!r}, expected "
                             f"{self._format!r}")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was saved by {state['world_size']} processes, this run has "
                f"{self.world_size}: the data shards and position would not match"
            )
        optimizers, schedulers = self._optimizers(), self._schedulers()
        for name, saved, target in (("optimizers", state["optimizer"], optimizers),
                                    ("schedulers", state["scheduler"], schedulers),
                                    ("scaler", [state["scaler"]], [self.scaler])):
            if [x is None for x in saved] != [x is None for x in target]:
                raise ValueError(f"{path}: the checkpoint and this Distiller disagree on {name}")
        self.student.load_state_dict(state["student"])
        self.projections.load_state_dict(state["projections"])
        for optimizer, saved in zip(optimizers, state["optimizer"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["scheduler"]):
            if scheduler is not None:
                scheduler.load_state_dict(saved)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        set_rng_state(state["rng"][self.rank])

    # ------------------------------------------------------------------------------ training

    def _train_epoch(self, loader: Iterable[Any], epoch: int, epochs: int) -> None:
        self._stack.train()
        start = self.batch_in_epoch
        batches, total = self._epoch_batches(loader, epoch, start, train=True)
        if total is not None:
            total += start
        with tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}",
                  unit="batch", disable=not self.progress or self.rank != 0) as bar:
            while group := list(itertools.islice(batches, self.accumulation_steps)):
                detailed = self.log_every > 0 and (self.global_step + 1) % self.log_every == 0
                metrics = self._step(group, epoch, detailed)
                self.batch_in_epoch += len(group)
                bar.update(len(group))
                if metrics is None:  # no step taken (see _step): nothing to report or save
                    continue
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                if detailed:
                    self._write_metrics({"split": "train", **metrics})
                self._emit("on_step_end", self.global_step, metrics)
                # After the callbacks, for the same reason as at the epoch end (see fit).
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 \
                        and self.checkpoint_path is not None:
                    self.save_checkpoint(self.checkpoint_path)
        # Resuming at the very end of an epoch legitimately leaves no batch; a fresh epoch must.
        if start == 0 and self.batch_in_epoch == 0:
            raise ValueError(
                f"train_loader yielded no batches in epoch {epoch}"
                + ("" if epoch == 0 else "; an iterator or generator is used up after one pass: "
                   "give a list or a DataLoader")
            )

    def _step(self, group: list[Any], epoch: int, detailed: bool) -> dict[str, float] | None:
        """One optimizer step over the micro-batches of ``group``; ``detailed`` adds metrics.

        Returns None where no step is taken (see :meth:`_go_ahead`).
        """
        step, first = self.global_step, self.batch_in_epoch
        temperature, alpha = self.temperature(step), self._alpha_at(step)
        prepared = [self._prepare(raw, f"batch {first + j} of epoch {epoch}")
                    for j, raw in enumerate(group)]
        # The normaliser of the whole step (all micro-batches, all processes) is known before any
        # forward, so each micro-batch's rows carry their final weight and nothing is rescaled.
        d_logit = torch.stack([p.logit_w.sum() for p in prepared]).sum()
        d_hidden = (torch.stack([p.hidden_w.sum() for p in prepared]).sum() if self.hidden
                    else torch.zeros((), device=self.device))
        denominators = self._all_reduce(torch.stack([d_logit, d_hidden]).double())
        loss_scale = (self.scaler.scale(torch.ones((), device=self.device))
                      if self.scaler is not None else torch.ones((), device=self.device))
        inv = torch.where(denominators > 0, self.world_size / denominators,
                          torch.zeros_like(denominators)).float() * loss_scale
        sums = self._zero_stats()
        losses = []
        for j, prep in enumerate(prepared):
            last = j == len(prepared) - 1
            no_sync = self._model.no_sync if self.world_size > 1 and not last else \
                contextlib.nullcontext
            with no_sync():
                with self._autocast():
                    rows = self._forward(prep, self._model, temperature)
                loss = self._loss(rows, inv[0], inv[1], temperature, alpha)
                if detailed:
                    sums += self._stats(rows, prep, temperature)
                losses.append(loss.detach())
                loss.backward()
        norms = self._grad_norms()
        losses = (self._all_reduce(torch.stack(losses).double())
                  / (self.world_size * loss_scale.double()))
        # One sync per step: the per-micro-batch losses summed over processes (unscaled), the
        # step's normalisers and each optimizer's gradient norm (equal on every process after
        # DDP's all-reduce), read together.
        values = torch.cat([losses, denominators,
                            torch.stack([n.to(self.device, torch.float64) for n in norms])]
                           ).tolist()
        n = len(prepared)
        step_losses = values[:n]
        if not self._go_ahead(step_losses, values[n:n + 2], values[n + 2:], loss_scale, epoch,
                              first):
            return None
        self._optimizer_step(norms)
        lr = self._optimizers()[0].param_groups[0]["lr"]
        for scheduler in self._schedulers():
            if scheduler is not None:
                scheduler.step()
        self.global_step += 1
        self._samples_since_log += sum(p.batch.size for p in prepared) * self.world_size
        metrics = {"step": self.global_step, "epoch": epoch, "loss": sum(step_losses), "lr": lr,
                   **self._schedule_metrics(temperature, alpha)}
        if detailed:
            has_labels = any(p.target is not None for p in prepared)
            # The summary's loss is rebuilt from its parts; keep the exact one.
            metrics = {**self._summary(self._all_reduce(sums), alpha, has_labels), **metrics}
            now = time.perf_counter()
            metrics["samples_per_s"] = self._samples_since_log / max(now - self._clock, 1e-9)
            self._clock, self._samples_since_log = now, 0
        return metrics

    def _schedule_metrics(self, temperature: float, alpha: Any) -> dict[str, float]:
        return {"temperature": temperature, "alpha": alpha}

    def _go_ahead(self, losses: list[float], denominators: list[float], norms: list[float],
                  loss_scale: torch.Tensor, epoch: int, first: int) -> bool:
        """Whether the step over the micro-batches from ``first`` on is taken.

        A non-finite loss raises; so does a non-finite gradient norm, except under fp16 where it
        is the loss scale overflowing and the step is skipped as ``GradScaler`` skips it (the
        scale backs off). A step whose rows all have zero weight is skipped too: it could only
        apply weight decay and momentum. A step not taken leaves no gradient, and the weights,
        optimizer and scheduler states and ``global_step`` as they were.
        """
        step = self.global_step

        def where(batches: str) -> str:
            return f"at step {step + 1} (epoch {epoch}, {batches} of the epoch)"

        last_good = "the weights and optimizer state are left as they were before this step"
        for j, value in enumerate(losses):
            if not math.isfinite(value):
                self._discard_step(loss_scale)
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) {where(f'batch {first + j}')}; {last_good}. "
                    "Check the inputs and logits of that batch, the learning rate, or use "
                    "precision='bf16' instead of 'fp16'"
                )
        if not any(denominators):
            self._discard_step(loss_scale)
            return False
        bad = [k for k, norm in enumerate(norms) if not math.isfinite(norm)]
        if not bad:
            return True
        if self.scaler is not None:
            self._discard_step(None)
            return False
        self._discard_step(loss_scale)
        batches = (f"batch {first}" if len(losses) == 1
                   else f"batches {first}-{first + len(losses) - 1}")
        owner = f" of optimizer {bad[0]}" if len(norms) > 1 else ""
        raise NonFiniteLossError(
            f"non-finite gradient (norm {norms[bad[0]]}){owner} with a finite loss "
            f"{where(batches)}; {last_good}. Check the backward of the model (custom "
            "autograd functions, hooks) and the learning rate"
        )

    def _discard_step(self, loss_scale: torch.Tensor | None) -> None:
        """Clear the gradients of a step not taken; under fp16, close the scaler's step with
        ``loss_scale`` (the scale as it was) or, given None, backed off as after an overflow."""
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update(loss_scale)

    def _grad_norms(self) -> list[torch.Tensor]:
        """Each optimizer's gradient norm (unscaled under fp16), left on its device: one fused
        pass that the finiteness check and the clipping share."""
        norms = []
        for optimizer in self._optimizers():
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.get_total_norm(
                [p.grad for p in _params(optimizer) if p.grad is not None]))
        return norms

    def _optimizer_step(self, norms: list[torch.Tensor]) -> None:
        """Clip each optimizer's parameters (by its ``norms``), step them all, and clear the
        gradients."""
        optimizers = self._optimizers()
        if self.max_grad_norm is not None:
            for optimizer, norm in zip(optimizers, norms):
                torch.nn.utils.clip_grads_with_norm_(_params(optimizer), self.max_grad_norm, norm)
        for optimizer in optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    # ---------------------------------------------------------------------- batches and rows

    def _epoch_batches(self, data: Iterable[Any], epoch: int, skip: int,
                       train: bool) -> tuple[Iterator[Any], int | None]:
        """This process's batches of ``epoch`` after the first ``skip``, and how many remain."""
        if rebuildable(data):
            sampler = _OrderSampler(
                len(data.dataset), shuffle=train and isinstance(data.sampler, RandomSampler),
                seed=self.seed, epoch=epoch, rank=self.rank, world=self.world_size,
                pad=train, skip=skip * data.batch_size,
            )
            loader = loader_like(
                data, data.dataset, data.collate_fn, sampler=sampler,
                # Its own generator: otherwise creating the iterator draws from the global RNG,
                # which a resumed run would replay at a different point.
                generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch) + self.rank),
            )
            return iter(loader), len(loader)
        set_epoch = getattr(getattr(data, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            batches = iter(data)
        total = len(data) - skip if hasattr(data, "__len__") else None
        return itertools.islice(batches, skip, None), total

    def _prepare(self, raw: Any, where: str) -> _Prepared:
        # Where the loader made them (the host, as a rule), reading the weights costs no sync.
        _check_sample_weight(parse_batch(raw).sample_weight, where)
        batch = parse_batch(to_device(raw, self.device))
        layout = self._layout or self._probe(batch)
        if batch.labels is not None:
            _check_labels(batch.labels, where)
            target = batch.labels.long()
            if self.causal_lm:
                target = shift_left(target, self.ignore_index)
            valid = target != self.ignore_index
            if self.causal_lm and batch.attention_mask is not None:
                if batch.attention_mask.shape != target.shape:
                    raise ValueError(
                        f"labels shaped {tuple(target.shape)} do not match the attention_mask "
                        f"shaped {tuple(batch.attention_mask.shape)} ({where})"
                    )
                # Row t is the logits at position t, which must be in the mask too: with left
                # padding the last pad's shifted label is the first real token, yet the pad's
                # logits are no output of the teacher on real input (a cache holds none for it).
                valid = valid & (batch.attention_mask != 0)
        else:
            target = None
            if not layout.token_logits:
                valid = torch.ones(batch.size, dtype=torch.bool, device=self.device)
            else:
                valid = token_positions(batch)
                if self.causal_lm:
                    valid = valid & shift_left(valid, False)
        hidden_w = None
        if self.hidden is not None:
            rows = (token_positions(batch) if layout.token_hidden
                    else torch.ones(batch.size, dtype=torch.bool, device=self.device))
            hidden_w = _row_weights(rows, batch.sample_weight)
        return _Prepared(where, batch, target, valid, _row_weights(valid, batch.sample_weight),
                         hidden_w)

    def _probe(self, batch: Batch) -> _Layout:
        """Learn from a model's output whether rows are tokens (once per Distiller)."""
        logits, hidden = self._probe_outputs(batch.inputs)
        token_hidden = False
        if self.hidden is not None:
            token_hidden = _require_hidden(hidden, "teacher")[self._teacher_layers[0]].dim() >= 3
        layout = _Layout(token_logits=logits.dim() >= 3, token_hidden=token_hidden)
        if self.causal_lm and not layout.token_logits:
            raise ValueError(
                f"causal_lm=True needs [batch, tokens, vocab] logits, got {tuple(logits.shape)}"
            )
        self._layout = layout
        return layout

    def _probe_outputs(self, inputs: Any) -> Outputs:
        return self._run_teacher(0, inputs)

    def _run_teacher(self, k: int, inputs: Any) -> Outputs:
        with torch.no_grad():
            return _run(self.teachers[k],
                        to_device(inputs, self._teacher_devices[k], self._teacher_dtypes[k]),
                        self._teacher_extra[k], self._teacher_head, "teacher")

    def _forward(self, prep: _Prepared, model: nn.Module, temperature: float) -> _Rows:
        outputs = [self._run_teacher(k, prep.batch.inputs) for k in range(len(self.teachers))]
        student, projected = model(prep.batch.inputs)
        _check_rows(prep, student)  # a head's input has the logits' rows too
        teacher: _TeacherLogits
        if self._student_head is not None:
            # The heads' inputs stand for the logits, which the op computes chunk by chunk; the
            # heads' weights take the dtype of the student's hidden states, as under autocast.
            student = LinearRows(student, self._student_head.weight, self._student_head.bias)
            student = student.to(student.hidden.device, student.hidden.dtype)
            teacher = LinearRows(outputs[0][0], self._teacher_head.weight,
                                 self._teacher_head.bias).to(student.hidden.device,
                                                             student.hidden.dtype)
        elif self.cache is not None:
            teacher = plain = self._cached_teacher(prep.batch, student)
        else:
            teacher_logits = [logits.to(student.device) for logits, _ in outputs]
            if len(teacher_logits) == 1:
                plain = teacher_logits[0]
                teacher = plain.to(student.dtype)
            else:
                teacher = combine_teachers(teacher_logits, self.teacher_weights,
                                           temperature).to(student.dtype)
                plain = (combine_teachers(teacher_logits, self.teacher_weights, 1.0)
                         if self.sample_weighting is not None else teacher)
        weight = prep.logit_w
        if self.sample_weighting is not None:
            weight = weight * adaptive_weights(plain, prep.target, self.sample_weighting,
                                               incorrect_weight=self.incorrect_weight)
        hidden = []
        if self.hidden is not None:
            teacher_hidden = _require_hidden(outputs[0][1], "teacher")
            row_weight = prep.hidden_w * self.hidden.weight
            for s_h, t_layer in zip(projected, self._teacher_layers):
                t_h = teacher_hidden[t_layer].to(device=s_h.device, dtype=s_h.dtype)
                hidden.append((s_h, t_h, row_weight))
        return _Rows(student, teacher, prep.target, prep.valid, weight, hidden)

    def _cached_teacher(self, batch: Batch, student: torch.Tensor) -> torch.Tensor | TopKRows:
        """The cached teacher rows of ``batch``, laid out like the student's logits."""
        if batch.index is None:
            raise ValueError("training from a TeacherCache needs batches that carry their "
                             "samples' indices: use cache.attach(loader)")
        positions = token_positions(batch) if self.cache.token_level else None
        if student.shape[-1] != self.cache.vocab_size:
            # A top-k cache's indices would fit in a larger student's logits without complaint.
            raise ValueError(
                f"the TeacherCache holds a teacher with {self.cache.vocab_size} classes, but the "
                f"student gives {student.shape[-1]} logits per row: the two must be the same"
            )
        values, index = self.cache.lookup(batch.index, positions)
        if index is None:
            return values.to(student.device, student.dtype)
        # The top-k op reads the cached float16 logits as they are.
        return TopKRows(index.to(student.device), values.to(student.device))

    # --------------------------------------------------------------------------------- losses

    def _loss(self, rows: _Rows, inv_logit: torch.Tensor, inv_hidden: torch.Tensor,
              temperature: float, alpha: float) -> torch.Tensor:
        """This micro-batch's share of the step's loss: weights already hold the normaliser."""
        loss = _logit_loss(
            rows.student, rows.teacher, weight=rows.weight * inv_logit, target=rows.target,
            divergence=self.divergence, temperature=temperature,
            alpha=alpha if rows.target is not None else 1.0, beta=self.beta,
            ignore_index=self.ignore_index, chunk_size=self.lm_head_chunk_size,
        )
        for s_h, t_h, weight in rows.hidden:
            loss = loss + distillation_loss(s_h, t_h, weight=weight * inv_hidden,
                                            divergence=self.hidden.divergence, reduction="sum")
        return loss

    @torch.no_grad()
    def _stats(self, rows: _Rows, prep: _Prepared, temperature: float) -> torch.Tensor:
        """The sums behind the metrics of one micro-batch, in the order of ``_STATS``."""
        # Under no_grad the op computes no gradient, so the student needs no detaching.
        def term(weight: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
            return _logit_loss(
                rows.student, rows.teacher, weight=weight, target=rows.target,
                divergence=divergence, temperature=temperature, alpha=alpha, beta=self.beta,
                ignore_index=self.ignore_index, chunk_size=self.lm_head_chunk_size,
            )

        zero = torch.zeros((), device=self.device)
        soft = term(rows.weight, self.divergence, 1.0)
        kl = term(rows.valid.float(), "kl", 1.0)
        prediction = _argmax(rows.student, self.lm_head_chunk_size)
        teacher_prediction = _argmax(rows.teacher, self.lm_head_chunk_size)
        agreement = ((prediction == teacher_prediction) & rows.valid).sum()
        ce = correct = labelled = zero
        if rows.target is not None:
            ce = term(rows.weight, "kl", 0.0)
            correct = ((prediction == rows.target) & rows.valid).sum()
            labelled = rows.valid.sum()
        hidden = sum((distillation_loss(s_h.detach(), t_h, weight=w, reduction="sum",
                                        divergence=self.hidden.divergence)
                      for s_h, t_h, w in rows.hidden), zero)
        d_hidden = prep.hidden_w.sum() if prep.hidden_w is not None else zero
        values = (soft, ce, hidden, kl, agreement, correct, prep.logit_w.sum(), d_hidden,
                  rows.valid.sum(), labelled)
        return torch.stack([v.to(self.device, torch.float64) for v in values])

    def _zero_stats(self) -> torch.Tensor:
        return torch.zeros(len(_STATS), dtype=torch.float64, device=self.device)

    def _summary(self, sums: torch.Tensor, alpha: float, has_labels: bool) -> dict[str, float]:
        s = dict(zip(_STATS, sums.tolist()))

        def ratio(num: str, den: str) -> float:
            return s[num] / s[den] if s[den] > 0 else 0.0

        out = {"soft": ratio("soft", "d_logit")}
        # A share of no rows is undefined: left out rather than reported as 0. (The loss terms
        # of no rows are 0, as in training, where they add nothing to a step.)
        if s["rows"] > 0:
            out["kl"], out["agreement"] = ratio("kl", "rows"), ratio("agreement", "rows")
        mix = alpha if has_labels else 1.0
        out["loss"] = mix * out["soft"]
        if self.hidden is not None:
            out["hidden"] = ratio("hidden", "d_hidden")
            out["loss"] += out["hidden"]
        if has_labels:
            out["ce"] = ratio("ce", "d_logit")
            if s["labelled"] > 0:
                out["accuracy"] = ratio("accuracy", "labelled")
            out["loss"] += (1.0 - mix) * out["ce"]
        return dict(sorted(out.items()))

    # -------------------------------------------------------------------------------- helpers

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics_path is None or self.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _make_optimizer(optimizer: OptimizerLike | None, module: nn.Module, lr: float,
                    extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``module``'s trainable parameters: ``optimizer`` itself (the
    parameters of ``extra`` it lacks added as a group), ``optimizer(params)`` or AdamW."""
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in (extra.parameters() if extra is not None else ())
               if id(p) not in known]
    if missing:
        optimizer.add_param_group({"params": missing})
    return optimizer


def _make_scheduler(scheduler: SchedulerLike | None, optimizer: torch.optim.Optimizer
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return scheduler
    return scheduler(optimizer)


def _param_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    param = next(model.parameters(), None)
    if param is not None:
        return param.device
    return default if default is not None else torch.device("cpu")

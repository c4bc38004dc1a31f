"""``pykd.Distiller``: teacher-to-student training on top of the fused distillation loss.

Every loss term goes through :func:`pykd.distillation_loss` with ``reduction="sum"`` and per-row
weights that already hold the normaliser (and any loss scale), so ``loss.backward()`` reaches the
op with an incoming gradient of exactly 1 and the op's gradient is used without another pass.
See ``docs/guide.md`` for a tour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from tqdm.auto import tqdm

from pykd.callbacks import Callback
from pykd.checkpoint import PathLike, load_checked, rng_state, save_atomic, set_rng_state
from pykd.functional import check_loss_options, distillation_loss
from pykd.schedules import ScheduleLike, as_schedule
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

_Outputs = tuple[torch.Tensor, Union[Sequence[torch.Tensor], None]]  # logits, hidden states

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_FORMAT = "pykd.distiller/1"
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
    """The loss of a micro-batch was NaN or infinite."""


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
class _Batch:
    inputs: Any
    labels: torch.Tensor | None
    sample_weight: torch.Tensor | None
    attention_mask: torch.Tensor | None
    positions_like: torch.Tensor | None  # an input shaped [B, T, ...] where there is no mask
    size: int


@dataclasses.dataclass
class _Prepared:
    """A micro-batch on the student's device with its rows worked out before any forward."""

    batch: _Batch
    target: torch.Tensor | None
    valid: torch.Tensor  # (*) bool, the rows of the logits that count
    logit_w: torch.Tensor  # (*) float32: valid * sample weight, summed into the normaliser
    hidden_w: torch.Tensor | None  # the same for the rows of the hidden states


@dataclasses.dataclass
class _Rows:
    """What the loss sees for one micro-batch."""

    student: torch.Tensor
    teacher: torch.Tensor
    target: torch.Tensor | None
    valid: torch.Tensor
    weight: torch.Tensor  # logit_w times the adaptive weights
    hidden: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (student, teacher, weight)


def _logits_and_hidden(output: Any) -> _Outputs:
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, Mapping):
        logits, hidden = output.get("logits"), output.get("hidden_states")
    else:
        logits, hidden = getattr(output, "logits", None), getattr(output, "hidden_states", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "a model must return a logits tensor, a dict with 'logits' or an object with .logits, "
            f"got {type(output).__name__}"
        )
    return logits, hidden


def _require_hidden(hidden: Sequence[torch.Tensor] | None, who: str) -> Sequence[torch.Tensor]:
    if hidden is None:
        raise ValueError(
            f"hidden-state matching needs the {who} to return hidden_states (a dict key or an "
            "attribute next to logits)"
        )
    return hidden


def _call(model: nn.Module, inputs: Any, extra: Mapping[str, Any]) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **extra)
    return model(inputs, **extra)


def _to(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and obj.is_floating_point() else None
        return obj.to(device=device, dtype=dtype, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, float_dtype) for v in obj)
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, Iterable) and not isinstance(obj, (str, bytes)):
        for value in values:
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _parse_batch(batch: Any) -> _Batch:
    """Split a batch into model inputs, labels and sample weights.

    Dict batches are Hugging Face style: model keyword inputs plus optional ``"labels"`` and
    ``"sample_weight"``. Tuples are ``(inputs,)``, ``(inputs, labels)`` or
    ``(inputs, labels, sample_weight)``. A bare tensor is the input.
    """
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels, weight = inputs.pop("labels", None), inputs.pop("sample_weight", None)
    elif isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                "a tuple batch is (inputs, labels, sample_weight) or a prefix of it, "
                f"got {len(batch)} items"
            )
        inputs, labels, weight = (*batch, None, None)[:3]
    elif isinstance(batch, torch.Tensor):
        inputs, labels, weight = batch, None, None
    else:
        raise TypeError(f"batches must be dicts, tuples or tensors, got {type(batch).__name__}")
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        positions_like = inputs["input_ids"]
    else:
        positions_like = _first_tensor(inputs)
    sized = next((t for t in (labels, positions_like, mask) if t is not None), None)
    if sized is None:
        raise ValueError("a batch must hold at least one tensor")
    if weight is not None and tuple(weight.shape) != (sized.shape[0],):
        raise ValueError(
            f"sample_weight must be shaped ({sized.shape[0]},), got {tuple(weight.shape)}"
        )
    return _Batch(inputs, labels, weight, mask, positions_like, sized.shape[0])


def _shift_left(x: torch.Tensor, fill: Any) -> torch.Tensor:
    """Row t takes x[:, t + 1]; the last row gets ``fill`` (causal LM next-token alignment)."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def _row_weights(rows: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    weights = rows.float()
    if sample_weight is not None:
        weights = weights * sample_weight.float().view(-1, *([1] * (rows.dim() - 1)))
    return weights


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


def _rebuildable(data: Any) -> bool:
    """A DataLoader the Distiller can re-create with its own sampler."""
    return (
        isinstance(data, DataLoader)
        and data.batch_size is not None
        and not isinstance(data.dataset, IterableDataset)
        and (type(data.sampler) is SequentialSampler
             or (type(data.sampler) is RandomSampler and not data.sampler.replacement))
    )


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


class _StudentStack(nn.Module):
    """The student and its hidden-state projections as one module, so that DDP syncs both."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict, layers: list[int],
                 extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.student, self.projections = student, projections
        self.layers, self.extra = layers, dict(extra)

    def forward(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, hidden = _logits_and_hidden(_call(self.student, inputs, self.extra))
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

    Args:
        teacher: a teacher module, or a sequence of them for a mixture (``teacher_weights``).
            Teachers are put in eval mode, frozen and run under ``torch.no_grad()``.
        student: the model to train.
        teacher_weights: mixing weights ``c_k`` of several teachers (rescaled to sum 1;
            uniform by default). The student matches ``p = sum_k c_k softmax(t_k / T)``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"mse"`` or ``"cosine"``.
        temperature: ``T``, a number or a schedule of the global step (:mod:`pykd.schedules`).
        alpha: weight of the soft term against the label cross entropy; number or schedule.
        beta: JSD mixing weight.
        ignore_index: label of rows to ignore (padding).
        causal_lm: compare the logits at position ``t`` with the label at ``t + 1``.
        sample_weighting: adaptive per-row weights from the teacher: ``"confidence"``,
            ``"entropy"``, ``"correctness"`` or ``fn(teacher_logits, labels) -> weights``
            (see :func:`pykd.teachers.adaptive_weights`).
        incorrect_weight: weight of rows the teacher gets wrong under ``"correctness"``.
        hidden: intermediate hidden-state matching, see :class:`HiddenMatch`.
        optimizer: an optimizer over the student's parameters (the projections of ``hidden``
            are added as a parameter group) or a factory ``fn(params) -> optimizer``; default
            ``AdamW(lr=lr)``.
        lr: learning rate of the default optimizer.
        scheduler: an LR scheduler or a factory ``fn(optimizer) -> scheduler``; stepped after
            every optimizer step.
        accumulation_steps: micro-batches per optimizer step; the loss and gradients equal those
            of one batch holding them all.
        max_grad_norm: clip the gradient norm of the student and projections to this.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the student runs under
            ``torch.autocast`` in that dtype; ``"fp16"`` adds a ``GradScaler`` whose scale is
            folded into the loss weights.
        device: the student's device (default: where its parameters are).
        teacher_device: the teachers' device (default: where their parameters are).
        teacher_dtype: cast the teachers (and their floating inputs) to this dtype, e.g.
            ``torch.bfloat16``; their outputs are cast to the student's dtype for the loss.
        seed: seeds the shuffling of the training data, together with the epoch.
        checkpoint_path: a file to save checkpoints to (atomically) at every epoch end.
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

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module],
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
        single = isinstance(teacher, nn.Module) and not isinstance(teacher, nn.ModuleList)
        self.teachers = [teacher] if single else list(teacher)
        if not self.teachers:
            raise ValueError("give at least one teacher")
        self.teacher_weights = normalize_teacher_weights(teacher_weights, len(self.teachers))
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
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}")
        if metrics_path is not None and log_every < 1:
            raise ValueError("metrics_path needs log_every >= 1")
        self.divergence, self.beta, self.ignore_index = divergence, float(beta), int(ignore_index)
        self.temperature, self.alpha = as_schedule(temperature), as_schedule(alpha)
        self.causal_lm, self.hidden = causal_lm, hidden
        self.sample_weighting, self.incorrect_weight = sample_weighting, float(incorrect_weight)
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
        self._init_teachers(teacher_device)
        self._init_student(ddp_kwargs)
        self._init_optimizer(optimizer, lr, scheduler)
        self._amp_dtype = _PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._layout: _Layout | None = None
        self._clock = time.perf_counter()
        self._samples_since_log = 0

    def _init_teachers(self, device: torch.device | str | None) -> None:
        self._teacher_devices, self._teacher_extra = [], []
        placement = {k: v for k, v in (("device", device), ("dtype", self.teacher_dtype))
                     if v is not None}
        for model in self.teachers:
            model.eval().requires_grad_(False)
            if placement:
                model.to(**placement)
            self._teacher_devices.append(_param_device(model, default=self.device))
            self._teacher_extra.append(
                self._hidden_kwarg if _accepts(model, "output_hidden_states") else {}
            )

    def _init_student(self, ddp_kwargs: Mapping[str, Any] | None) -> None:
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
        self._stack = _StudentStack(
            self.student, self.projections, layers,
            self._hidden_kwarg if _accepts(self.student, "output_hidden_states") else {},
        )
        self._model: nn.Module = self._stack
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self._model = DistributedDataParallel(self._stack, device_ids=device_ids,
                                                  **dict(ddp_kwargs or {}))

    def _init_optimizer(self, optimizer: OptimizerLike | None, lr: float,
                        scheduler: SchedulerLike | None) -> None:
        params = [p for p in self._stack.parameters() if p.requires_grad]
        if optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=lr)
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [p for p in self.projections.parameters() if id(p) not in known]
            if missing:
                self.optimizer.add_param_group({"params": missing})
        else:
            self.optimizer = optimizer(params)
        if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            self.scheduler = scheduler
        else:
            self.scheduler = scheduler(self.optimizer)

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
        """
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._emit("on_fit_start")
        self.optimizer.zero_grad(set_to_none=True)
        self._clock, self._samples_since_log = time.perf_counter(), 0
        metrics: dict[str, float] = {}
        while self.epoch < epochs:
            epoch = self.epoch
            self._emit("on_epoch_start", epoch)
            self._train_epoch(train_loader, epoch, epochs)
            metrics = {}
            if eval_loader is not None:
                metrics = self.evaluate(eval_loader)
                self._write_metrics({"split": "eval", "step": self.global_step,
                                     "epoch": epoch, **metrics})
                self._emit("on_eval_end", metrics)
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            # Saved after the evaluation so that a resumed run replays whatever it consumed.
            if self.checkpoint_path is not None:
                self.save_checkpoint(self.checkpoint_path)
            self._emit("on_epoch_end", epoch, metrics)
        self._emit("on_fit_end")
        return metrics

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Metrics of the student on ``loader``, at the current temperature and alpha.

        Returns a dict with ``loss`` (the training objective), ``soft`` (the divergence term),
        ``kl`` (``T^2 KL(teacher || student)`` per valid row, unweighted), ``agreement`` (share
        of rows where the student's argmax equals the teacher's) and, where there are labels,
        ``ce`` and ``accuracy``; ``hidden`` with hidden-state matching. Under
        ``torch.distributed`` each process evaluates its shard and the sums are all-reduced, so
        every process must call it.
        """
        was_training = self.student.training
        self._stack.eval()
        temperature = self.temperature(self.global_step)
        sums = torch.zeros(len(_STATS), dtype=torch.float64, device=self.device)
        labelled = False
        batches, total = self._epoch_batches(loader, epoch=0, skip=0, train=False)
        bar = tqdm(batches, total=total, desc="eval", unit="batch", leave=False,
                   disable=not self.progress or self.rank != 0)
        try:
            for raw in bar:
                prep = self._prepare(raw)
                labelled |= prep.target is not None
                with self._autocast():
                    rows = self._forward(prep, self._stack, temperature)
                sums += self._stats(rows, prep, temperature)
        finally:
            bar.close()
            self._stack.train(was_training)
        return self._summary(self._all_reduce(sums), self.alpha(self.global_step), labelled)

    def save_checkpoint(self, path: PathLike) -> None:
        """Save everything needed to resume (on process 0; every process must call this)."""
        rngs = [rng_state()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        save_atomic({
            "format": _FORMAT,
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
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
        if state["format"] != _FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {state['format']!r}")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was saved by {state['world_size']} processes, this run has "
                f"{self.world_size}: the data shards and position would not match"
            )
        for name, target in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if (state[name] is None) != (target is None):
                raise ValueError(f"{path}: the checkpoint and this Distiller disagree on {name}")
        self.student.load_state_dict(state["student"])
        self.projections.load_state_dict(state["projections"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        set_rng_state(state["rng"][self.rank])

    # ------------------------------------------------------------------------------ training

    def _train_epoch(self, loader: Iterable[Any], epoch: int, epochs: int) -> None:
        self._stack.train()
        batches, total = self._epoch_batches(loader, epoch, self.batch_in_epoch, train=True)
        if total is not None:
            total += self.batch_in_epoch
        with tqdm(total=total, initial=self.batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                  unit="batch", disable=not self.progress or self.rank != 0) as bar:
            while group := list(itertools.islice(batches, self.accumulation_steps)):
                detailed = self.log_every > 0 and (self.global_step + 1) % self.log_every == 0
                metrics = self._step(group, epoch, detailed)
                self.batch_in_epoch += len(group)
                bar.update(len(group))
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 \
                        and self.checkpoint_path is not None:
                    self.save_checkpoint(self.checkpoint_path)
                if detailed:
                    self._write_metrics({"split": "train", **metrics})
                self._emit("on_step_end", self.global_step, metrics)

    def _step(self, group: list[Any], epoch: int, detailed: bool) -> dict[str, float]:
        """One optimizer step over the micro-batches of ``group``; ``detailed`` adds metrics."""
        step = self.global_step
        temperature, alpha = self.temperature(step), self.alpha(step)
        prepared = [self._prepare(raw) for raw in group]
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
        sums = torch.zeros(len(_STATS), dtype=torch.float64, device=self.device)
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
        # One sync per step: the per-micro-batch losses summed over processes, unscaled.
        values = (self._all_reduce(torch.stack(losses).double())
                  / (self.world_size * loss_scale.double())).tolist()
        for j, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite loss ({value}) at step {step + 1} (epoch {epoch}, batch "
                    f"{self.batch_in_epoch + j} of the epoch); check the inputs and logits of "
                    "that batch, the learning rate, or use precision='bf16' instead of 'fp16'"
                )
        self._optimizer_step()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        self._samples_since_log += sum(p.batch.size for p in prepared) * self.world_size
        metrics = {"step": self.global_step, "epoch": epoch, "loss": sum(values), "lr": lr,
                   "temperature": temperature, "alpha": alpha}
        if detailed:
            has_labels = any(p.target is not None for p in prepared)
            # The summary's loss is rebuilt from its parts; keep the exact one.
            metrics = {**self._summary(self._all_reduce(sums), alpha, has_labels), **metrics}
            now = time.perf_counter()
            metrics["samples_per_s"] = self._samples_since_log / max(now - self._clock, 1e-9)
            self._clock, self._samples_since_log = now, 0
        return metrics

    def _optimizer_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None and self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------- batches and rows

    def _epoch_batches(self, data: Iterable[Any], epoch: int, skip: int,
                       train: bool) -> tuple[Iterator[Any], int | None]:
        """This process's batches of ``epoch`` after the first ``skip``, and how many remain."""
        if _rebuildable(data):
            sampler = _OrderSampler(
                len(data.dataset), shuffle=train and isinstance(data.sampler, RandomSampler),
                seed=self.seed, epoch=epoch, rank=self.rank, world=self.world_size,
                pad=train, skip=skip * data.batch_size,
            )
            extra = {"prefetch_factor": data.prefetch_factor} if data.num_workers else {}
            loader = DataLoader(
                data.dataset, batch_size=data.batch_size, sampler=sampler,
                collate_fn=data.collate_fn, drop_last=data.drop_last,
                num_workers=data.num_workers, pin_memory=data.pin_memory, timeout=data.timeout,
                worker_init_fn=data.worker_init_fn,
                multiprocessing_context=data.multiprocessing_context,
                # Its own generator: otherwise creating the iterator draws from the global RNG,
                # which a resumed run would replay at a different point.
                generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch) + self.rank),
                **extra,
            )
            return iter(loader), len(loader)
        set_epoch = getattr(getattr(data, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            batches = iter(data)
        total = len(data) - skip if hasattr(data, "__len__") else None
        return itertools.islice(batches, skip, None), total

    def _prepare(self, raw: Any) -> _Prepared:
        batch = _parse_batch(_to(raw, self.device))
        layout = self._layout or self._probe(batch)
        if batch.labels is not None:
            target = batch.labels.long()
            if self.causal_lm:
                target = _shift_left(target, self.ignore_index)
            valid = target != self.ignore_index
        else:
            target = None
            if not layout.token_logits:
                valid = torch.ones(batch.size, dtype=torch.bool, device=self.device)
            else:
                valid = self._positions(batch)
                if self.causal_lm:
                    valid = valid & _shift_left(valid, False)
        hidden_w = None
        if self.hidden is not None:
            rows = (self._positions(batch) if layout.token_hidden
                    else torch.ones(batch.size, dtype=torch.bool, device=self.device))
            hidden_w = _row_weights(rows, batch.sample_weight)
        return _Prepared(batch, target, valid, _row_weights(valid, batch.sample_weight), hidden_w)

    def _positions(self, batch: _Batch) -> torch.Tensor:
        """[B, T] bool: the token positions that are not padding."""
        if batch.attention_mask is not None:
            return batch.attention_mask != 0
        if batch.positions_like is not None and batch.positions_like.dim() >= 2:
            return torch.ones(batch.positions_like.shape[:2], dtype=torch.bool, device=self.device)
        raise ValueError(
            "token-level outputs without labels need an 'attention_mask' or 'input_ids' "
            "in the batch to tell which positions count"
        )

    def _probe(self, batch: _Batch) -> _Layout:
        """Learn from the first teacher's output whether rows are tokens (once per Distiller)."""
        logits, hidden = self._run_teacher(0, batch.inputs)
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

    def _run_teacher(self, k: int, inputs: Any) -> _Outputs:
        with torch.no_grad():
            out = _call(self.teachers[k], _to(inputs, self._teacher_devices[k], self.teacher_dtype),
                        self._teacher_extra[k])
        return _logits_and_hidden(out)

    def _forward(self, prep: _Prepared, model: nn.Module, temperature: float) -> _Rows:
        outputs = [self._run_teacher(k, prep.batch.inputs) for k in range(len(self.teachers))]
        student, projected = model(prep.batch.inputs)
        teacher_logits = [logits.to(student.device) for logits, _ in outputs]
        if len(teacher_logits) == 1:
            teacher = plain = teacher_logits[0]
        else:
            teacher = combine_teachers(teacher_logits, self.teacher_weights, temperature)
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
        return _Rows(student, teacher.to(student.dtype), prep.target, prep.valid, weight, hidden)

    # --------------------------------------------------------------------------------- losses

    def _loss(self, rows: _Rows, inv_logit: torch.Tensor, inv_hidden: torch.Tensor,
              temperature: float, alpha: float) -> torch.Tensor:
        """This micro-batch's share of the step's loss: weights already hold the normaliser."""
        loss = distillation_loss(
            rows.student, rows.teacher, weight=rows.weight * inv_logit, target=rows.target,
            divergence=self.divergence, temperature=temperature,
            alpha=alpha if rows.target is not None else 1.0, beta=self.beta,
            ignore_index=self.ignore_index, reduction="sum",
        )
        for s_h, t_h, weight in rows.hidden:
            loss = loss + distillation_loss(s_h, t_h, weight=weight * inv_hidden,
                                            divergence=self.hidden.divergence, reduction="sum")
        return loss

    @torch.no_grad()
    def _stats(self, rows: _Rows, prep: _Prepared, temperature: float) -> torch.Tensor:
        """The sums behind the metrics of one micro-batch, in the order of ``_STATS``."""
        student = rows.student.detach()

        def term(weight: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
            return distillation_loss(
                student, rows.teacher, weight=weight, target=rows.target, divergence=divergence,
                temperature=temperature, alpha=alpha, beta=self.beta,
                ignore_index=self.ignore_index, reduction="sum",
            )

        zero = torch.zeros((), device=self.device)
        soft = term(rows.weight, self.divergence, 1.0)
        kl = term(rows.valid.float(), "kl", 1.0)
        prediction = student.argmax(dim=-1)
        agreement = ((prediction == rows.teacher.argmax(dim=-1)) & rows.valid).sum()
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

    def _summary(self, sums: torch.Tensor, alpha: float, has_labels: bool) -> dict[str, float]:
        s = dict(zip(_STATS, sums.tolist()))

        def ratio(num: str, den: str) -> float:
            return s[num] / s[den] if s[den] > 0 else 0.0

        out = {"soft": ratio("soft", "d_logit"), "kl": ratio("kl", "rows"),
               "agreement": ratio("agreement", "rows")}
        mix = alpha if has_labels else 1.0
        out["loss"] = mix * out["soft"]
        if self.hidden is not None:
            out["hidden"] = ratio("hidden", "d_hidden")
            out["loss"] += out["hidden"]
        if has_labels:
            out["ce"] = ratio("ce", "d_logit")
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


def _param_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    param = next(model.parameters(), None)
    if param is not None:
        return param.device
    return default if default is not None else torch.device("cpu")

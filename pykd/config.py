"""The options of training, apart from the code that uses them.

:class:`TrainingConfig` holds what the loop (:class:`pykd.TrainingLoop`) needs,
:class:`DistillationConfig` what the teacher/student objective needs; each checks its values
when it is made. :class:`pykd.Distiller` takes them as flat keywords too
(``Distiller(t, s, lr=1e-3, temperature=2.0)``) and sorts them into the two configs, so every
option is declared once, here. A config can be kept, compared and reused::

    >>> import pykd
    >>> train = pykd.TrainingConfig(lr=3e-4, accumulation_steps=2, progress=False)
    >>> train.replace(seed=1).seed, train.seed
    (1, 0)
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pykd._batches import ROUTES
from pykd.callbacks import Callback
from pykd.checkpoint import PathLike
from pykd.functional import REST_MODES
from pykd.heads import HeadLike
from pykd.objective import OptimizerLike, SchedulerLike, check_alpha_schedule
from pykd.schedules import ScheduleLike, as_schedule
from pykd.teachers import WEIGHTINGS, WeightFn

if TYPE_CHECKING:
    from pykd.onpolicy import OnPolicy
    from pykd.teacher_student import HiddenMatch

__all__ = ["DistillationConfig", "TrainingConfig"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_C = TypeVar("_C", bound="_Config")


class _Config:
    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(field.name for field in dataclasses.fields(cls))


@dataclasses.dataclass
class TrainingConfig(_Config):
    """The training loop's options; :class:`pykd.Distiller` documents each of them.

    ``optimizer``, ``lr`` and ``scheduler`` are passed to the objective's
    :meth:`~pykd.objective.Objective.make_optimizers`, which says what it accepts (one of each
    for a :class:`pykd.Distiller`, one per model or a factory for a
    :class:`pykd.MutualDistiller`).
    """

    optimizer: OptimizerLike | Any | None = None
    lr: float | Any = 1e-4
    scheduler: SchedulerLike | Any | None = None
    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    precision: str = "fp32"
    seed: int = 0
    checkpoint_path: PathLike | None = None
    checkpoint_every: int | None = None
    metrics_path: PathLike | None = None
    log_every: int = 50
    progress: bool = True
    callbacks: Sequence[Callback] = ()
    ddp_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.accumulation_steps, numbers.Integral) or self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got "
                             f"{self.accumulation_steps!r}")
        # A negative norm would flip the sign of the update, 0 would zero it (NaN: both).
        norm = self.max_grad_norm
        if norm is not None and not (isinstance(norm, numbers.Real) and norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if self.metrics_path is not None and self.log_every < 1:
            raise ValueError("metrics_path needs log_every >= 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got "
                             f"{self.checkpoint_every!r}")


@dataclasses.dataclass
class DistillationConfig(_Config):
    """The teacher/student objective's options; :class:`pykd.Distiller` documents each of
    them. ``alpha`` and ``temperature`` may be numbers or schedules of the global step."""

    teacher_weights: Sequence[float] | None = None
    divergence: str = "kl"
    temperature: ScheduleLike = 1.0
    alpha: ScheduleLike = 1.0
    beta: float = 0.5
    ignore_index: int = -100
    causal_lm: bool = False
    sample_weighting: str | WeightFn | None = None
    incorrect_weight: float = 0.1
    hidden: HiddenMatch | None = None
    fused_lm_head: bool = False
    student_head: HeadLike = "lm_head"
    teacher_head: HeadLike = "lm_head"
    lm_head_chunk_size: int = 1024
    device: torch.device | str | None = None
    teacher_device: torch.device | str | None = None
    teacher_dtype: torch.dtype | None = None
    inputs: Mapping[str, str] | None = None  # batch key -> "teacher", "student" or "both"
    soft_index: int | None = None  # the label of rows without one (transfer data): soft only
    rest: str = "bucket"  # how a topk+rest cache's rest is spent: "bucket" or "target"
    on_policy: OnPolicy | None = None  # GKD: steps on the student's own samples

    def __post_init__(self) -> None:
        self._check_inputs()
        weighting = self.sample_weighting
        if weighting is not None and not callable(weighting) and weighting not in WEIGHTINGS:
            raise ValueError(f"sample_weighting must be one of {WEIGHTINGS}, a function or "
                             f"None, got {weighting!r}")
        if self.incorrect_weight < 0:
            raise ValueError(f"incorrect_weight must be >= 0, got {self.incorrect_weight!r}")
        chunk = self.lm_head_chunk_size
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"lm_head_chunk_size must be a positive int, got {chunk!r}")
        if self.fused_lm_head and weighting is not None:
            raise ValueError("sample_weighting needs the teacher's logits, which fused_lm_head "
                             "never computes; use one or the other")
        # Checked here as well as in the op, which never sees alpha without labels.
        check_alpha_schedule(as_schedule(self.alpha))
        if self.rest not in REST_MODES:
            raise ValueError(f"rest must be one of {REST_MODES}, got {self.rest!r}")
        soft = self.soft_index
        if soft is not None and not (isinstance(soft, numbers.Integral) and soft < 0
                                     and soft != self.ignore_index):
            raise ValueError(f"soft_index must be a negative int other than ignore_index "
                             f"({self.ignore_index}), got {soft!r}")

    def _check_inputs(self) -> None:
        """``inputs`` maps batch keys (model inputs, never labels or sample weights) to one of
        ``ROUTES``. A copy is kept: changing the given mapping later would skip these checks."""
        if self.inputs is None:
            return
        if not isinstance(self.inputs, Mapping):
            raise TypeError(f"inputs must map batch keys to one of {ROUTES}, got "
                            f"{type(self.inputs).__name__}")
        for key, route in self.inputs.items():
            if not isinstance(key, str):
                raise TypeError(f"inputs maps batch keys, which are strings, got {key!r}")
            if key in ("labels", "sample_weight"):
                raise ValueError(f"inputs[{key!r}]: {key!r} is no model input (pykd takes it "
                                 "out of every dict batch and passes it to neither model)")
            if route not in ROUTES:
                raise ValueError(f"inputs[{key!r}] must be one of {ROUTES}, got {route!r}")
        self.inputs = dict(self.inputs)


def configure(kind: type[_C], config: _C | None, options: Mapping[str, Any]) -> _C:
    """``config`` (default: ``kind()``) with ``options`` laid over it."""
    if config is not None and not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(config).__name__}")
    return kind(**options) if config is None else config.replace(**options)


def sort_options(owner: str, options: Mapping[str, Any],
                 *kinds: type[_Config]) -> list[dict[str, Any]]:
    """``options`` split by the config (of ``kinds``) that declares each; a name none declares
    is refused as Python refuses an unexpected keyword of ``owner``."""
    parts: list[dict[str, Any]] = [{} for _ in kinds]
    for name, value in options.items():
        for part, kind in zip(parts, kinds):
            if name in kind.names():
                part[name] = value
                break
        else:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    return parts


def flat_signature(init: Callable[..., Any], *kinds: type[_Config]) -> inspect.Signature:
    """``init``'s signature with its ``**options`` spelled out as the keywords of ``kinds``, for
    ``help()`` and editors."""
    params = [p for p in inspect.signature(init).parameters.values()
              if p.kind is not p.VAR_KEYWORD]
    for kind in kinds:
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=f.type) for f in dataclasses.fields(kind)]
    return inspect.Signature(params)

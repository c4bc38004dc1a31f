"""pykd: fast knowledge distillation for NLP on PyTorch.

The core is one fused, weighted distillation loss (KL with temperature, reverse KL, JSD, MSE,
cosine; hard-label mix; per-row weights) with its backward, in C++ and CUDA, registered as
``torch.ops.pykd.distill_loss``. On top of it, :class:`pykd.Distiller` trains a student from one
or more frozen teachers (or a :class:`pykd.TeacherCache` of their outputs), and
:class:`pykd.MutualDistiller` and :func:`pykd.propagate` train models together or down a chain;
all run one :class:`pykd.TrainingLoop` over an :class:`pykd.Objective` (docs/guide.md).
"""

from importlib.metadata import PackageNotFoundError, version

from pykd._extension import LOAD_ERROR, build_info

if LOAD_ERROR is None:
    from pykd import ops  # noqa: F401  (registers fake kernels and autograd)

from pykd import augment, functional, schedules, students
from pykd.cache import (
    CacheError,
    CorruptCacheError,
    IndexedBatch,
    StaleCacheError,
    TeacherCache,
    read_logprobs_jsonl,
)
from pykd.callbacks import Callback
from pykd.config import DistillationConfig, TrainingConfig
from pykd.distiller import Distiller, HiddenMatch, NonFiniteLossError
from pykd.functional import (
    distillation_loss,
    distillation_loss_topk,
    fused_linear_distillation_loss,
)
from pykd.loop import TrainingLoop
from pykd.losses import DistillationLoss, FusedLinearDistillationLoss, TopKDistillationLoss
from pykd.objective import Objective
from pykd.onpolicy import OnPolicy
from pykd.propagation import MutualDistiller, propagate
from pykd.teachers import adaptive_weights, combine_teachers

try:
    __version__ = version("pykd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CacheError",
    "Callback",
    "CorruptCacheError",
    "DistillationConfig",
    "DistillationLoss",
    "Distiller",
    "FusedLinearDistillationLoss",
    "TopKDistillationLoss",
    "HiddenMatch",
    "IndexedBatch",
    "MutualDistiller",
    "NonFiniteLossError",
    "Objective",
    "OnPolicy",
    "StaleCacheError",
    "TeacherCache",
    "TrainingConfig",
    "TrainingLoop",
    "adaptive_weights",
    "augment",
    "build_info",
    "combine_teachers",
    "distillation_loss",
    "distillation_loss_topk",
    "functional",
    "fused_linear_distillation_loss",
    "read_logprobs_jsonl",
    "propagate",
    "schedules",
    "students",
    "__version__",
]

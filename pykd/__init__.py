"""pykd: fast knowledge distillation for NLP on PyTorch.

The core is one fused, weighted distillation loss (KL with temperature, reverse KL, JSD, MSE,
cosine; hard-label mix; per-row weights) with its backward, in C++ and CUDA, registered as
``torch.ops.pykd.distill_loss``.
"""

from importlib.metadata import PackageNotFoundError, version

from pykd._extension import LOAD_ERROR, build_info

if LOAD_ERROR is None:
    from pykd import ops  # noqa: F401  (registers fake kernels and autograd)

from pykd import functional
from pykd.functional import distillation_loss
from pykd.losses import DistillationLoss

try:
    __version__ = version("pykd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["DistillationLoss", "build_info", "distillation_loss", "functional", "__version__"]

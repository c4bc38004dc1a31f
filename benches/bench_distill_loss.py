"""Forward+backward of the distillation loss: pykd vs PyTorch eager vs torch.compile.

Run: ``pytest benches/bench_distill_loss.py --benchmark-only`` (add ``-k pykd`` for pykd
alone). Timings are pytest-benchmark's; the closing table adds GB/s over the one-pass floor
(read student and teacher, write the gradient: 3 N V bytes) and the peak memory above the
inputs, as a multiple of the gradient's size (1.00 = nothing but the gradient).
"""

from __future__ import annotations

import pytest
import torch
from conftest import measure

import pykd
from pykd.apps.bench import eager_kl as _eager_kl

T = 2.0
CASES = [  # (N, V, dtype)
    (2048, 32000, torch.float32),
    (512, 128256, torch.float32),
    (512, 128256, torch.bfloat16),
    (4096, 2, torch.float32),
]


def eager_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _eager_kl(s, t, T)


def pykd_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return pykd.distillation_loss(s, t, temperature=T, reduction="batchmean")


_compiled = torch.compile(eager_kl, dynamic=False)
IMPLS = {"pykd": pykd_kl, "eager": eager_kl, "compile": _compiled}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,v,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kl_forward_backward(benchmark, impl, n, v, dtype, device):
    torch.manual_seed(0)
    s = torch.randn(n, v, device=device).to(dtype).requires_grad_(True)
    t = torch.randn(n, v, device=device).to(dtype)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        s.grad = None
        fn(s, t).backward()
        sync()

    grad_bytes = s.numel() * s.element_size()
    measure(benchmark, step, device=device, grad_bytes=grad_bytes, floor_bytes=3 * grad_bytes,
            rounds=3 if device == "cpu" and n * v > 10**7 else 20,
            info={"table": "distill_loss KL T=2 forward+backward (median ms; floor 3 N V bytes)",
                  "case": f"N={n} V={v} {str(dtype).replace('torch.', '')} {device}",
                  "impl": impl})

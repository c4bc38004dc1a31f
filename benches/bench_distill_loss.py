"""Forward+backward of the distillation loss: pykd vs PyTorch eager vs torch.compile.

Run: ``pytest benches/bench_distill_loss.py --benchmark-only`` (add ``-k pykd`` for pykd
alone). Timings are pytest-benchmark's; the closing table adds GB/s over the one-pass floor
(read student and teacher, write the gradient: 3 N V bytes) and the peak memory above the
inputs, as a multiple of the gradient's size (1.00 = nothing but the gradient).
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESULTS, device_name

import pykd
from pykd.apps.bench import eager_kl as _eager_kl
from pykd.apps.bench import peak_extra_bytes

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


def cpu_peak_extra_bytes(step) -> int:
    return peak_extra_bytes(step, torch.device("cpu"))


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

    step()  # compile / warm up
    step()
    grad_bytes = s.numel() * s.element_size()
    s.grad = None
    peak = peak_extra_bytes(step, torch.device(device))
    rounds = 3 if device == "cpu" and n * v > 10**7 else 20
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    ms = benchmark.stats.stats.median * 1e3
    floor_bytes = 3 * grad_bytes
    info = {"table": "distill_loss KL T=2 forward+backward (median ms)",
            "case": f"N={n} V={v} {str(dtype).replace('torch.', '')} {device}", "impl": impl,
            "ms": ms, "GB/s over 3NV bytes": floor_bytes / (ms * 1e-3) / 1e9,
            "peak extra MB": peak / 2**20, "extra / gradient": peak / grad_bytes,
            "device": device_name(device)}
    benchmark.extra_info.update(info)
    RESULTS.append(info)

"""Forward+backward of the top-k teacher loss (a teacher-output cache): pykd vs eager vs compile.

Run: ``pytest benches/bench_distill_loss_topk.py --benchmark-only``. The eager and compiled
baselines scatter the k teacher logits into a dense ``-inf`` row and take the dense KL, which is
what a user without this op writes. The one-pass floor reads the student and writes its gradient
(2 N V bytes; the k entries per row are negligible).
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESULTS, device_name

import pykd
from pykd.apps.bench import eager_kl, peak_extra_bytes

T = 2.0
CASES = [  # (N, V, k, dtype)
    (2048, 32000, 32, torch.float32),
    (512, 128256, 64, torch.bfloat16),
]


def eager_topk(s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    dense = torch.full_like(s, float("-inf")).scatter(-1, idx, val.to(s.dtype))
    return eager_kl(s, dense, T)


def pykd_topk(s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    return pykd.distillation_loss_topk(s, idx, val, temperature=T, reduction="batchmean")


IMPLS = {"pykd": pykd_topk, "eager": eager_topk,
         "compile": torch.compile(eager_topk, dynamic=False)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,v,k,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_topk_kl_forward_backward(benchmark, impl, n, v, k, dtype, device):
    torch.manual_seed(0)
    s = torch.randn(n, v, device=device).to(dtype).requires_grad_(True)
    top = torch.randn(n, v, device=device).topk(k, dim=-1)
    idx, val = top.indices, top.values.half()  # as a TeacherCache stores them
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        s.grad = None
        fn(s, idx, val).backward()
        sync()

    step()  # compile / warm up
    step()
    grad_bytes = s.numel() * s.element_size()
    s.grad = None
    peak = peak_extra_bytes(step, torch.device(device))
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 20, iterations=1, warmup_rounds=0)
    ms = benchmark.stats.stats.median * 1e3
    info = {"table": "distill_loss_topk KL T=2 forward+backward (median ms)",
            "case": f"N={n} V={v} k={k} {str(dtype).replace('torch.', '')} {device}",
            "impl": impl, "ms": ms, "GB/s over 2NV bytes": 2 * grad_bytes / (ms * 1e-3) / 1e9,
            "peak extra MB": peak / 2**20, "extra / gradient": peak / grad_bytes,
            "device": device_name(device)}
    benchmark.extra_info.update(info)
    RESULTS.append(info)

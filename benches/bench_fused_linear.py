"""fused_linear_distill_loss vs materialising the logits: time and peak memory as N grows.

Run: ``pytest benches/bench_fused_linear.py --benchmark-only``. The fused op's extra memory
should stay flat in N (three chunk x V buffers plus parameter-sized gradients); the unfused
paths grow with N (two [N, V] logits tensors and their gradient).
"""

from __future__ import annotations

import pytest
import torch
from conftest import RESULTS, cpu_peak_extra_bytes, device_name

import pykd

V, HS, HT, CHUNK = 8000, 64, 128, 1024
ROWS = [2048, 8192, 32768]


def fused(hs, ws, bs, ht, wt, bt):
    return pykd.fused_linear_distillation_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                                               temperature=2.0, chunk_size=CHUNK)


def unfused_pykd(hs, ws, bs, ht, wt, bt):
    with torch.no_grad():
        teacher = ht @ wt.T + bt
    return pykd.distillation_loss(hs @ ws.T + bs, teacher, temperature=2.0)


IMPLS = {"fused": fused, "unfused (logits + pykd loss)": unfused_pykd}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n", ROWS)
def test_fused_linear_memory(benchmark, impl, n):
    torch.manual_seed(0)
    hs = torch.randn(n, HS, requires_grad=True)
    head = torch.nn.Linear(HS, V)
    ht, wt, bt = torch.randn(n, HT), torch.randn(V, HT) * HT ** -0.5, torch.randn(V)
    fn = IMPLS[impl]

    def step():
        hs.grad = None
        head.zero_grad(set_to_none=True)
        fn(hs, head.weight, head.bias, ht, wt, bt).backward()

    step()
    peak = cpu_peak_extra_bytes(step)
    benchmark.pedantic(step, rounds=2 if n >= 8192 else 5, iterations=1, warmup_rounds=0)
    RESULTS.append({
        "table": f"fused linear KL T=2 forward+backward, V={V}, Hs={HS}, Ht={HT}, fp32, "
                 f"chunk {CHUNK}",
        "N": n, "impl": impl, "ms": benchmark.stats.stats.median * 1e3,
        "peak extra MB": peak / 2**20, "one [N, V] logits MB": n * V * 4 / 2**20,
        "device": device_name("cpu"),
    })

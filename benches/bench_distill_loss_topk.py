"""Forward+backward of the top-k teacher loss (a teacher-output cache): pykd vs eager vs compile.

Run: ``pytest benches/bench_distill_loss_topk.py --benchmark-only``. The eager and compiled
baselines scatter the k teacher logits into a dense ``-inf`` row and take the dense KL, which is
what a user without this op writes. ``pykd+rest`` adds the teacher's rest mass
(``teacher_log_rest``: one more number per row), ``pykd dense`` is the dense op against the
teacher's full logits (what a live teacher costs the loss, not counting the teacher). A sampled
teacher is the same op as ``pykd`` (k drawn classes instead of the k largest). The one-pass floor
reads the student and writes its gradient (2 N V bytes; the k entries per row are negligible).
"""

from __future__ import annotations

import pytest
import torch
from conftest import measure

import pykd
from pykd.apps.bench import eager_kl

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


def pykd_topk_rest(s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                   rest: torch.Tensor) -> torch.Tensor:
    return pykd.distillation_loss_topk(s, idx, val, temperature=T, reduction="batchmean",
                                       teacher_log_rest=rest)


def pykd_dense(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return pykd.distillation_loss(s, t, temperature=T, reduction="batchmean")


IMPLS = {"pykd": pykd_topk, "pykd+rest": pykd_topk_rest, "pykd dense": pykd_dense,
         "eager": eager_topk, "compile": torch.compile(eager_topk, dynamic=False)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,v,k,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_topk_kl_forward_backward(benchmark, impl, n, v, k, dtype, device):
    torch.manual_seed(0)
    s = torch.randn(n, v, device=device).to(dtype).requires_grad_(True)
    teacher = torch.randn(n, v, device=device)
    top = teacher.topk(k, dim=-1)
    idx, val = top.indices, top.values.half()  # as a TeacherCache stores them
    log_p = torch.log_softmax(teacher / T, dim=-1).gather(-1, idx)
    inputs = {"pykd+rest": (idx, val, torch.log1p(-log_p.exp().sum(-1)).half()),
              "pykd dense": (teacher.to(dtype),)}.get(impl, (idx, val))
    del teacher, log_p
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        s.grad = None
        fn(s, *inputs).backward()
        sync()

    grad_bytes = s.numel() * s.element_size()
    measure(benchmark, step, device=device, grad_bytes=grad_bytes, floor_bytes=2 * grad_bytes,
            rounds=3 if device == "cpu" else 20,
            info={"table": "distill_loss_topk KL T=2 forward+backward (median ms; floor 2 N V "
                           "bytes)",
                  "case": f"N={n} V={v} k={k} {str(dtype).replace('torch.', '')} {device}",
                  "impl": impl})

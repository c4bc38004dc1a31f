"""Quick CUDA checks that benches/gpu_check.sh runs around the test suite, from outside the
checkout (so that the installed pykd, with its compiled _C, is the one imported):

``python3 benches/gpu_smoke.py smoke``: the build is a CUDA build; one LLM-sized bf16
distill_loss forward and backward (V = 128256, the cluster path on sm_90) agrees with the float64
reference of tests/reference.py; one bad call raises a Python error instead of crashing.

``python3 benches/gpu_smoke.py plans``: every launch plan once, on small batches (what
compute-sanitizer memcheck runs). ``python3 benches/gpu_smoke.py cluster``: the cluster plans
only (what racecheck and synccheck run, being much slower).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import pykd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import reference_loss  # noqa: E402

V_LLM = 128256


def logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype).cuda()


def plan(vocab: int, dtype: torch.dtype, aligned: bool = True) -> str:
    return pykd._extension._C.cuda_launch_plan(vocab, str(dtype).removeprefix("torch."),
                                               torch.cuda.current_device(), aligned)


def smoke() -> int:
    info = pykd.build_info()
    print(f"build: {info}", flush=True)
    if not (info["loaded"] and info["cuda"]):
        print("smoke: FAILED, not a loaded CUDA build", flush=True)
        return 1
    rows, T, alpha = 8, 2.0, 0.5
    s = logits(rows, V_LLM, torch.bfloat16, 1).requires_grad_(True)
    t = logits(rows, V_LLM, torch.bfloat16, 2)
    y = torch.randint(0, V_LLM, (rows,), generator=torch.Generator().manual_seed(3)).cuda()
    y[1] = -100
    print(f"plan for {rows} x {V_LLM} bf16 rows: {plan(V_LLM, torch.bfloat16)}", flush=True)
    start = time.perf_counter()
    loss = pykd.distillation_loss(s, t, target=y, temperature=T, alpha=alpha)
    loss.backward()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3

    s64 = s.detach().cpu().double().requires_grad_(True)
    ref = reference_loss(s64, t.cpu().double(), target=y.cpu(), temperature=T, alpha=alpha)
    ref.backward()
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
    g_ref = s64.grad
    grad_err = (s.grad.cpu().double() - g_ref).abs().max().item() / g_ref.abs().max().item()
    # bf16 gradients carry 8 bits: 1% of the largest gradient bounds their rounding with room.
    ok = loss_err < 1e-4 and grad_err < 1e-2 and bool(torch.isfinite(s.grad).all())
    print(f"smoke: forward+backward {'ok' if ok else 'FAILED'} (loss {loss.item():.6f} vs "
          f"{ref.item():.6f}, rel err {loss_err:.1e}; grad err {grad_err:.1e} of the largest; "
          f"{ms:.0f} ms with the first call's setup)", flush=True)

    # A bad call must come back as a Python error: on one GPU image, formatting an error message
    # that streamed a number crashed the process.
    try:
        torch.ops.pykd.distill_loss(s.detach()[:, :100], t[:, :99])
    except RuntimeError as exc:
        print(f"smoke: error path ok ({str(exc).splitlines()[0][:120]})", flush=True)
    else:
        print("smoke: FAILED, mismatched shapes raised nothing", flush=True)
        ok = False
    return 0 if ok else 1


def run(vocab: int, dtype: torch.dtype, rows: int = 2, mode: str = "auto", offset: int = 0,
        divergences=("kl", "jsd")) -> None:
    """Forward and backward (with a non-unit output gradient) of each divergence, hard labels on
    the first; `offset` > 0 passes rows that start `offset` elements into wider rows."""
    os.environ["PYKD_CUDA_PLAN"] = mode
    base = logits(rows, vocab + 8, dtype, 4)
    t = logits(rows, vocab + 8, dtype, 5)[:, offset:offset + vocab]
    y = torch.arange(rows, device="cuda") * 7 % vocab
    for i, div in enumerate(divergences):
        b = base.clone().requires_grad_(True)
        s = b[:, offset:offset + vocab]
        hard = i == 0
        loss = pykd.distillation_loss(s, t, target=y if hard else None, divergence=div,
                                      temperature=2.0, alpha=0.5 if hard else 1.0,
                                      reduction="none")
        loss.backward(torch.full_like(loss, 0.5))
    print(f"  {mode:6} {str(dtype):14} V={vocab:6} offset {offset}: "
          f"{plan(vocab, dtype, offset * base.element_size() % 16 == 0)}", flush=True)


def plans(cluster_only: bool) -> int:
    run(V_LLM, torch.bfloat16)  # cluster, cached, packed
    run(V_LLM - 1, torch.bfloat16, divergences=("kl",))  # cluster, scalar loads
    run(V_LLM, torch.float64, rows=1, divergences=("jsd",))  # cluster, uncached
    if not cluster_only:
        run(32000, torch.bfloat16, mode="single")  # one block, cached
        run(V_LLM, torch.bfloat16, rows=1, mode="single", divergences=("kl",))  # uncached
        run(4000, torch.bfloat16, offset=1, divergences=("kl", "mse"))  # unaligned view
        run(301, torch.float32, divergences=("reverse_kl", "cosine"))
        s = logits(3, 5000, torch.bfloat16, 6).requires_grad_(True)
        t = logits(3, 5000, torch.float32, 7)
        top = t.topk(16, dim=-1)
        pykd.distillation_loss_topk(s, top.indices, top.values, temperature=2.0).backward()
        hs = logits(4, 64, torch.bfloat16, 8).requires_grad_(True)
        ws, wt = logits(1000, 64, torch.bfloat16, 9), logits(1000, 32, torch.bfloat16, 10)
        ht = logits(4, 32, torch.bfloat16, 11)
        pykd.fused_linear_distillation_loss(hs, ws, ht, wt, chunk_size=3).backward()
    torch.cuda.synchronize()
    print("plans: ran", flush=True)
    return 0


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    if what not in ("smoke", "plans", "cluster"):
        sys.exit(f"usage: {sys.argv[0]} smoke|plans|cluster")
    sys.exit(smoke() if what == "smoke" else plans(cluster_only=what == "cluster"))

"""The CPU kernels (plain, AVX2, AVX-512) agree with each other, NaN and inf cases included.

A process picks one kernel (ATen's rule, which pykd follows; ATEN_CPU_CAPABILITY forces a lower
one), so each kernel this machine can run is exercised in a subprocess of its own on the same
inputs, and every output is compared with the plain kernel's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ORDER = ["default", "avx2", "avx512"]

# Run in a fresh process under one kernel: every case's loss (reduction none) and gradients.
WORKER = r"""
import sys, torch, pykd
torch.manual_seed(1234)
out = {"kernel": pykd.build_info()["cpu_kernel"]}
nan, inf = float("nan"), float("inf")
for V in (7, 37, 5000):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base_s = torch.randn(6, V, dtype=torch.float64).mul(4)
        base_t = torch.randn(6, V, dtype=torch.float64).mul(4)
        base_s[2, 1::3] = -inf  # masked entries
        base_t[3, ::2] = -inf
        base_s[4] *= 1e4
        for poison in ("none", "s_nan", "s_inf", "s_ninf", "t_nan", "t_inf", "all_nan"):
            s, t = base_s.clone(), base_t.clone()
            if poison == "s_nan": s[1, V // 2] = nan
            if poison == "s_inf": s[1, V - 1] = inf
            if poison == "s_ninf": s[5, 0] = -inf
            if poison == "t_nan": t[0, 0] = nan
            if poison == "t_inf": t[5, V // 3] = inf
            if poison == "all_nan": s[1] = nan
            y = torch.randint(0, V, (6,))
            y[0] = -100
            for div in ("kl", "reverse_kl", "jsd", "mse", "cosine"):
                if div in ("mse", "cosine"):
                    s_, t_ = s.nan_to_num(nan=nan, neginf=-3.0), t.nan_to_num(nan=nan, neginf=-3.0)
                    if poison == "s_ninf": s_[5, 0] = -inf
                else:
                    s_, t_ = s, t
                for hard in (False, True):
                    a = s_.to(dtype).detach().clone().requires_grad_()
                    b = t_.to(dtype).detach().clone().requires_grad_()
                    loss = pykd.distillation_loss(
                        a, b, target=y if hard else None, alpha=0.3 if hard else 1.0,
                        divergence=div, temperature=1.7, reduction="none")
                    loss.sum().backward()
                    key = (V, str(dtype), poison, div, hard)
                    out[key] = (loss.detach(), a.grad.float(), b.grad.float())
            idx = base_t.topk(5, dim=-1).indices
            val = t.gather(1, idx).float()
            a = s.to(dtype).detach().clone().requires_grad_()
            loss = pykd.distillation_loss_topk(a, idx, val, temperature=1.7, reduction="none")
            loss.sum().backward()
            out[(V, str(dtype), poison, "topk", False)] = (loss.detach(), a.grad.float(), None)
torch.save(out, sys.argv[1])
"""


def _kernels_here(cwd) -> list[str]:
    """The kernels this CPU can run: the one an unforced process picks, and every lower one."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    best = subprocess.run(
        [sys.executable, "-c", "import pykd; print(pykd.build_info()['cpu_kernel'])"],
        capture_output=True, text=True, env=env, check=True, cwd=cwd).stdout.strip().lower()
    return ORDER[: ORDER.index(best) + 1] if best in ORDER else ["default"]


def _run(kernel: str, path: str, cwd) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernel, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", WORKER, path], env=env, check=True, cwd=cwd)
    return torch.load(path, weights_only=False)  # our own file, written just now


def test_every_cpu_kernel_gives_the_plain_kernels_answers(tmp_path):
    # From outside the checkout: `python -c` puts the current folder first on sys.path, and a
    # checkout's pykd/ source folder (no compiled ops) would shadow the installed package.
    kernels = _kernels_here(tmp_path)
    if len(kernels) == 1:
        pytest.skip("this CPU runs only the plain kernel")
    runs = {k: _run(k, str(tmp_path / f"{k}.pt"), tmp_path) for k in kernels}
    for k in kernels:
        assert runs[k].pop("kernel").lower() == k, "ATEN_CPU_CAPABILITY was not honoured"
    plain = runs["default"]
    for k in kernels[1:]:
        assert runs[k].keys() == plain.keys()
        for key, (loss, gs, gt) in plain.items():
            other = runs[k][key]
            low = "bfloat16" in key[1]
            # Vector exps differ from libm's by ~1e-6 relative; bf16 gradients round once more.
            tol = dict(rtol=2e-2, atol=1e-2) if low else dict(rtol=2e-5, atol=1e-6)
            # NaN where the plain kernel has NaN, and nowhere else (inf likewise).
            for name, a, b in (("loss", loss, other[0]), ("grad_student", gs, other[1]),
                               ("grad_teacher", gt, other[2])):
                if a is None:
                    continue
                where = (k, key, name)
                assert torch.equal(torch.isnan(a), torch.isnan(b)), where
                assert torch.equal(torch.isinf(a), torch.isinf(b)), where
                finite = torch.isfinite(a)
                torch.testing.assert_close(b[finite], a[finite], **tol, msg=str(where))

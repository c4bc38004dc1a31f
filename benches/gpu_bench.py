"""GPU benchmark of the KL distillation loss (forward + backward), printed as a markdown table.

Run on a machine with a CUDA GPU after building pykd with CUDA (benches/gpu_check.sh does both):
``python3 benches/gpu_bench.py``. The floor is one fused pass (read student and teacher logits,
write the student gradient: 3 N V bytes) at the copy bandwidth measured here, first. Each row is
printed as soon as it is measured, so a run cut short by a timeout keeps what it measured.
torch.compile's rows (a minute or more of compiling) are left out unless PYKD_BENCH_COMPILE=1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch
import torch.nn.functional as F

import pykd

T = 2.0


def eager_kl(s, t):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * T * T


def pykd_kl(s, t):
    return pykd.distillation_loss(s, t, temperature=T, reduction="batchmean")


def emit(line: str) -> None:
    print(line, flush=True)


def implementations():
    impls = {"pykd": pykd_kl, "eager": eager_kl}
    if os.environ.get("PYKD_BENCH_COMPILE") == "1":
        impls["torch.compile"] = torch.compile(eager_kl)
    try:
        from liger_kernel.transformers import LigerKLDIVLoss

        liger = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        impls["liger"] = lambda s, t: liger(F.log_softmax(s / T, -1),
                                            F.log_softmax(t / T, -1)) * T * T
    except ImportError:
        pass
    return impls


def time_ms(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = time_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() / (ms * 1e-3)


def fused_linear_rows(rows: int, iters: int, tflops: float) -> None:
    """LM-head KD at the issue's shape: pykd's chunked fused linear vs Liger's (if importable)."""
    hs_dim, ht_dim, vocab = 2048, 4096, 128256
    kw = dict(device="cuda", dtype=torch.bfloat16)
    hs = torch.randn(rows, hs_dim, **kw, requires_grad=True)
    ws = (torch.randn(vocab, hs_dim, **kw) * hs_dim ** -0.5).requires_grad_(True)
    ht, wt = torch.randn(rows, ht_dim, **kw), torch.randn(vocab, ht_dim, **kw) * ht_dim ** -0.5
    flops = 2 * rows * vocab * (hs_dim + ht_dim) + 4 * rows * vocab * hs_dim
    floor_ms = flops / (tflops * 1e12) * 1e3
    impls = {}
    for chunk in (512, 1024, 2048):
        impls[f"pykd chunk {chunk}"] = (lambda c: lambda: pykd.fused_linear_distillation_loss(
            hs, ws, ht, wt, temperature=T, chunk_size=c))(chunk)
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=T)
        impls["liger fused linear JSD"] = lambda: jsd(hs, ws, ht, wt)
        impls["pykd jsd chunk 1024"] = lambda: pykd.fused_linear_distillation_loss(
            hs, ws, ht, wt, divergence="jsd", beta=0.5, temperature=T, chunk_size=1024)
    except ImportError:
        pass
    emit(f"| (matmul floor at {tflops:.0f} TFLOP/s) | | {floor_ms:.2f} | 1.00x | | |")
    for name, fn in impls.items():
        def step():
            hs.grad = ws.grad = None
            fn().backward()

        try:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            hs.grad = ws.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9
            ms = time_ms(step, iters)
            emit(f"| N={rows} Hs={hs_dim} Ht={ht_dim} V={vocab} bf16 | {name} | {ms:.2f} | "
                 f"{ms / floor_ms:.2f}x | {peak_gb:.2f} | |")
        except torch.cuda.OutOfMemoryError:
            emit(f"| fused linear | {name} | OOM | | | |")
        except Exception as exc:  # a comparison library's API drift must not end the run
            emit(f"| fused linear | {name} | failed: {type(exc).__name__}: {exc} | | | |")
        torch.cuda.empty_cache()


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    ms = time_ms(lambda: a @ a, 10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    # The caption and header first: every row below is printed the moment it is measured.
    emit(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
         f"{datetime.date.today().isoformat()}, KL T={T} forward+backward, median of "
         f"{args.iters}; peak = memory above the inputs (the bf16 gradient alone is "
         f"{args.rows * 128256 * 2 / 1e9:.2f} / {args.rows * 32000 * 2 / 1e9:.2f} GB); "
         "grad diff = max |grad - pykd's grad|; the fused linear rows' peak includes the "
         "returned gradients (the bf16 [V, Hs] head gradient alone is 0.53 GB)")
    emit("| shape | impl | ms | vs floor | peak extra GB | grad diff |")
    emit("|---|---|---|---|---|---|")
    bw = copy_bandwidth()
    impls = implementations()
    for vocab in (128256, 32000):
        s = torch.randn(args.rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = torch.randn(args.rows, vocab, device="cuda", dtype=torch.bfloat16)
        floor_ms = 3 * s.numel() * s.element_size() / bw * 1e3
        emit(f"| (floor at {bw / 1e12:.2f} TB/s copy) | | {floor_ms:.2f} | 1.00x | | |")
        ref = None
        for name, fn in impls.items():
            def step():
                s.grad = None
                fn(s, t).backward()

            try:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                s.grad = None
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9
                ms = time_ms(step, args.iters)
            except torch.cuda.OutOfMemoryError:
                emit(f"| N={args.rows} V={vocab} bf16 | {name} | OOM | | | |")
                torch.cuda.empty_cache()
                continue
            except Exception as exc:  # a comparison library's API drift must not end the run
                emit(f"| N={args.rows} V={vocab} bf16 | {name} | failed: "
                     f"{type(exc).__name__}: {exc} | | | |")
                continue
            grad = s.grad.float()
            if ref is None:
                ref = grad
            err = (grad - ref).abs().max().item()
            emit(f"| N={args.rows} V={vocab} bf16 | {name} | {ms:.2f} | "
                 f"{ms / floor_ms:.2f}x | {peak_gb:.2f} | {err:.1e} |")
            s.grad = None
            torch.cuda.empty_cache()
    fused_linear_rows(args.rows, max(5, args.iters // 2), matmul_tflops())


if __name__ == "__main__":
    main()

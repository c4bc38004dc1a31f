"""``pykd bench``: the distillation loss, forward + backward, pykd vs eager vs torch.compile.

A quick table for the current machine; the full suites are in ``benches/`` (pytest-benchmark)
and ``benches/gpu_bench.py``.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pykd.functional import distillation_loss


def eager_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook formulation: two log_softmax and kl_div, batchmean, times T^2."""
    return F.kl_div(F.log_softmax(student / temperature, -1),
                    F.log_softmax(teacher / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature**2


def implementations(temperature: float) -> dict[str, Callable]:
    def pykd_kl(s, t):
        return distillation_loss(s, t, temperature=temperature, reduction="batchmean")

    def eager(s, t):
        return eager_kl(s, t, temperature)

    return {"pykd": pykd_kl, "eager": eager, "compile": torch.compile(eager, dynamic=False)}


def fix_mmap_threshold() -> None:
    """Peak CPU memory is read from the resident high-water mark. glibc raises its mmap
    threshold after large frees, so later buffers come from a heap that stays resident and their
    peak goes unseen; a fixed 64 KB threshold maps (and returns) every large buffer."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory of one call of ``step`` above what was allocated (CUDA) or resident (CPU,
    Linux) before it; None where it cannot be read."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:  # Linux: the resident high-water mark, reset first
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            before = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        step()
        with open("/proc/self/status") as f:
            peak = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
        return max(0, peak - before) * 1024
    except (OSError, StopIteration):
        return None


def run(rows: int, vocab: int, dtype: torch.dtype, device: torch.device, impls: list[str],
        iters: int, temperature: float = 2.0, progress: Callable[[str], None] = print) -> str:
    """Time each implementation and return a markdown table."""
    fix_mmap_threshold()
    torch.manual_seed(0)
    s = torch.randn(rows, vocab, device=device).to(dtype).requires_grad_(True)
    t = torch.randn(rows, vocab, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    available = implementations(temperature)
    lines = ["| impl | ms (median) | vs pykd | peak extra MB |", "|---|---|---|---|"]
    base_ms = None
    for name in impls:
        fn = available[name]

        def step():
            s.grad = None
            fn(s, t).backward()
            sync()

        progress(f"  {name}: warming up")
        step()
        step()
        s.grad = None
        peak = peak_extra_bytes(step, device)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        base_ms = ms if name == "pykd" else base_ms
        ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
        peak_mb = f"{peak / 2**20:.0f}" if peak is not None else "-"
        lines.append(f"| {name} | {ms:.2f} | {ratio} | {peak_mb} |")
        s.grad = None
    return "\n".join(lines)

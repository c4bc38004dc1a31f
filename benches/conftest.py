"""Shared pieces of pykd's benchmark suites: the device line and a closing table."""

from __future__ import annotations

import os
import platform

import torch

from pykd.apps.bench import fix_mmap_threshold, peak_extra_bytes

RESULTS: list[dict] = []


fix_mmap_threshold()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def cpu_peak_extra_bytes(step) -> int | None:
    return peak_extra_bytes(step, torch.device("cpu"))


def measure(benchmark, step, *, device: str, grad_bytes: int, floor_bytes: int, rounds: int,
            info: dict) -> None:
    """Warm ``step`` up (compiles), read its peak memory, time it, and add a row to the table:
    median ms, GB/s over the one-pass floor, extra memory as a multiple of the gradient."""
    step()
    step()
    peak = peak_extra_bytes(step, torch.device(device))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    ms = benchmark.stats.stats.median * 1e3
    info = {**info, "ms": ms, "GB/s over the floor": floor_bytes / (ms * 1e-3) / 1e9,
            "peak extra MB": peak / 2**20, "extra / gradient": peak / grad_bytes,
            "device": device_name(device)}
    benchmark.extra_info.update(info)
    RESULTS.append(info)


def pytest_report_header(config):
    return f"torch {torch.__version__}; CPU: {device_name('cpu')}; pid {os.getpid()}"


def pytest_terminal_summary(terminalreporter):
    """One markdown table per suite (rows grouped by their "table" key, columns in order)."""
    tables: dict[str, list[dict]] = {}
    for row in RESULTS:
        tables.setdefault(row["table"], []).append(row)
    tr = terminalreporter
    for title, rows in tables.items():
        cols = [k for k in rows[0] if k not in ("table", "device")]
        tr.write_sep("=", f"{title} ({rows[0]['device']})")
        tr.write_line("| " + " | ".join(cols) + " |")
        tr.write_line("|" + "---|" * len(cols))
        for r in rows:
            cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            tr.write_line("| " + " | ".join(cells) + " |")

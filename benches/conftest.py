"""Shared pieces of pykd's benchmark suites: the device line and a closing table."""

from __future__ import annotations

import os
import platform

import torch

RESULTS: list[dict] = []


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


def pytest_report_header(config):
    return f"torch {torch.__version__}; CPU: {device_name('cpu')}; pid {os.getpid()}"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", "pykd benchmark table (median of rounds)")
    cols = ("case", "impl", "ms", "GB/s", "peak extra MB", "extra / grad")
    tr.write_line("| " + " | ".join(cols) + " |")
    tr.write_line("|" + "---|" * len(cols))
    for r in RESULTS:
        tr.write_line(
            f"| {r['case']} | {r['impl']} | {r['ms']:.1f} | {r['gbps']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['peak_ratio']:.2f} |"
        )

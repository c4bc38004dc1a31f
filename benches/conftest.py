"""Shared pieces of pykd's benchmark suites: the device line and a closing table."""

from __future__ import annotations

import ctypes
import os
import platform

import torch

RESULTS: list[dict] = []


def _fixed_mmap_threshold() -> None:
    """Peak memory is read from the process's resident high-water mark. glibc raises its mmap
    threshold after large frees, so later buffers come from a heap that stays resident and their
    peak goes unseen; a fixed 64 KB threshold maps (and returns) every large buffer."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


_fixed_mmap_threshold()


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

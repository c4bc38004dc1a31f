"""``pykd bench``: the distillation loss, forward + backward, pykd vs eager vs torch.compile,
beside this machine's floor for the op.

A quick table for the current machine; the full suites are in ``benches/`` (pytest-benchmark)
and ``benches/gpu_bench.py``. The floor of one KL call (no labels) is the larger of

* memory: read the student and the teacher, write the gradient (``3 N V`` elements) at the
  machine's measured copy bandwidth (a large ``copy_`` between touched buffers: bytes read plus
  written per second);
* exps (CPU only): two exps per element (the teacher's and the student's softmax at T) at the
  kernels' own vectorised exp, measured on one thread from L1 (``pykd._C.cpu_exp_rate``), times
  the threads.

Timings are medians of interleaved calls (each round calls every implementation once), so a
noisy machine slows them alike.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pykd.functional import distillation_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CPU shapes of docs/benchmarks.md: large vocabularies and the small label sets of
# classification and tagging heads.
CPU_PRESET = ("2048x32000", "512x128256", "512x128256:bfloat16", "4096x2", "4096x5", "4096x20",
              "4096x50")
EXPS_PER_ELEMENT = 2  # KL without labels: exp((t - m_t) / T) and exp((s - m_s) / T)


@dataclass(frozen=True)
class Case:
    rows: int
    vocab: int
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"N={self.rows} V={self.vocab} {self.dtype}"


def parse_case(spec: str) -> Case:
    """``"2048x32000"`` or ``"512x128256:bfloat16"`` -> a :class:`Case`."""
    shape, _, dtype = spec.partition(":")
    rows, _, vocab = shape.partition("x")
    dtype = dtype or "float32"
    if not (rows.isdigit() and vocab.isdigit() and int(rows) > 0 and int(vocab) > 0
            and dtype in DTYPES):
        raise ValueError(f"a shape is NxV or NxV:DTYPE (N, V >= 1; DTYPE one of "
                         f"{', '.join(DTYPES)}), got {spec!r}")
    return Case(int(rows), int(vocab), dtype)


def eager_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook formulation: two log_softmax and kl_div, batchmean, times T^2."""
    return F.kl_div(F.log_softmax(student / temperature, -1),
                    F.log_softmax(teacher / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature**2


def separate_compile_cache(kernel: str) -> str | None:
    """Point torch.compile's cache at a folder of pykd's CPU ``kernel`` (AVX2, AVX512, ...)
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set; returns the folder chosen, or None.

    Inductor's cache key leaves out ``ATEN_CPU_CAPABILITY``: code compiled in a run forced to
    AVX2 is loaded by a later AVX-512 run and crashes it (measured with torch 2.13: a segfault
    or glibc's "unaligned tcache chunk")."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return None
    user = getattr(os, "getuid", lambda: 0)()  # one folder per user, as inductor's own
    folder = os.path.join(tempfile.gettempdir(), f"pykd-inductor-{user}-{kernel.lower()}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


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


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read plus written per second by the best of ``repeats`` copies between two touched
    buffers of ``megabytes`` each."""
    src = torch.ones(megabytes * 2**18, device=device)
    dst = torch.zeros_like(src)
    sync = _sync(device)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def exp_rate() -> float | None:
    """Exps per second on one thread with the CPU kernels' exp (best of three), or None when
    the extension lacks the probe."""
    from pykd._extension import _C

    probe = getattr(_C, "cpu_exp_rate", None)
    return max(probe() for _ in range(3)) if probe is not None else None


def machine(device: torch.device) -> dict[str, Any]:
    """What the table was measured on."""
    from pykd._extension import build_info

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "pykd": build_info().get("version"), "device": device.type}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info.update(name=_cpu_name(), threads=torch.get_num_threads(),
                    cpu_kernel=build_info().get("cpu_kernel"),
                    cpu_capability=os.environ.get("ATEN_CPU_CAPABILITY", "(auto)"))
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def floor_ms(case: Case, bandwidth: float, exps: float | None, threads: int) -> dict[str, float]:
    """The case's floor (ms): memory (``3 N V`` elements at ``bandwidth`` bytes/s) and, when
    ``exps`` (per second per thread) is known, exps; ``floor`` is the larger."""
    elements = case.rows * case.vocab
    size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    out = {"memory_ms": 3 * elements * size / bandwidth * 1e3}
    if exps:
        out["exp_ms"] = EXPS_PER_ELEMENT * elements / (exps * threads) * 1e3
    out["floor_ms"] = max(out.values())
    return out


def case_steps(case: Case, device: torch.device, impls: Sequence[str], temperature: float
               ) -> dict[str, Callable[[], None]]:
    """One forward + backward of each implementation on fresh inputs of ``case``, as a
    callable; a fresh ``torch.compile`` per case, so no case recompiles another's graph."""
    torch.manual_seed(0)
    s = torch.randn(case.rows, case.vocab, device=device).to(DTYPES[case.dtype])
    s.requires_grad_(True)
    t = torch.randn(case.rows, case.vocab, device=device).to(DTYPES[case.dtype])
    sync = _sync(device)
    available = implementations(temperature)

    def stepper(fn: Callable) -> Callable[[], None]:
        def step() -> None:
            fn(s, t).backward()
            sync()
            s.grad = None
        return step

    return {name: stepper(available[name]) for name in impls}


def time_case(steps: dict[str, Callable[[], None]], iters: int, round_s: float = 0.02
              ) -> dict[str, float]:
    """Median ms of each step over ``iters`` interleaved rounds, after two warm-up calls each
    (the first compiles). A step faster than ``round_s`` is repeated within each round (its
    mean call is the round's time): one sub-millisecond call is mostly timer and scheduler
    noise, and small label sets are where pykd and eager are closest."""
    repeats = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        repeats[name] = max(1, math.ceil(round_s / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                step()
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def run_cases(cases: Sequence[Case], device: torch.device, impls: Sequence[str], iters: int,
              temperature: float = 2.0, progress: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Time every case and measure the floor: ``{"machine", "probes", "results"}``, each result
    one (case, implementation) with its floor and peak extra memory."""
    info = machine(device)
    progress("  measuring the copy bandwidth and the exp rate")
    bandwidth = copy_bandwidth(device)
    exps = exp_rate() if device.type == "cpu" else None
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    results = []
    for case in cases:
        progress(f"  {case.name}: timing")
        ms = time_case(case_steps(case, device, impls, temperature), iters)
        floor = floor_ms(case, bandwidth, exps, threads)
        results += [{**asdict(case), "impl": name, "ms": ms[name], **floor} for name in impls]
    # Peaks last: reading them needs a fixed mmap threshold (fix_mmap_threshold), which would
    # also make every buffer over 64 KB a fresh mapping, and its page faults would slow the
    # timings of small cases several-fold. (torch.compile compiles each case again here.)
    fix_mmap_threshold()
    rows = iter(results)
    for case in cases:
        progress(f"  {case.name}: peak memory")
        for name, step in case_steps(case, device, impls, temperature).items():
            step()
            peak = peak_extra_bytes(step, device)
            next(rows)["peak_extra_mb"] = None if peak is None else peak / 2**20
    return {"machine": info, "probes": {"copy_bandwidth_gb_s": bandwidth / 1e9,
                                        "exp_rate_per_thread_g_s": exps / 1e9 if exps else None},
            "results": results}


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table: per case, each implementation against pykd and the
    floor."""
    lines = ["| case | impl | ms (median) | vs pykd | vs floor | peak extra MB |",
             "|---|---|---|---|---|---|"]
    results = report["results"]
    for case in dict.fromkeys((r["rows"], r["vocab"], r["dtype"]) for r in results):
        rows = [r for r in results if (r["rows"], r["vocab"], r["dtype"]) == case]
        name = Case(*case).name
        base = next((r["ms"] for r in rows if r["impl"] == "pykd"), None)
        for r in rows:
            ratio = f"{r['ms'] / base:.2f}x" if base else "-"
            peak = f"{r['peak_extra_mb']:.0f}" if r["peak_extra_mb"] is not None else "-"
            lines.append(f"| {name} | {r['impl']} | {r['ms']:.3f} | {ratio} | "
                         f"{r['ms'] / r['floor_ms']:.1f}x | {peak} |")
        f = rows[0]
        parts = [f"memory {f['memory_ms']:.3f}"] + (
            [f"exps {f['exp_ms']:.3f}"] if "exp_ms" in f else [])
        lines.append(f"| {name} | floor ({', '.join(parts)}) | {f['floor_ms']:.3f} | - | 1.0x "
                     "| - |")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report as JSON, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def plot(report: dict[str, Any], path: Path) -> bool:
    """A bar chart of the report (time over the floor per case and implementation, log scale)
    as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    cases = list(dict.fromkeys((r["rows"], r["vocab"], r["dtype"]) for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cases)), 4.0))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, case in enumerate(cases):
            r = next((r for r in results if (r["rows"], r["vocab"], r["dtype"]) == case
                      and r["impl"] == impl), None)
            if r is not None:
                xs.append(i + (k - (len(impls) - 1) / 2) * width)
                ys.append(r["ms"] / r["floor_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=1, label="floor")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), [Case(*c).name.replace(" ", "\n", 1) for c in cases],
                  fontsize=8)
    ax.set_ylabel("time / floor (log)")
    m = report["machine"]
    ax.set_title(f"KL forward+backward on {m.get('name')} ({m.get('cpu_kernel') or m['device']}, "
                 f"{m['date']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True

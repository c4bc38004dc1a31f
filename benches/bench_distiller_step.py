"""The Distiller's per-step overhead over a hand-written loop that calls the same op.

Run: ``python benches/bench_distiller_step.py`` (``--help`` for the options; ``--threads 1``
gives steadier numbers on a shared machine). The student is ``pykd demo``'s: a
:class:`pykd.apps.demo.BagOfTokens` over MiniLM's 30,522 word pieces, 64 wide, 5 topics, padding
id 0, trained on batches of 32 articles of 128 word pieces with AdamW (lr 3e-3), T=4 and
alpha=0.9. The word pieces are random; only their shapes matter to the time of a step.

Two teacher setups, each trained two ways from the same initial weights on the same batches in
the same order:

* ``cache``: what the demo does: the teacher's logits stored once in a :class:`pykd.TeacherCache`
  (full float32 logits, as the demo stores them) and looked up per batch of an attached loader;
* ``live``: a small frozen teacher (another bag of tokens, 128 wide) run on every batch.

The two ways are (i) a hand-written loop (forward, :func:`pykd.distillation_loss`, backward,
``AdamW.step``, ``zero_grad``) and (ii) ``pykd.Distiller(...).fit`` with no evaluation,
checkpoints, progress bar or callbacks, and its other options at their defaults. Each round times
one epoch of ``--steps`` steps of each, alternating which goes first, all in one process because
the machine is noisy. The table gives the median over rounds of the wall time per step of each,
the overhead from those medians, the median of the rounds' own ratios ("paired"), and the
overhead in CPU time (less disturbed by other jobs at one thread). After the rounds the two
students must hold the same weights (same steps, batches, dropout masks and loss), so that the
two loops did the same work. The exit status is 1 where they do not, or where the overhead
exceeds ``--limit`` (10%). By default the heap keeps freed memory (:func:`keep_heap`), which
takes page faults out of the steps; ``--heap glibc`` leaves glibc's defaults (what the demo
gets), under which both loops may fault their large buffers in every step and measure slower and
noisier. ``--profile N`` adds the N functions whose cProfile time grows most
from the hand-written loop to the Distiller.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import platform
import pstats
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import pykd
from pykd.apps.demo import BagOfTokens, DemoConfig

DEMO = DemoConfig()  # the demo's own defaults: batch size, tokens, width, lr, T, alpha, seed
VOCAB, CLASSES, PAD = 30522, 5, 0  # MiniLM's word pieces and [PAD] id; BBC News's 5 topics
TEACHER_DIM = 128


class Articles(Dataset):
    """Dict items shaped like the demo's tokenised articles (padded to ``max_tokens``)."""

    def __init__(self, n: int, tokens: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, tokens), generator=g)
        # Most BBC articles run past 128 word pieces; a few short ones exercise the padding.
        lengths = torch.randint(tokens * 3 // 4, tokens + 1, (n,), generator=g)
        self.attention_mask = (torch.arange(tokens) < lengths[:, None]).long()
        self.input_ids[self.attention_mask == 0] = PAD
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}


def new_student(embeddings: torch.Tensor) -> BagOfTokens:
    # Seeded as the demo's new_student is, so both loops start from the same weights.
    torch.manual_seed(DEMO.seed)
    return BagOfTokens(VOCAB, DEMO.student_dim, CLASSES, PAD, embeddings)


def new_teacher() -> BagOfTokens:
    torch.manual_seed(DEMO.seed + 1)
    return BagOfTokens(VOCAB, TEACHER_DIM, CLASSES, PAD).eval().requires_grad_(False)


class Manual:
    """The hand-written loop: what a user would write around the op for the same training."""

    def __init__(self, student: BagOfTokens, loader: DataLoader,
                 teacher_logits: Callable[[Any], tuple[dict[str, torch.Tensor], torch.Tensor]]
                 ) -> None:
        self.student, self.loader, self.teacher_logits = student, loader, teacher_logits
        # The Distiller's default optimizer: AdamW over the trainable parameters, in their order.
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=DEMO.lr)

    def epoch(self, dropout_seed: int) -> None:
        self.student.train()
        batches = iter(self.loader)
        # Creating a DataLoader iterator without a generator of its own draws from the global
        # RNG; the Distiller's loaders have their own. Seeding after it gives both loops the
        # same dropout masks.
        torch.manual_seed(dropout_seed)
        for raw in batches:
            inputs, teacher = self.teacher_logits(raw)
            labels = inputs.pop("labels")
            logits = self.student(**inputs)
            # The Distiller's loss: the same op, T, alpha, labels and ignore_index. It passes
            # reduction="sum" with every row weighted 1/B; "mean" is the same loss (and, with a
            # power-of-two batch, the same float32 numbers) as a user would write it.
            loss = pykd.distillation_loss(logits, teacher, target=labels,
                                          temperature=DEMO.temperature, alpha=DEMO.alpha,
                                          reduction="mean")
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class ViaDistiller:
    def __init__(self, teacher: BagOfTokens | pykd.TeacherCache, student: BagOfTokens,
                 loader: DataLoader, log_every: int) -> None:
        self.loader = loader
        self.distiller = pykd.Distiller(
            teacher, student, temperature=DEMO.temperature, alpha=DEMO.alpha, lr=DEMO.lr,
            seed=DEMO.seed, progress=False, log_every=log_every)

    def epoch(self, dropout_seed: int) -> None:
        torch.manual_seed(dropout_seed)
        # fit counts epochs in total: one more each call (no evaluation loader, no checkpoint).
        self.distiller.fit(self.loader, epochs=self.distiller.epoch + 1)


def setups(names: list[str], data: Articles, batch_size: int, folder: Path,
           log_every: int) -> dict[str, tuple[Manual, ViaDistiller]]:
    """Both loops of each setup, their students starting from the same weights."""
    g = torch.Generator().manual_seed(DEMO.seed + 2)
    # The demo's student embeddings are the teacher's projected onto principal directions; any
    # values of that size do for timing.
    embeddings = torch.randn(VOCAB, DEMO.student_dim, generator=g) * 0.05
    teacher = new_teacher()
    # No shuffling: the Distiller orders a shuffling loader from (seed, epoch) itself, which a
    # hand-written loop could only copy from pykd's internals. One randperm per epoch is all the
    # two orders cost apart, and the sequential order lets the weights be compared.
    plain = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = {}
    for name in names:
        if name == "cache":
            cache = pykd.TeacherCache.build(folder / "train", teacher, data, top_k=None,
                                            dtype="float32", batch_size=64, progress=False)
            loader = cache.attach(plain)

            def lookup(raw: Any, cache: pykd.TeacherCache = cache) -> tuple[dict, torch.Tensor]:
                return dict(raw.batch), cache.lookup(raw.index)[0]

            out[name] = (Manual(new_student(embeddings), loader, lookup),
                         ViaDistiller(cache, new_student(embeddings), loader, log_every))
        elif name == "live":
            def run_teacher(raw: dict, teacher: BagOfTokens = teacher) -> tuple[dict, Any]:
                with torch.no_grad():
                    logits = teacher(raw["input_ids"], raw["attention_mask"])
                return dict(raw), logits

            out[name] = (Manual(new_student(embeddings), plain, run_teacher),
                         ViaDistiller(teacher, new_student(embeddings), plain, log_every))
        else:
            raise SystemExit(f"unknown setup {name!r}: choose from cache, live")
    return out


def timed(epoch: Callable[[int], None], seed: int, steps: int) -> tuple[float, float, float]:
    """Per step of one epoch: wall ms, this process's CPU ms (which the other jobs of a shared
    machine disturb less, with one thread) and minor page faults."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    epoch(seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return wall * 1e3 / steps, cpu * 1e3 / steps, faults / steps


def keep_heap() -> None:
    """Keep freed memory in the heap (glibc), so that large buffers are not mapped afresh.

    The embedding's dense gradient and AdamW's temporaries are ~7.8 MB each. Depending on what
    else the heap holds, glibc returns such buffers to the system on free and every step then
    faults them back in (thousands of page faults, milliseconds of system time per step, in
    both loops alike), or it does not; which one a process gets varies from run to run and
    swamps a 1 ms difference. Fixed thresholds take that away."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, float]:
    """(largest absolute difference, largest parameter magnitude) between two models."""
    diff = scale = 0.0
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        diff = max(diff, (x - y).abs().max().item())
        scale = max(scale, x.abs().max().item())
    return diff, scale


def own_times(epoch: Callable[[int], None], seed: int, epochs: int) -> dict[str, list[float]]:
    """cProfile of ``epochs`` epochs: each function's [own seconds, calls]."""
    profiler = cProfile.Profile()
    profiler.enable()
    for k in range(epochs):
        epoch(seed + k)
    profiler.disable()
    out = {}
    for (file, line, func), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else "C"
        out[f"{func} ({where})"] = [own, calls]
    return out


def profile_overhead(manual: Manual, via: ViaDistiller, steps: int, top: int) -> str:
    """Where the Distiller's extra time goes: the functions whose own time (cProfile, which
    inflates small calls) grows most from the hand-written loop to the Distiller, per step."""
    epochs = 3
    a = own_times(manual.epoch, 5000, epochs)
    b = own_times(via.epoch, 5000, epochs)
    n = steps * epochs
    zero = [0.0, 0]
    rows = sorted(((b.get(k, zero)[0] - a.get(k, zero)[0], k) for k in {*a, *b}), reverse=True)
    total_a = sum(v[0] for v in a.values()) / n * 1e6
    total_b = sum(v[0] for v in b.values()) / n * 1e6
    lines = [f"profiled us/step: manual {total_a:.0f}, Distiller {total_b:.0f} "
             f"(+{total_b - total_a:.0f})",
             f"{'extra us/step':>13} {'Distiller us/step':>17} {'calls/step':>10}  function"]
    for extra, k in rows[:top]:
        own, calls = b.get(k, zero)
        lines.append(f"{extra / n * 1e6:>13.1f} {own / n * 1e6:>17.1f} {calls / n:>10.2f}  {k}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size)
    parser.add_argument("--tokens", type=int, default=DEMO.max_tokens)
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds (one epoch of each loop), after one warm-up round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, as the demo runs)")
    parser.add_argument("--setups", default="cache,live",
                        help="comma-separated: cache (the demo's path), live (a teacher module)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="the Distiller's log_every (50, its default; 0: no detailed metrics)")
    parser.add_argument("--limit", type=float, default=10.0,
                        help="overhead in %% above which the run exits with status 1")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile the Distiller and print its top N functions")
    parser.add_argument("--heap", choices=("keep", "glibc"), default="keep",
                        help="keep: fix glibc's trim and mmap thresholds so that freed buffers "
                             "are reused, not faulted in again every step (steady); glibc: its "
                             "defaults, as the demo runs (a step may or may not fault, run to "
                             "run)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.heap == "keep":
        keep_heap()
    names = [s.strip() for s in args.setups.split(",") if s.strip()]

    data = Articles(args.steps * args.batch_size, args.tokens, DEMO.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="pykd-distiller-bench-") as folder:
        built = setups(names, data, args.batch_size, Path(folder), args.log_every)
        for name, (manual, via) in built.items():
            wall: dict[str, list[float]] = {"manual": [], "distiller": []}
            cpu: dict[str, list[float]] = {"manual": [], "distiller": []}
            faults: dict[str, list[float]] = {"manual": [], "distiller": []}
            for r in range(args.rounds + 1):  # round 0 warms up (allocator, first lookups)
                order = [("manual", manual.epoch), ("distiller", via.epoch)]
                for kind, epoch in order if r % 2 else order[::-1]:
                    ms, cpu_ms, faulted = timed(epoch, 1000 + r, args.steps)
                    if r:
                        wall[kind].append(ms)
                        cpu[kind].append(cpu_ms)
                        faults[kind].append(faulted)
            diff, scale = max_weight_diff(manual.student, via.distiller.student)
            # Bit for bit so far: with a batch of 32 the Distiller's per-row weight 1/B and the
            # mean's divisor are the same power of two. Other batch sizes may round apart;
            # AdamW keeps that at the rounding's size.
            same = diff <= 1e-4 * max(scale, 1.0)

            def median(x: dict[str, list[float]], kind: str) -> float:
                return statistics.median(x[kind])

            m, d = median(wall, "manual"), median(wall, "distiller")
            cm, cd = median(cpu, "manual"), median(cpu, "distiller")
            paired = statistics.median(y / x for x, y in zip(wall["manual"], wall["distiller"]))
            results.append({
                "setup": name, "manual_ms": m, "distiller_ms": d,
                "overhead_pct": (d / m - 1) * 100, "paired_overhead_pct": (paired - 1) * 100,
                "manual_cpu_ms": cm, "distiller_cpu_ms": cd,
                "cpu_overhead_pct": (cd / cm - 1) * 100,
                "manual_faults": median(faults, "manual"),
                "distiller_faults": median(faults, "distiller"),
                "manual_rounds_ms": wall["manual"], "distiller_rounds_ms": wall["distiller"],
                "steps_each": args.steps * (args.rounds + 1), "max_weight_diff": diff,
                "same_weights": same,
            })
            if args.profile:
                print(f"\nDistiller vs hand-written loop, cProfile, {name} "
                      f"({args.steps * 3} steps each):")
                print(profile_overhead(manual, via, args.steps, args.profile))
        for _, via in built.values():
            if via.distiller.cache is not None:
                via.distiller.cache.close()  # its shards are mapped from the folder

    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nDistiller step vs a hand-written loop: BagOfTokens student, batch "
          f"{args.batch_size} x {args.tokens} tokens, {args.steps} steps/epoch, median of "
          f"{args.rounds} rounds; torch {torch.__version__}, {device}\n")
    print("| setup | manual ms/step | Distiller ms/step | overhead % | paired overhead % "
          "| CPU-time overhead % | page faults/step | same weights (max diff) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setup']} | {r['manual_ms']:.2f} | {r['distiller_ms']:.2f} | "
              f"{r['overhead_pct']:+.1f} | {r['paired_overhead_pct']:+.1f} | "
              f"{r['cpu_overhead_pct']:+.1f} | "
              f"{r['manual_faults']:.0f} / {r['distiller_faults']:.0f} | "
              f"{'yes' if r['same_weights'] else 'NO'} ({r['max_weight_diff']:.1e}) |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
            "batch_size": args.batch_size, "tokens": args.tokens, "steps": args.steps,
            "rounds": args.rounds, "log_every": args.log_every, "heap": args.heap,
            "results": results,
        }, indent=2) + "\n")
    bad = [r["setup"] for r in results if not r["same_weights"]]
    if bad:
        raise SystemExit(f"the two loops ended with different weights in: {', '.join(bad)}")
    over = [r["setup"] for r in results if r["overhead_pct"] > args.limit]
    if over:
        raise SystemExit(f"Distiller overhead above {args.limit}% (wall time) in: "
                         f"{', '.join(over)}")


if __name__ == "__main__":
    main()

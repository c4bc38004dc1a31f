"""The ``pykd`` command line: ``pykd demo``, ``pykd bench``, ``pykd info``, ``pykd --version``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pykd._extension import build_info, require_extension
from pykd.functional import distillation_loss


def _demo(args: argparse.Namespace) -> int:
    """Distil a toy teacher into a smaller student on synthetic data with the fused loss."""
    require_extension()
    torch.manual_seed(args.seed)
    n, d, classes = args.samples, 32, args.classes
    x = torch.randn(n, d)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(d, 256), torch.nn.GELU(), torch.nn.Linear(256, classes)
    )
    with torch.no_grad():
        t_logits = teacher(x)
        labels = t_logits.argmax(-1)
    student = torch.nn.Linear(d, classes)
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    print(f"pykd demo: teacher {sum(p.numel() for p in teacher.parameters())} params -> "
          f"student {sum(p.numel() for p in student.parameters())} params, {n} samples, "
          f"{classes} classes, KL at T={args.temperature}, alpha={args.alpha}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = distillation_loss(
            student(x), t_logits, target=labels, temperature=args.temperature, alpha=args.alpha
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 5) == 0:
            with torch.no_grad():
                agree = (student(x).argmax(-1) == labels).float().mean().item()
            print(f"  step {step:4d}  loss {loss.item():.4f}  agreement with teacher {agree:.1%}")
    print(f"done in {time.perf_counter() - start:.2f} s")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """The op benchmark table for this machine: pykd vs eager vs torch.compile."""
    require_extension()
    from pykd import bench  # torch.compile is imported lazily: `pykd demo` never pays for it

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    unknown = set(impls) - {"pykd", "eager", "compile"}
    if unknown:
        raise SystemExit(f"pykd bench: unknown --impl {sorted(unknown)}; use pykd,eager,compile")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"pykd bench: KL T=2 forward+backward, N={args.rows} V={args.vocab} {args.dtype} on "
          f"{where}, median of {args.iters}")
    print(bench.run(args.rows, args.vocab, dtype, device, impls, args.iters))
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
    demo = sub.add_parser("demo", help="distil a toy teacher into a student (synthetic data)")
    demo.add_argument("--samples", type=int, default=4096)
    demo.add_argument("--classes", type=int, default=10)
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--temperature", type=float, default=2.0)
    demo.add_argument("--alpha", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time the loss op: pykd vs eager vs torch.compile")
    bench.add_argument("--rows", type=int, default=2048)
    bench.add_argument("--vocab", type=int, default=32000)
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--impl", default="pykd,eager,compile")
    bench.add_argument("--iters", type=int, default=5)
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="print the build information of the compiled extension")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

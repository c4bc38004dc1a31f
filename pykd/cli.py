"""The ``pykd`` command line: ``pykd demo`` and ``pykd info``."""

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


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(build_info(), indent=2))
    return 0 if build_info()["loaded"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pykd", description="Fast knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="distil a toy teacher into a student (synthetic data)")
    demo.add_argument("--samples", type=int, default=4096)
    demo.add_argument("--classes", type=int, default=10)
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--temperature", type=float, default=2.0)
    demo.add_argument("--alpha", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="print the build information of the compiled extension")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Distil from a teacher that runs elsewhere: its top-k log-probabilities, dumped to a file by an
inference engine, become a ``pykd.TeacherCache`` the ``Distiller`` trains from.

Big teachers are served by inference engines that return, per position, the top-k tokens and
their **log-probabilities** at the engine's sampling temperature, not logits. The script

1. plays the engine: a causal LM (a small GRU with seeded random weights standing in for a
   served model) scores every window of a token stream and writes, one JSON line per window,
   the top-k token ids and log-probabilities of each position at ``--temperature``
   (``{"token_ids": [[...], ...], "logprobs": [[...], ...]}``), as a server's dump would;
2. imports the file with ``pykd.TeacherCache.from_logprobs``: the log-probabilities times T
   are the teacher's logits up to a per-position constant, and the mass they miss is stored as
   the rest bucket, so the student sees the teacher's k tokens and everything else as one
   bucket (``distill_loss_topk(..., teacher_log_rest=...)``; docs/loss.md);
3. trains a student (an LSTM four times narrower) from the cache alone with
   ``pykd.Distiller(cache, student, causal_lm=True, temperature=T)``, and its twin (same
   initial weights and order) on the next tokens alone (``alpha=0``);
4. reports each student's KL divergence to the engine's full distribution and its next-token
   cross entropy on held-out windows, the cache's size against the dump's, and the time each
   step took.

Nothing is downloaded; it runs in about a minute on 2 CPU cores::

    python examples/offline_logprobs.py
    python examples/offline_logprobs.py --top-k 8 --temperature 2.0 --epochs 3

With a real engine, replace step 1 by its dump: per window the ids and log-probabilities of its
top-k tokens at each position, at a stated temperature. The windows given to
``from_logprobs`` must be those the engine scored, in the same order.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pykd
from pykd.apps.common import write_json


class Windows(Dataset):
    """Fixed-length token windows; each item is what the engine scored and the student reads."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = cell(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.head(hidden)


def token_stream(n: int, vocab: int, seed: int, draw: int) -> torch.Tensor:
    """A stream with structure to learn: each token mostly follows from the previous one. The
    successors depend on ``seed`` (the "language"), the stream itself on ``draw`` too."""
    follow = torch.randint(0, vocab, (vocab, 4),  # 4 likely successors each
                           generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1000 + draw + 1)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    for i in range(1, n):
        if torch.rand((), generator=gen) < 0.8:
            out[i] = follow[out[i - 1], torch.randint(0, 4, (), generator=gen)]
        else:
            out[i] = torch.randint(0, vocab, (), generator=gen)
    return out


@torch.no_grad()
def serve_logprobs(engine: nn.Module, windows: Windows, k: int, temperature: float,
                   out: Path) -> None:
    """What an inference engine returns: per position the top-k ids and log-probabilities at
    ``temperature``, one JSON line per window."""
    engine.eval()
    with out.open("w") as f:
        for i in range(len(windows)):
            logits = engine(windows[i]["input_ids"][None])[0]
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            top = logprobs.topk(k, dim=-1)
            f.write(json.dumps({"token_ids": top.indices.tolist(),
                                "logprobs": [[round(x, 6) for x in row]
                                             for row in top.values.tolist()]}) + "\n")


@torch.no_grad()
def held_out_scores(student: nn.Module, engine: nn.Module, windows: Windows,
                    temperature: float) -> dict[str, float]:
    """Mean per-position KL(engine || student) at ``temperature`` and next-token cross entropy
    over ``windows``."""
    student.eval()
    ids = windows.ids
    logits = student(ids)
    lp = torch.log_softmax(engine(ids) / temperature, dim=-1)
    lq = torch.log_softmax(logits / temperature, dim=-1)
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    student.train()
    return {"kl": float((lp.exp() * (lp - lq)).sum(-1).mean()), "ce": float(ce)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--windows", type=int, default=400, help="training windows")
    parser.add_argument("--length", type=int, default=32, help="tokens per window")
    parser.add_argument("--top-k", type=int, default=16, help="log-probabilities per position")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="the engine's temperature, and so the distillation's")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--engine-steps", type=int, default=300,
                        help="training steps of the stand-in engine")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/offline-logprobs"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name in ("vocab", "windows", "length", "top_k", "epochs", "batch_size", "engine_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k > args.vocab:
        parser.error("--top-k must be at most --vocab")
    if not args.temperature > 0:
        parser.error("--temperature must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    stream = token_stream((args.windows + 50) * args.length, args.vocab, args.seed, draw=0)
    all_windows = stream.reshape(-1, args.length)
    train, held_out = Windows(all_windows[:args.windows]), Windows(all_windows[args.windows:])

    # 1. The engine: trained on ten times more text of the same language than the students
    # see, so that it knows more than their labels tell them.
    engine = CausalLM(args.vocab, 128, nn.GRU)
    own = token_stream(10 * args.windows * args.length, args.vocab, args.seed, draw=1)
    own = own.reshape(-1, args.length)
    opt = torch.optim.Adam(engine.parameters(), lr=3e-3)
    for _ in range(args.engine_steps):
        ids = own[torch.randint(0, len(own), (32,))]
        loss = nn.functional.cross_entropy(engine(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    dump = args.output / "engine-logprobs.jsonl"
    start = time.perf_counter()
    serve_logprobs(engine, train, args.top_k, args.temperature, dump)
    serve_s = time.perf_counter() - start

    # 2. The dump as a cache: the same windows, in the order the engine scored them. The source
    # names this dump (its digest), so a cache of another run's dump is replaced, not reused.
    start = time.perf_counter()
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()[:16]
    cache = pykd.TeacherCache.from_logprobs(
        args.output / "cache", train, pykd.read_logprobs_jsonl(dump),
        temperature=args.temperature, vocab_size=args.vocab, source=f"toy-engine:{digest}",
        overwrite=True)
    import_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache.path.iterdir() if f.is_file())

    # 3. The student learns from the cache alone: the engine is not called again. Its twin
    # learns the next tokens only, through the same loop.
    initial = CausalLM(args.vocab, 32, nn.LSTM)
    before = held_out_scores(initial, engine, held_out, args.temperature)
    scores, train_s = {}, 0.0
    for name, alpha in (("labels only", 0.0), ("distilled", 1.0)):
        student = copy.deepcopy(initial)
        loader = cache.attach(DataLoader(train, batch_size=args.batch_size, shuffle=True))
        distiller = pykd.Distiller(cache, student, causal_lm=True, temperature=args.temperature,
                                   alpha=alpha, lr=3e-3, seed=args.seed, progress=args.progress,
                                   log_every=0)
        start = time.perf_counter()
        distiller.fit(loader, epochs=args.epochs)
        train_s = time.perf_counter() - start
        scores[name] = held_out_scores(student, engine, held_out, args.temperature)
    cache.close()

    positions = len(train) * args.length
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "held_out_before": before, "held_out": scores,
        "cache_bytes_per_position": size / positions,
        "dump_bytes_per_position": dump.stat().st_size / positions,
        "serve_s": serve_s, "import_s": import_s, "train_s": train_s,
    }
    write_json(args.output / "results.json", results)
    print(f"engine dump: {dump.stat().st_size / 2**20:.1f} MB of JSON, "
          f"{results['dump_bytes_per_position']:.0f} bytes/position, {serve_s:.1f} s")
    print(f"cache: {size / 2**20:.2f} MB, {results['cache_bytes_per_position']:.0f} "
          f"bytes/position (top-{args.top_k} + rest), imported in {import_s:.1f} s")
    print(f"held-out windows, after {args.epochs} epochs ({train_s:.1f} s for the distilled):")
    print(f"{'student':<12} {'KL to the engine':>16} {'next-token CE':>14}")
    for name, row in {"untrained": before, **scores}.items():
        print(f"{name:<12} {row['kl']:>16.3f} {row['ce']:>14.3f}")
    return results


if __name__ == "__main__":
    main()

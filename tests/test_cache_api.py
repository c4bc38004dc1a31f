"""pykd.TeacherCache as a user reaches for it: subsets and samplers of the cached data, evaluating
without the cache, streams of indexed batches, a sample's rows, replacing a stale cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from distiller_models import VOCAB, TinyLM, TokenDataset, same_weights
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    default_collate,
)

import pykd
from pykd import CorruptCacheError, IndexedBatch, StaleCacheError, TeacherCache


def classification(n: int = 24, seed: int = 0) -> tuple[TensorDataset, nn.Module]:
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(n, 6), torch.randint(0, 4, (n,)))
    return data, nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def full_cache(path, teacher, data, **options) -> TeacherCache:
    return TeacherCache.build(path, teacher, data, dtype="float32", shard_size=5, **options)


def teacher_rows(teacher: nn.Module, data: TensorDataset) -> torch.Tensor:
    """The teacher's logits of every sample, as the build computes them (one batch of all)."""
    with torch.no_grad():
        return teacher(data.tensors[0])


# ------------------------------------------------------------------- subsets and samplers


def test_a_subset_of_the_cached_data_trains_without_another_teacher_pass(tmp_path):
    data, teacher = classification()
    cache = full_cache(tmp_path / "c", teacher, data, batch_size=32)
    expected = teacher_rows(teacher, data)
    dev = [3, 17, 8, 0, 21, 5]
    seen = []
    for batch in cache.attach(DataLoader(Subset(data, dev), batch_size=4)):
        assert isinstance(batch, IndexedBatch)
        seen += batch.index.tolist()
        values, _ = cache.lookup(batch.index)
        torch.testing.assert_close(values, expected[batch.index], rtol=0, atol=0)
        assert torch.equal(batch.batch[0], data.tensors[0][batch.index])
    assert seen == dev

    # Subsets of subsets (and negative indices, as Subset reads them) map down to the cache.
    nested = Subset(Subset(data, list(range(10, 24))), [-1, 0, 2])
    (batch,) = cache.attach(DataLoader(nested, batch_size=3))
    assert batch.index.tolist() == [23, 10, 12]

    # A split that the cache was itself built on, attached as a Subset object of its own.
    split = Subset(data, list(range(0, 24, 2)))
    split_cache = full_cache(tmp_path / "split", teacher, split)
    (batch,) = split_cache.attach(DataLoader(Subset(data, list(range(0, 24, 2))), batch_size=12))
    assert batch.index.tolist() == list(range(12))

    # Training on the subset reads only its samples' rows: the same as a live teacher.
    options = {
        "temperature": 2.0,
        "alpha": 0.5,
        "progress": False,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.3),
    }
    torch.manual_seed(1)
    live_student = nn.Linear(6, 4)
    cached_student = copy.deepcopy(live_student)
    loader = DataLoader(Subset(data, dev), batch_size=3, shuffle=True)
    pykd.Distiller(teacher, live_student, **options).fit(loader, epochs=2)
    pykd.Distiller(cache, cached_student, **options).fit(cache.attach(loader), epochs=2)
    same_weights(cached_student, live_student, rtol=1e-5, atol=1e-6)

    # Other data, under a Subset or not, is refused, naming what was tried.
    other = TensorDataset(torch.randn(24, 6), data.tensors[1])
    with pytest.raises(StaleCacheError, match="nor any dataset its Subset wraps"):
        cache.attach(DataLoader(Subset(other, dev), batch_size=4))
    with pytest.raises(StaleCacheError, match="other data"):
        cache.attach(DataLoader(other, batch_size=4))


def test_any_sampler_or_batch_sampler_over_the_cached_data_is_kept(tmp_path):
    data, teacher = classification()
    cache = full_cache(tmp_path / "c", teacher, data)
    dev = [4, 9, 13, 2, 20]
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(data, batch_size=2, sampler=SubsetRandomSampler(dev, generator))
    attached = cache.attach(loader)
    assert attached.sampler is loader.sampler and len(attached) == 3
    drawn = [i for batch in attached for i in batch.index.tolist()]
    assert sorted(drawn) == sorted(dev)

    # Batches of a batch sampler of one's own: its batches, in its order.
    class EvenThenOdd(BatchSampler):
        def __iter__(self):
            yield [0, 2, 4]
            yield [1, 3]

        def __len__(self):
            return 2

    batches = list(
        cache.attach(DataLoader(data, batch_sampler=EvenThenOdd(SequentialSampler(data), 3, False)))
    )
    assert [b.index.tolist() for b in batches] == [[0, 2, 4], [1, 3]]
    assert torch.equal(batches[1].batch[1], data.tensors[1][[1, 3]])

    with pytest.raises(TypeError, match="batch_size=None"):
        cache.attach(DataLoader(data, batch_size=None))
    with pytest.raises(TypeError, match="DataLoader"):
        cache.attach([data[0]])


# ------------------------------------------------------------------------------ evaluation


def test_a_student_trained_from_a_cache_evaluates_on_plain_labelled_batches(tmp_path):
    data, teacher = classification()
    test_set = TensorDataset(torch.randn(10, 6), torch.randint(0, 4, (10,)))
    cache = full_cache(tmp_path / "c", teacher, data)
    student = nn.Linear(6, 4)
    distiller = pykd.Distiller(cache, student, alpha=0.5, lr=0.1, progress=False)
    distiller.fit(cache.attach(DataLoader(data, batch_size=8)), epochs=1)

    # No teacher rows: the student's own metrics on the labels, nothing measured against it.
    plain = DataLoader(test_set, batch_size=4)
    metrics = distiller.evaluate(plain)
    assert sorted(metrics) == ["accuracy", "ce"]
    live = pykd.Distiller(teacher, student, alpha=0.5, progress=False).evaluate(plain)
    assert metrics == pytest.approx({k: live[k] for k in metrics}, rel=1e-6)
    # With the cache's rows, everything, as before.
    attached = distiller.evaluate(cache.attach(DataLoader(data, batch_size=8)))
    assert sorted(attached) == ["accuracy", "agreement", "ce", "kl", "loss", "soft"]
    # Also as fit's per-epoch evaluation, and with weights computed from the teacher's rows.
    weighted = pykd.Distiller(
        cache, nn.Linear(6, 4), alpha=0.5, progress=False, sample_weighting="confidence"
    )
    assert sorted(
        weighted.fit(cache.attach(DataLoader(data, batch_size=8)), epochs=1, eval_loader=plain)
    ) >= ["accuracy", "ce"]

    # Training still needs the indices; an unlabelled batch without them has nothing to score.
    with pytest.raises(ValueError, match="training from a TeacherCache needs batches"):
        distiller.fit(plain, epochs=2)
    with pytest.raises(ValueError, match="neither labels nor its samples' cache indices"):
        distiller.evaluate([(test_set.tensors[0][:4],)])


# --------------------------------------------------------------------- indexed batch streams


def test_a_stream_of_indexed_batches_trains_soft_only_rows(tmp_path):
    """A transfer set without labels beside labelled rows, fed as IndexedBatch by a generator of
    one's own: the same steps as the live teacher on the same batches."""
    assert pykd.IndexedBatch is pykd.cache.IndexedBatch and "IndexedBatch" in pykd.__all__
    teacher, data = TinyLM(width=12, depth=3), TokenDataset(12, seed=5)
    for n in range(6, 12):  # the transfer rows: soft only
        item = data.items[n]
        item["labels"] = torch.full_like(item["labels"], -1).masked_fill(
            item["attention_mask"] == 0, -100
        )
    cache = TeacherCache.build(
        tmp_path / "c", teacher, data, top_k=VOCAB, dtype="float32", shard_size=4
    )
    order = [[0, 6, 7], [8, 1, 9], [2, 10, 11], [3, 4, 5]]

    def stream():
        for index in order:
            yield IndexedBatch(index, default_collate([data[i] for i in index]))

    options = {
        "temperature": 2.0,
        "alpha": 0.3,
        "soft_index": -1,
        "progress": False,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.5),
    }
    torch.manual_seed(2)
    live_student = TinyLM(width=6)
    cached_student = copy.deepcopy(live_student)
    live = pykd.Distiller(teacher, live_student, **options)
    live.fit([default_collate([data[i] for i in index]) for index in order], epochs=1)
    cached = pykd.Distiller(cache, cached_student, **options)
    cached.fit(stream(), epochs=1)
    same_weights(cached_student, live_student, rtol=1e-5, atol=1e-6)

    batch = IndexedBatch([1, 2], None)
    assert batch.index.dtype == torch.int64 and batch.index.tolist() == [1, 2]
    with pytest.raises(TypeError, match="1-D integer"):
        IndexedBatch(torch.tensor([0.0, 1.0]), None)
    with pytest.raises(TypeError, match="1-D integer"):
        IndexedBatch(torch.zeros(2, 2, dtype=torch.long), None)


# ------------------------------------------------------------------------------- rows


def test_a_token_level_cache_reads_back_each_samples_rows(tmp_path):
    teacher, data = TinyLM(width=12, depth=3), TokenDataset(7, seed=1)
    cache = TeacherCache.build(tmp_path / "c", teacher, data, top_k=3, shard_size=3)
    with pytest.raises(ValueError, match="cache.rows"):
        cache.lookup(torch.tensor([0]))
    whole = default_collate([data[i] for i in range(7)])
    with torch.no_grad():
        top = teacher(whole["input_ids"], whole["attention_mask"])["logits"].topk(3, dim=-1)
    mask = whole["attention_mask"].bool()

    cached = cache.rows([5, 0, 5])
    assert len(cached) == 3 and cached.values.dtype == torch.float16
    assert cached.offsets.tolist()[1:] == mask[[5, 0, 5]].sum(1).cumsum(0).tolist()
    for (values, indices), i in zip(cached, [5, 0, 5]):
        assert torch.equal(values, top.values[i][mask[i]].half())
        assert torch.equal(indices, top.indices[i][mask[i]])
    assert torch.equal(cache.rows(0).values, cached[-2][0])
    assert torch.equal(cache.rows(torch.tensor([5])).indices, cached[0][1])
    with pytest.raises(IndexError):
        cached[3]
    with pytest.raises(IndexError, match="outside"):
        cache.rows([7])

    # Sequence level, full logits: one row per sample, no indices.
    classes, teacher = classification()
    full = full_cache(tmp_path / "full", teacher, classes)
    cached = full.rows(range(3, 9))
    assert cached.indices is None and cached.offsets.tolist() == list(range(7))
    assert torch.equal(cached.values, teacher_rows(teacher, classes)[3:9])


# --------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_a_cache_of_another_key_and_nothing_else(tmp_path):
    data, teacher = classification()
    _, changed = classification(seed=1)
    path = tmp_path / "c"
    full_cache(path, teacher, data, top_k=3)
    (path / "notes.txt").write_text("mine")
    (path / "shard-notes.txt").write_text("mine too")
    (path / "models").mkdir()
    with pytest.raises(StaleCacheError, match="overwrite=True"):
        full_cache(path, changed, data)

    cache = full_cache(path, changed, data, overwrite=True)
    assert cache.top_k is None and cache.complete
    fresh = full_cache(tmp_path / "fresh", changed, data)
    mine = {"notes.txt", "shard-notes.txt", "models"}
    names = {f.name for f in path.iterdir()}
    assert names - mine == {f.name for f in fresh.path.iterdir()}  # no .indices left behind
    assert mine <= names and (path / "notes.txt").read_text() == "mine"
    for f in fresh.path.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes(), f.name

    # An unreadable manifest is replaced too; a corrupted shard is rebuilt, alone.
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCacheError, match="cannot be read"):
        full_cache(path, changed, data)
    full_cache(path, changed, data, overwrite=True).verify()
    shard = path / "shard-00002.values"
    good = shard.read_bytes()
    shard.write_bytes(bytes(len(good)))
    with pytest.raises(CorruptCacheError, match="overwrite=True"):
        full_cache(path, changed, data)
    built = []
    full_cache(path, changed, data, overwrite=True, on_shard=built.append).verify()
    assert built == [2] and shard.read_bytes() == good


def test_a_version_1_manifest_is_read_and_built_on(tmp_path):
    data, teacher = classification()
    path = tmp_path / "c"
    full_cache(path, teacher, data)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "pykd.teacher_cache/2" and sorted(manifest["shards"]) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    # Version 1: the shards as a list (here the first three of five, a build killed midway).
    v1 = {
        **manifest,
        "format": "pykd.teacher_cache/1",
        "shards": [manifest["shards"][str(j)] for j in range(3)],
    }
    (path / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(pykd.CacheError, match="3 of 5 shards"):
        TeacherCache.open(path).require_complete()
    built = []
    full_cache(path, teacher, data, on_shard=built.append)
    assert built == [3, 4]
    assert json.loads((path / "manifest.json").read_text()) == manifest

"""pykd.TeacherCache: round trip, stale keys, corruption, resumed builds, training without the
teacher."""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from distiller_models import VOCAB, TinyLM, TokenDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

import pykd
from pykd import CacheError, CorruptCacheError, StaleCacheError, TeacherCache


class Counting(nn.Module):
    """A teacher that counts the samples it has run on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.samples = model, 0

    def forward(self, input_ids, attention_mask=None):
        self.samples += len(input_ids)
        return self.model(input_ids, attention_mask)


class Killed(Exception):
    pass


def token_teacher() -> Counting:
    torch.manual_seed(0)
    return Counting(TinyLM(width=12, depth=3))


def build(path, teacher, dataset, **options) -> TeacherCache:
    options = {"top_k": 4, "shard_size": 3, "batch_size": 2, **options}
    return TeacherCache.build(path, teacher, dataset, **options)


def topk_reference(student, index, logits, target, temperature, alpha, ignore_index=-100):
    """Sum over valid rows of alpha T^2 KL(p || q) + (1 - alpha) CE, p = the renormalised top-k."""
    log_q = torch.log_softmax(student.double() / temperature, -1).gather(-1, index)
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    soft = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    valid = target != ignore_index
    ce = nn.functional.cross_entropy(student.double().flatten(0, -2),
                                     target.where(valid, 0).flatten(), reduction="none")
    rows = alpha * soft + (1 - alpha) * ce.view_as(soft)
    return rows[valid].sum(), valid.sum()


# ------------------------------------------------------------------------------ the files


def test_round_trip_holds_the_teachers_outputs(tmp_path):
    # Token level, top-k in float16: each sample's rows sit at its attention-mask positions.
    teacher, data = token_teacher(), TokenDataset(7, seed=1)
    cache = build(tmp_path / "topk", teacher, data)
    assert (cache.complete, cache.num_shards, cache.token_level, cache.vocab_size) == \
        (True, 3, True, VOCAB)
    batch = next(iter(DataLoader(data, batch_size=7)))
    with torch.no_grad():
        logits = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
    mask = batch["attention_mask"].bool()
    values, index = cache.lookup(torch.arange(7), mask)
    top = logits.topk(4, dim=-1)
    assert values.dtype == torch.float16 and index.dtype == torch.int64
    torch.testing.assert_close(values[mask], top.values[mask].half(), rtol=0, atol=0)
    assert torch.equal(index[mask], top.indices[mask])
    assert not values[~mask].any() and torch.equal(index[~mask][0], torch.arange(4))
    picked, _ = cache.lookup(torch.tensor([5, 0]), mask[[5, 0]])
    assert torch.equal(picked, values[[5, 0]])

    # Sequence level, full logits in float32: exactly the teacher's.
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    classifier = nn.Linear(6, 3)
    full = TeacherCache.build(tmp_path / "full", classifier, TensorDataset(x, y),
                              dtype="float32", shard_size=4)
    values, index = full.lookup(torch.arange(10))
    assert index is None and torch.equal(values, classifier(x).detach())

    # Plain data: a JSON manifest and raw arrays, nothing to unpickle.
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["key"]["top_k"] is None and len(manifest["shards"]) == 3
    assert sorted(p.suffix for p in (tmp_path / "full").iterdir()) == \
        [".json"] + [".offsets"] * 3 + [".values"] * 3


def test_a_stale_cache_is_refused(tmp_path):
    teacher, data = token_teacher(), TokenDataset(7, seed=1)
    path = tmp_path / "cache"
    build(path, teacher, data)

    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.model.head.bias[0] += 1e-3
    with pytest.raises(StaleCacheError, match="teacher's weights"):
        build(path, changed, data)
    with pytest.raises(StaleCacheError, match="teacher with other weights"):
        TeacherCache.open(path, teacher=changed)

    other = TokenDataset(7, seed=1)
    other.items[4]["input_ids"] = (other.items[4]["input_ids"] + 1) % VOCAB
    with pytest.raises(StaleCacheError, match="data's inputs"):
        build(path, teacher, other)
    with pytest.raises(StaleCacheError, match="other data"):
        TeacherCache.open(path).attach(DataLoader(other, batch_size=2))

    with pytest.raises(StaleCacheError, match=r"top_k \(4 in the cache, 5 now\)"):
        build(path, teacher, data, top_k=5)
    with pytest.raises(StaleCacheError, match="dtype"):
        build(path, teacher, data, dtype="float32")

    # Labels are not inputs: new labels keep the cache valid, and nothing is recomputed.
    relabelled = TokenDataset(7, seed=1)
    relabelled.items[0]["labels"] = relabelled.items[0]["labels"].flip(0)
    teacher.samples = 0
    build(path, teacher, relabelled)
    TeacherCache.open(path, teacher=teacher, dataset=relabelled)
    assert teacher.samples == 0


def test_corruption_is_detected(tmp_path):
    teacher, data = token_teacher(), TokenDataset(7, seed=1)
    path = tmp_path / "cache"
    build(path, teacher, data)
    shard = path / "shard-00001.values"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[5] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCacheError, match="shard-00001.values does not match"):
        TeacherCache.open(path).verify()
    with pytest.raises(CorruptCacheError, match="checksum"):
        build(path, teacher, data)  # the build checks what it would keep
    cache = TeacherCache.open(path)
    cache.lookup(torch.tensor([0, 1]), _mask(data, [0, 1]))  # shard 0 is intact
    with pytest.raises(CorruptCacheError):
        cache.lookup(torch.tensor([3]), _mask(data, [3]))

    shard.write_bytes(good[:-2])
    with pytest.raises(CorruptCacheError, match="wrong size"):
        TeacherCache.open(path).verify()
    shard.write_bytes(good)
    TeacherCache.open(path).verify()
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCacheError, match="cannot be read"):
        TeacherCache.open(path)


def test_a_manifest_missing_a_field_is_corrupt(tmp_path):
    path = tmp_path / "cache"
    build(path, token_teacher(), TokenDataset(4, seed=1))
    good = json.loads((path / "manifest.json").read_text())
    for drop, match in ((lambda m: m["key"].pop("data"), "key.data is missing"),
                        (lambda m: m["shards"]["1"].pop("rows"), r"shards\[1\].rows is missing"),
                        (lambda m: m["shards"]["0"]["sha256"].pop("indices"), "sha256"),
                        (lambda m: m.update(shards=[]), r"shards is \[\]"),
                        (lambda m: m["shards"].update({"7": m["shards"]["0"]}), "shards is"),
                        (lambda m: m["shards"]["1"].update(samples=3), r"shards\[1\].samples")):
        manifest = copy.deepcopy(good)
        drop(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptCacheError, match=match):
            TeacherCache.open(path)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_only_a_few_shards_stay_mapped(tmp_path, monkeypatch):
    """One shard per sample: looking every sample up keeps a bounded number of files open, and
    a shard unmapped and mapped again is not hashed again."""
    x = torch.randn(200, 4)
    cache = TeacherCache.build(tmp_path / "c", nn.Linear(4, 3), TensorDataset(x), top_k=2,
                               shard_size=1)
    hashed = []
    sha256_file = pykd._cache_files._sha256_file
    monkeypatch.setattr(pykd._cache_files, "_sha256_file",
                        lambda f: hashed.append(f) or sha256_file(f))
    before = _open_files()
    with cache:
        for _ in range(2):
            values, _ = cache.lookup(torch.arange(200))
            assert _open_files() - before <= 3 * pykd._cache_files._MAPPED_SHARDS
        assert len(hashed) == 3 * 200  # each file once, on its shard's first use
        assert values.shape == (200, 2)
    assert _open_files() == before
    opened = TeacherCache.open(cache.path)
    opened.verify()
    assert _open_files() == before  # verify reads the files without mapping them


def test_a_bfloat16_teacher_gets_its_inputs_in_bfloat16(tmp_path):
    x = torch.randn(10, 6)
    teacher = nn.Linear(6, 3).to(torch.bfloat16)
    cache = TeacherCache.build(tmp_path / "c", teacher, TensorDataset(x), dtype="float32")
    values, _ = cache.lookup(torch.arange(10))
    assert torch.equal(values, teacher(x.bfloat16()).float().detach())


def _scaled(items, scale=10.0):
    x, y = default_collate(items)
    return x * scale, y


def test_the_collate_function_is_part_of_the_key(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    teacher = nn.Linear(4, 3)
    path = tmp_path / "c"
    cache = TeacherCache.build(path, teacher, data, dtype="float32", collate_fn=_scaled)
    with pytest.raises(StaleCacheError, match="collate_fn"):
        cache.attach(DataLoader(data, batch_size=4))
    with pytest.raises(StaleCacheError, match="collate_fn"):
        TeacherCache.build(path, teacher, data, dtype="float32")  # refused, not reused
    with pytest.raises(StaleCacheError, match="collate_fn"):
        TeacherCache.build(path, teacher, data, dtype="float32",
                           collate_fn=functools.partial(_scaled, scale=2.0))
    batch = next(iter(cache.attach(DataLoader(data, batch_size=4, collate_fn=_scaled))))
    # The teacher on the build's one batch of 12: a matmul's last bits depend on its row count.
    expected = teacher(_scaled(list(data))[0]).detach()
    assert torch.equal(cache.lookup(batch.index)[0], expected[batch.index])

    # A DataLoader's default collate is torch's default_collate, whichever way it is given.
    plain = TeacherCache.build(tmp_path / "plain", teacher, data, dtype="float32")
    plain.attach(DataLoader(data, batch_size=4, collate_fn=default_collate))
    assert pykd.cache.fingerprint_collate(functools.partial(_scaled, scale=2.0)) != \
        pykd.cache.fingerprint_collate(functools.partial(_scaled, scale=3.0))


def _mask(data: TokenDataset, samples: list[int]) -> torch.Tensor:
    return torch.stack([data.items[i]["attention_mask"] for i in samples]).bool()


def test_a_killed_build_resumes_from_the_first_missing_shard(tmp_path):
    teacher, data = token_teacher(), TokenDataset(10, seed=2)  # 4 shards of 3, 3, 3, 1

    def killed_after_two(j):
        if j == 1:
            raise Killed

    path = tmp_path / "resumed"
    with pytest.raises(Killed):
        build(path, teacher, data, on_shard=killed_after_two)
    kept = {f: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes())
            for f in sorted(path.glob("shard-0000[01].*"))}
    assert len(kept) == 6 and not list(path.glob("shard-00002.*"))
    with pytest.raises(CacheError, match="2 of 4 shards"):
        pykd.Distiller(TeacherCache.open(path), TinyLM(width=6))

    teacher.samples, built = 0, []
    cache = build(path, teacher, data, on_shard=built.append)
    assert built == [2, 3] and teacher.samples == 4  # only the samples of the missing shards
    for f, (inode, mtime, content) in kept.items():
        assert (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) == (inode, mtime, content)
    assert cache.complete

    whole = build(tmp_path / "whole", teacher, data)
    names = sorted(f.name for f in path.iterdir())
    assert names == sorted(f.name for f in whole.path.iterdir())
    for name in names:
        assert (path / name).read_bytes() == (whole.path / name).read_bytes(), name
    teacher.samples = 0
    build(path, teacher, data)  # finished: returned as it is
    assert teacher.samples == 0


# ------------------------------------------------------------------------------- training


def _weights_equal(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name, **tol)


def test_training_from_a_full_logit_cache_matches_the_live_teacher(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randint(0, 5, (40,))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 5))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    options = {"temperature": 2.0, "alpha": 0.5, "accumulation_steps": 2, "progress": False,
               "sample_weighting": "confidence",
               "optimizer": lambda params: torch.optim.SGD(params, lr=0.5)}

    torch.manual_seed(1)
    live_student = nn.Linear(8, 5)
    cached_student = copy.deepcopy(live_student)
    live = pykd.Distiller(teacher, live_student, **options)
    live.fit(loader, epochs=2)

    TeacherCache.build(tmp_path / "c", teacher, loader.dataset, dtype="float32", shard_size=16)
    cache = TeacherCache.open(tmp_path / "c")  # no teacher from here on
    cached = pykd.Distiller(cache, cached_student, **options)
    attached = cache.attach(loader)
    cached.fit(attached, epochs=2)
    _weights_equal(cached_student, live_student, rtol=1e-5, atol=1e-6)
    assert cached.evaluate(attached) == pytest.approx(live.evaluate(loader), rel=1e-5)
    with pytest.raises(ValueError, match="attach"):
        cached.fit(loader, epochs=3)


def test_training_from_a_top_k_cache_with_every_class_matches_the_live_teacher(tmp_path):
    """Token level, causal LM, padding: k = V is the dense teacher."""
    teacher = TinyLM(width=12, depth=3)
    loader = DataLoader(TokenDataset(12, seed=3), batch_size=3, shuffle=True)
    options = {"temperature": 2.0, "alpha": 0.6, "causal_lm": True, "accumulation_steps": 2,
               "optimizer": lambda params: torch.optim.SGD(params, lr=0.5), "progress": False}
    torch.manual_seed(1)
    live_student = TinyLM(width=6)
    cached_student = copy.deepcopy(live_student)
    live = pykd.Distiller(teacher, live_student, **options)
    live.fit(loader, epochs=2)
    cache = TeacherCache.build(tmp_path / "c", teacher, loader.dataset, top_k=VOCAB,
                               dtype="float32", shard_size=5)
    cached = pykd.Distiller(cache, cached_student, **options)
    cached.fit(cache.attach(loader), epochs=2)
    _weights_equal(cached_student, live_student, rtol=1e-5, atol=1e-6)
    # A small KL (about 0.03) summed in another order by the two ops: float32 rounding.
    assert cached.evaluate(cache.attach(loader)) == pytest.approx(live.evaluate(loader),
                                                                  rel=1e-4)


def test_a_top_k_teacher_is_its_renormalised_top_k(tmp_path):
    """k < V in float16: the loss is T^2 KL from the softmax of the k cached logits."""
    teacher, data = TinyLM(width=12, depth=3), TokenDataset(8, seed=4)
    cache = TeacherCache.build(tmp_path / "c", teacher, data, top_k=3, shard_size=5)
    student = TinyLM(width=6)
    loader = DataLoader(data, batch_size=4)
    metrics = pykd.Distiller(cache, student, temperature=1.5, alpha=0.7,
                             progress=False).evaluate(cache.attach(loader))
    total = count = 0
    with torch.no_grad():
        for batch in loader:
            s = student(batch["input_ids"])["logits"]
            t = teacher(batch["input_ids"])["logits"].topk(3, dim=-1)
            loss, n = topk_reference(s, t.indices, t.values.half(), batch["labels"], 1.5, 0.7)
            total, count = total + loss, count + n
    assert metrics["loss"] == pytest.approx((total / count).item(), rel=1e-5)


def test_what_a_cache_cannot_train_is_refused(tmp_path):
    data = TokenDataset(4, seed=1)
    cache = build(tmp_path / "c", token_teacher(), data)
    student = TinyLM(width=6)
    refusals = [
        ({"hidden": pykd.HiddenMatch({1: 1}, student_width=6, teacher_width=12)}, "hidden"),
        ({"fused_lm_head": True, "student_head": "head"}, "fused_lm_head"),
        ({"sample_weighting": "entropy"}, "sample_weighting"),
        ({"divergence": "reverse_kl"}, "divergence"),
        ({"teacher_weights": [1.0]}, "teacher_weights"),
    ]
    for options, match in refusals:
        with pytest.raises(ValueError, match=match):
            pykd.Distiller(cache, student, **options)
    with pytest.raises(TypeError, match="on its own"):
        pykd.Distiller([cache], student)
    with pytest.raises(TypeError, match="DataLoader"):
        cache.attach([data[0]])
    pooled = TeacherCache.build(tmp_path / "pooled", TinyLM(width=12, pooled=True), data)
    with pytest.raises(ValueError, match="causal_lm"):
        pykd.Distiller(pooled, TinyLM(width=6, pooled=True), causal_lm=True)


# ------------------------------------------------------------------ collate fingerprints

fingerprint_collate = pykd.cache.fingerprint_collate
SCALE = 10.0


def _scaled_by_the_global(items):
    x, y = default_collate(items)
    return x * SCALE, y


def scaled_by(scale):
    """A collate function made by a factory: ``scale`` lives in its closure."""

    def collate(items):
        x, y = default_collate(items)
        return x * scale, y

    return collate


class Settings:
    """Plain state without a repr of its own (its default repr holds a memory address)."""

    def __init__(self, scale):
        self.scale = scale


class Slotted:
    __slots__ = ("scale",)

    def __init__(self, scale):
        self.scale = scale


class Scaler:
    """A callable object whose state holds another object."""

    def __init__(self, settings):
        self.settings = settings

    def __call__(self, items):
        return self.collate(items)

    def collate(self, items):
        x, y = default_collate(items)
        return x * self.settings.scale, y


def test_the_collate_fingerprint_covers_code_closures_and_state(monkeypatch):
    def same(a, b):
        assert fingerprint_collate(a) == fingerprint_collate(b)

    def different(a, b):
        assert fingerprint_collate(a) != fingerprint_collate(b)

    def lambdas(scale):
        return lambda items: _scaled(items, scale=scale), lambda items: _scaled(items, 2.0)

    # Lambdas: their constants; the same definition made twice is the same.
    different(lambda items: _scaled(items, 2.0), lambda items: _scaled(items, 3.0))
    same(lambdas(1.0)[1], lambdas(5.0)[1])
    # Closures: the captured values, however deeply the cell holds them.
    different(scaled_by(2.0), scaled_by(3.0))
    same(scaled_by(2.0), scaled_by(2.0))
    different(lambdas(1.0)[0], lambdas(5.0)[0])
    different(scaled_by(Settings(2.0)), scaled_by(Settings(3.0)))
    same(scaled_by(Settings(2.0)), scaled_by(Settings(2.0)))
    # Defaults and keyword-only defaults.
    different(lambda items, scale=2.0: _scaled(items, scale),
              lambda items, scale=3.0: _scaled(items, scale))
    different(lambda items, *, scale=2.0: _scaled(items, scale),
              lambda items, *, scale=3.0: _scaled(items, scale))
    # Callable objects: their state, recursively through attributes and slots.
    different(Scaler(Settings(2.0)), Scaler(Settings(3.0)))
    same(Scaler(Settings(2.0)), Scaler(Settings(2.0)))
    different(Scaler(Slotted(2.0)), Scaler(Slotted(3.0)))
    different(Scaler(Settings(2.0)), Scaler(Slotted(2.0)))
    different(Scaler(torch.tensor([2.0])), Scaler(torch.tensor([3.0])))
    # Bound methods: the function and the instance's state.
    different(Scaler(Settings(2.0)).collate, Scaler(Settings(3.0)).collate)
    same(Scaler(Settings(2.0)).collate, Scaler(Settings(2.0)).collate)
    # Partials: the function (a closure here) and the arguments.
    different(functools.partial(_scaled, scale=Settings(2.0)),
              functools.partial(_scaled, scale=Settings(3.0)))
    different(functools.partial(scaled_by(2.0)), functools.partial(scaled_by(3.0)))
    same(functools.partial(scaled_by(2.0)), functools.partial(scaled_by(2.0)))
    # Plain data the function reads from its module.
    before = fingerprint_collate(_scaled_by_the_global)
    monkeypatch.setattr(f"{__name__}.SCALE", 3.0)
    assert fingerprint_collate(_scaled_by_the_global) != before

    # The code: classes of the same name and state whose __call__ differs.
    def kind(offset):
        class Collate:
            def __init__(self):
                self.scale = 2.0

            if offset:
                def __call__(self, items):
                    return _scaled(items, self.scale + 1)
            else:
                def __call__(self, items):
                    return _scaled(items, self.scale)

        return Collate()

    different(kind(0), kind(1))
    same(kind(1), kind(1))


_STABLE_COLLATE = '''
import functools
import sys

from torch.utils.data import default_collate

from pykd.cache import fingerprint_collate

PAD = 0


def collate(items, scale=2.0):
    x, y = default_collate(items)
    if y.dtype.is_floating_point and str(y.dtype) in {"torch.float16", "torch.float32"}:
        y = y.long()
    return (x * scale).masked_fill(x == PAD, 0.0), y


def factory(scale):
    return lambda items: collate(items, scale)


class Collate:
    def __init__(self, scale):
        self.scale, self.names = scale, {"a", "b", "c", "d"}

    def __call__(self, items):
        return collate(items, self.scale)


FINGERPRINTS = [fingerprint_collate(fn) for fn in (
    collate, factory(3.0), Collate(4.0), functools.partial(collate, scale=5.0),
    Collate(6.0).__call__,
)]

if __name__ == "__main__":
    for fingerprint in FINGERPRINTS:
        print(fingerprint)
'''


def test_the_collate_fingerprint_is_the_same_in_every_process(tmp_path, monkeypatch):
    """Run as a script (module ``__main__``) under two hash seeds, and imported: one key."""
    (tmp_path / "stable_collate.py").write_text(_STABLE_COLLATE)
    scripts = [subprocess.Popen([sys.executable, "stable_collate.py"], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONHASHSEED": seed})
               for seed in ("1", "2")]
    runs = [script.communicate(timeout=120)[0].splitlines() for script in scripts]
    assert [script.returncode for script in scripts] == [0, 0]
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = __import__("stable_collate").FINGERPRINTS
    assert runs[0] == runs[1] == imported
    assert len(set(imported)) == len(imported)


def test_a_collate_function_that_cannot_be_fingerprinted_needs_an_explicit_key(tmp_path):
    lock = threading.Lock()

    def locked(items):
        with lock:
            return default_collate(items)

    with (tmp_path / "log.txt").open("w") as log:
        unknowable = [locked, Scaler(Settings(log)), scaled_by(i for i in range(3)),
                      functools.partial(_scaled, scale=Settings(threading.Event()))]
        for collate_fn in unknowable:
            with pytest.raises(CacheError, match="cannot fingerprint.*collate_key"):
                fingerprint_collate(collate_fn)

    data = TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    teacher = nn.Linear(4, 3)
    path = tmp_path / "c"
    with pytest.raises(CacheError, match="collate_key"):
        TeacherCache.build(path, teacher, data, collate_fn=locked)
    assert not path.exists()
    cache = TeacherCache.build(path, teacher, data, collate_fn=locked, collate_key="locked v1",
                               dtype="float32")
    assert cache.complete
    reopened = TeacherCache.build(path, teacher, data, collate_fn=locked, collate_key="locked v1",
                                  dtype="float32")
    assert reopened.complete
    with pytest.raises(StaleCacheError, match="locked v2"):
        TeacherCache.build(path, teacher, data, collate_fn=locked, collate_key="locked v2",
                           dtype="float32")
    loader = DataLoader(data, batch_size=4, collate_fn=locked)
    with pytest.raises(CacheError, match="collate_key"):
        cache.attach(loader)
    with pytest.raises(StaleCacheError, match="collate_key"):
        cache.attach(loader, collate_key="locked v2")
    batch = next(iter(cache.attach(loader, collate_key="locked v1")))
    assert torch.equal(cache.lookup(batch.index)[0], teacher(data.tensors[0]).detach()[:4])
    with pytest.raises(ValueError, match="collate_key"):
        TeacherCache.build(tmp_path / "d", teacher, data, collate_key="")


# -------------------------------------------------------------------------------- threads


class _Switching(OrderedDict):
    """An LRU that lets other threads run in the middle of its updates, where a race would
    corrupt it: the races of a long run show up in a short test."""

    def move_to_end(self, *args, **kwargs):
        time.sleep(0)
        super().move_to_end(*args, **kwargs)
        time.sleep(0)

    def popitem(self, *args, **kwargs):
        time.sleep(0)
        item = super().popitem(*args, **kwargs)
        time.sleep(0)
        return item

    def __setitem__(self, key, value):
        time.sleep(0)
        super().__setitem__(key, value)
        time.sleep(0)


def test_lookups_from_many_threads_match_single_threaded_ones(tmp_path):
    """8 threads share a cache of 20 shards, more than stay mapped: every lookup is right and
    none raises (nor is a shard unmapped under a thread still copying from it)."""
    data = TensorDataset(torch.randn(60, 4))
    cache = TeacherCache.build(tmp_path / "c", nn.Linear(4, 6), data, top_k=3, shard_size=3)
    assert cache.num_shards == 20 > pykd._cache_files._MAPPED_SHARDS
    expected = TeacherCache.open(cache.path).lookup(torch.arange(60))
    assert isinstance(cache._store._shards, OrderedDict) and not cache._store._shards
    cache._store._shards = _Switching()

    def lookups(seed):
        rng = random.Random(seed)
        for step in range(50):
            index = torch.tensor(rng.sample(range(60), rng.randint(1, 12)))
            values, indices = cache.lookup(index)
            assert torch.equal(values, expected[0][index])
            assert torch.equal(indices, expected[1][index])
            if step % 20 == 19:
                cache.close()  # unmaps what the other threads may be reading

    with ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(lookups, seed) for seed in range(8)]:
            done.result()
    assert len(cache._store._shards) <= pykd._cache_files._MAPPED_SHARDS
    # The locks are not pickled (nor the mapped shards): a copy in another process makes its own.
    copied = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copied.lookup(torch.arange(60))[0], expected[0])

"""A teacher cache from an external engine's top-k log-probabilities
(``TeacherCache.from_logprobs``, ``read_logprobs_jsonl``), checked against a float64 reference
built from the same log-probabilities, and the caches' signals through the Distiller."""

from __future__ import annotations

import json

import pytest
import torch
from reference import logprob_bucket_kl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pykd

V, LENGTH, K = 40, 6, 5


def Windows(ids: torch.Tensor) -> TensorDataset:
    """Token windows as (input_ids, labels) pairs, the labels being the tokens themselves."""
    return TensorDataset(ids, ids)


class TinyLM(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, width)
        self.head = nn.Linear(width, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids).cumsum(1)))


def engine_dump(path, logits: torch.Tensor, temperature: float) -> list:
    """What an engine writes: per window, per position, the top-k ids and logprobs at T."""
    records = []
    with open(path, "w") as f:
        for window in logits:
            lp = torch.log_softmax(window.double() / temperature, -1)
            top = lp.topk(K, -1)
            line = {"token_ids": top.indices.tolist(), "logprobs": top.values.tolist()}
            records.append(line)
            f.write(json.dumps(line) + "\n")
    return records


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_imported_logprobs_give_the_reference_loss(tmp_path, temperature):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (7, LENGTH))
    data = Windows(ids)
    teacher_logits = torch.randn(7, LENGTH, V) * 2
    engine_dump(tmp_path / "dump.jsonl", teacher_logits, temperature)
    cache = pykd.TeacherCache.from_logprobs(
        tmp_path / "cache", data, pykd.read_logprobs_jsonl(tmp_path / "dump.jsonl"),
        temperature=temperature, vocab_size=V, source="engine-a", shard_size=3)
    assert cache.complete and cache.token_level and cache.vocab_size == V
    assert cache.signal == "topk+rest" and cache.top_k == K
    student = torch.randn(7, LENGTH, V, dtype=torch.float64)
    index = torch.arange(7)
    positions = torch.ones(7, LENGTH, dtype=torch.bool)
    values, indices, log_rest = cache.lookup(index, positions, rest=True)
    got = pykd.distillation_loss_topk(student, indices, values.double(),
                                      temperature=temperature, reduction="none",
                                      teacher_log_rest=log_rest.double())
    lines = [json.loads(x) for x in (tmp_path / "dump.jsonl").read_text().splitlines()]
    want = torch.stack([logprob_bucket_kl(student[i], torch.tensor(line["token_ids"]),
                                            torch.tensor(line["logprobs"]), temperature)
                        for i, line in enumerate(lines)])
    # float16 storage of the values and the rest: ~1e-3 relative.
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)


def test_a_dump_that_does_not_fit_the_data_is_refused(tmp_path):
    data = Windows(torch.randint(0, V, (3, LENGTH)))
    logits = torch.randn(3, LENGTH, V)
    records = engine_dump(tmp_path / "dump.jsonl", logits, 1.0)
    with pytest.raises(ValueError, match="2 records for 3 samples|fewer records"):
        pykd.TeacherCache.from_logprobs(tmp_path / "a", data, records[:2], temperature=1.0,
                                        vocab_size=V, source="e")
    short = [dict(r) for r in records]
    short[1] = {"token_ids": short[1]["token_ids"][:-1], "logprobs": short[1]["logprobs"][:-1]}
    with pytest.raises(ValueError, match="sample 1"):
        pykd.TeacherCache.from_logprobs(tmp_path / "b", data, short, temperature=1.0,
                                        vocab_size=V, source="e")
    bad = [dict(r) for r in records]
    bad[2] = {"token_ids": [[V + 1] * K] * LENGTH, "logprobs": bad[2]["logprobs"]}
    with pytest.raises(ValueError, match="outside"):
        pykd.TeacherCache.from_logprobs(tmp_path / "c", data, bad, temperature=1.0,
                                        vocab_size=V, source="e")
    positive = [dict(r) for r in records]
    positive[0] = {"token_ids": positive[0]["token_ids"],
                   "logprobs": [[0.5] * K] * LENGTH}
    with pytest.raises(ValueError, match="log-probabilities"):
        pykd.TeacherCache.from_logprobs(tmp_path / "d", data, positive, temperature=1.0,
                                        vocab_size=V, source="e")


def test_jsonl_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "dump.jsonl"
    path.write_text('{"token_ids": [[1, 2]], "logprobs": [[-0.1, -2.0]]}\n{"token_ids": 3}\n')
    records = pykd.read_logprobs_jsonl(path)
    first = next(iter(records))
    assert first[0].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="line 2"):
        list(pykd.read_logprobs_jsonl(path))


@pytest.mark.parametrize("signal", ["topk", "topk+rest", "sampled", "topk+sampled"])
def test_the_distiller_trains_from_each_signal(tmp_path, signal):
    torch.manual_seed(0)
    data = Windows(torch.randint(0, V, (12, LENGTH)))
    teacher = TinyLM(16)
    draws = 2 if signal == "topk+sampled" else None
    cache = pykd.TeacherCache.build(tmp_path / signal, teacher, data, top_k=K, signal=signal,
                                    temperature=2.0, seed=1, draws=draws, batch_size=5,
                                    shard_size=4)
    assert cache.signal == signal
    # Its manifest reads back (the key's draws, seed and temperature are checked on opening).
    assert pykd.TeacherCache.open(cache.path).signal == signal
    student = TinyLM()
    loader = cache.attach(DataLoader(data, batch_size=4, shuffle=True))
    distiller = pykd.Distiller(cache, student, causal_lm=True, temperature=2.0, alpha=0.5,
                               lr=1e-2, seed=0, progress=False, log_every=0)
    history = distiller.fit(loader, epochs=2)
    assert history is not None
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # A temperature-bound signal refuses another temperature, before anything runs.
    if signal != "topk":
        with pytest.raises(ValueError, match="temperature"):
            pykd.Distiller(cache, TinyLM(), causal_lm=True, temperature=1.0, progress=False)


def test_the_rest_reaches_the_loss(tmp_path):
    # The Distiller's loss on a built topk+rest cache is the top-k op with the cached rest; by
    # hand from the teacher's own float64 probabilities, it matches to the fp16 storage.
    torch.manual_seed(0)
    data = Windows(torch.randint(0, V, (4, LENGTH)))
    teacher = TinyLM(16)
    cache = pykd.TeacherCache.build(tmp_path / "c", teacher, data, top_k=K,
                                    signal="topk+rest", temperature=1.0, shard_size=3)
    student = TinyLM()
    batch = next(iter(cache.attach(DataLoader(data, batch_size=4))))
    distiller = pykd.Distiller(cache, student, causal_lm=True, alpha=1.0, progress=False)
    got = distiller.evaluate([batch])["loss"]
    with torch.no_grad():
        probs = torch.softmax(teacher(data.tensors[0]).double(), -1)[:, :-1]
        logits = student(data.tensors[0]).double()[:, :-1]  # position t meets word t + 1
    top = probs.topk(K, -1)
    want = logprob_bucket_kl(logits.reshape(-1, V), top.indices.reshape(-1, K),
                             top.values.log().reshape(-1, K), 1.0).mean()
    plain = pykd.distillation_loss_topk(logits, top.indices, top.values.log())
    assert got == pytest.approx(want.item(), rel=2e-3)
    assert got != pytest.approx(plain.item(), rel=1e-2)


def test_a_manifest_with_impossible_draws_is_refused(tmp_path):
    torch.manual_seed(0)
    data = Windows(torch.randint(0, V, (4, LENGTH)))
    cache = pykd.TeacherCache.build(tmp_path / "c", TinyLM(16), data, top_k=K,
                                    signal="topk+sampled", draws=2)
    manifest = cache.path / "manifest.json"
    text = json.loads(manifest.read_text())
    text["key"]["draws"] = K  # as many draws as entries: no top left
    manifest.write_text(json.dumps(text))
    with pytest.raises(pykd.CorruptCacheError, match="draws"):
        pykd.TeacherCache.open(cache.path)


def test_the_rest_on_the_label_reaches_the_loss(tmp_path):
    # rest="target": where the next word is off the cached top-k, the teacher's rest sits on
    # it. The Distiller's loss is the op's with the cached rows, and differs from the bucket's.
    torch.manual_seed(0)
    data = Windows(torch.randint(0, V, (4, LENGTH)))
    cache = pykd.TeacherCache.build(tmp_path / "c", TinyLM(16), data, top_k=K,
                                    signal="topk+rest", temperature=1.0, shard_size=3)
    student = TinyLM()
    batch = next(iter(cache.attach(DataLoader(data, batch_size=4))))
    losses = {}
    for rest in ("bucket", "target"):
        distiller = pykd.Distiller(cache, student, causal_lm=True, alpha=0.5, rest=rest,
                                   progress=False)
        losses[rest] = distiller.evaluate([batch])["loss"]
    positions = torch.ones(4, LENGTH, dtype=torch.bool)
    rows = cache.lookup(torch.arange(4), positions, rest=True)
    # Position t meets word t + 1: the last position has no label.
    values, index, log_rest = (x[:, :-1].reshape(4 * (LENGTH - 1), *x.shape[2:]) for x in rows)
    with torch.no_grad():
        logits = student(data.tensors[0])[:, :-1].reshape(-1, V)
    labels = data.tensors[0][:, 1:].reshape(-1)
    assert (~(index == labels[:, None]).any(-1)).sum() > 3  # some labels are off the top-k
    for rest, got in losses.items():
        want = pykd.distillation_loss_topk(logits, index, values, target=labels, alpha=0.5,
                                           teacher_log_rest=log_rest, rest=rest)
        assert got == pytest.approx(want.item(), rel=1e-5)
    assert losses["target"] != pytest.approx(losses["bucket"], rel=1e-3)


def test_the_rest_on_the_label_needs_a_cache_with_a_rest(tmp_path):
    torch.manual_seed(0)
    data = Windows(torch.randint(0, V, (4, LENGTH)))
    cache = pykd.TeacherCache.build(tmp_path / "c", TinyLM(16), data, top_k=K)
    with pytest.raises(ValueError, match="a topk cache has no rest"):
        pykd.Distiller(cache, TinyLM(), causal_lm=True, rest="target", progress=False)
    with pytest.raises(ValueError, match="live teacher"):
        pykd.Distiller(TinyLM(16), TinyLM(), causal_lm=True, rest="target", progress=False)
    with pytest.raises(ValueError, match="rest must be one of"):
        pykd.Distiller(cache, TinyLM(), causal_lm=True, rest="label", progress=False)

"""The teacher signals a cache stores (pykd._cache_signals): exact rests, reproducible draws,
compact indices and external log-probabilities."""

from __future__ import annotations

import pytest
import torch

import pykd
from pykd._cache_signals import (
    check_signal,
    encode_rows,
    from_logprobs,
    index_bytes,
    pack_indices,
    shard_generator,
    unpack_indices,
)


@pytest.mark.parametrize("vocab,width", [(2, 2), (65_536, 2), (65_537, 3), (128_256, 3),
                                         (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_indices_take_the_fewest_bytes_and_round_trip(vocab, width):
    assert index_bytes(vocab) == width
    idx = torch.randint(0, vocab, (7, 5), dtype=torch.int64)
    idx[0, 0], idx[0, 1] = 0, vocab - 1
    stored = pack_indices(idx.numpy(), vocab)
    assert stored.nbytes == 7 * 5 * width
    assert torch.equal(unpack_indices(stored, vocab), idx)
    # Little-endian bytes: the file is the same on any machine.
    assert stored.tobytes()[:width] == b"\x00" * width


def test_top_k_plus_rest_is_the_teachers_mass_off_the_top_k():
    logits = torch.randn(6, 50) * 3
    values, index, log_rest = encode_rows(logits, "topk+rest", 4, 2.0)
    p = torch.softmax(logits.double() / 2.0, -1)
    want = torch.log(1 - p.gather(-1, index).sum(-1))
    torch.testing.assert_close(log_rest.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, logits.topk(4, -1).values)
    # k = V: nothing is left off (but float64 rounding: at most ~1e-15).
    assert bool((encode_rows(logits, "topk+rest", 50, 1.0)[2] < -30).all())


def test_rest_makes_the_cached_loss_match_the_bucketed_dense_one():
    # From stored (fp32) signal to the op: with the rest, a student whose tail is the teacher's
    # gets the dense kl exactly; without it, the plain top-k loss differs.
    teacher = torch.randn(5, 40, dtype=torch.float64) * 2
    values, index, log_rest = encode_rows(teacher, "topk+rest", 6, 1.0)
    student = teacher + 0.3
    student.scatter_(-1, index, torch.randn(5, 6, dtype=torch.float64))
    dense = pykd.distillation_loss(student, teacher)
    cached = pykd.distillation_loss_topk(student, index, values.double(),
                                         teacher_log_rest=log_rest.double())
    plain = pykd.distillation_loss_topk(student, index, values.double())
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, dense, rtol=1e-3)


def test_draws_do_not_depend_on_batching_and_follow_the_teacher():
    logits = torch.randn(40, 30) * 2
    whole = encode_rows(logits, "sampled", 16, 1.0, shard_generator(3, 1))
    g = shard_generator(3, 1)
    parts = [encode_rows(logits[a:b], "sampled", 16, 1.0, g) for a, b in ((0, 7), (7, 40))]
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([p[i] for p in parts]))
    assert whole[2] is None
    other = encode_rows(logits, "sampled", 16, 1.0, shard_generator(3, 2))
    assert not torch.equal(whole[1], other[1])
    values, index, _ = whole
    # Each row: distinct classes, counts summing to k, padding at -inf after the drawn ones.
    counts = values.exp()
    assert torch.allclose(counts.sum(-1), torch.full((40,), 16.0), atol=1e-4)
    assert all(len(set(r.tolist())) == 16 for r in index)
    drawn = torch.isfinite(values)
    assert bool((drawn[:, :-1] | ~drawn[:, 1:]).all())  # no drawn class after a padding slot


def test_draws_estimate_the_teacher_without_bias():
    # Averaged over many shards' draws, count / k approaches softmax(logits / T).
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    T, k, shards = 2.0, 4, 4000
    total = torch.zeros(5, dtype=torch.float64)
    for j in range(shards):
        values, index, _ = encode_rows(logits, "sampled", k, T, shard_generator(0, j))
        total.index_add_(0, index[0], (values[0].double() / T).exp())
    p = torch.softmax(logits[0].double() / T, -1)
    mean = total / (shards * k)
    # Binomial standard error of each class's frequency: sqrt(p (1 - p) / (shards k)).
    se = (p * (1 - p) / (shards * k)).sqrt()
    assert bool(((mean - p).abs() < 5 * se).all()), (mean, p)


def test_sampled_values_are_at_the_build_temperature():
    logits = torch.randn(3, 20)
    values, index, _ = encode_rows(logits, "sampled", 6, 2.5, shard_generator(0, 0))
    counts = (values / 2.5).exp()
    finite = torch.isfinite(values)
    assert torch.allclose(counts[finite], counts[finite].round(), atol=1e-4)


def test_top_and_tail_draws_are_exact_on_the_top_and_follow_the_tail():
    logits = torch.randn(30, 25) * 2
    logits[0, 3:] = float("-inf")  # a row whose top (3 classes) holds every bit of its mass
    T, k, draws = 1.5, 8, 5
    values, index, rest = encode_rows(logits, "topk+sampled", k, T, shard_generator(1, 0), draws)
    assert rest is None and values.shape == index.shape == (30, k)
    assert all(len(set(r.tolist())) == k for r in index)  # top and tail classes distinct
    p = torch.softmax(logits.double() / T, -1)
    top = logits.topk(k - draws, -1).indices
    assert torch.equal(index[:, : k - draws], top)
    # The top entries carry the teacher's own probabilities; all entries sum to one.
    torch.testing.assert_close((values[:, : k - draws].double() / T).exp(), p.gather(-1, top),
                               rtol=1e-5, atol=1e-7)
    q = (values.double() / T).exp()
    torch.testing.assert_close(q.sum(-1), torch.ones(30, dtype=torch.float64), rtol=1e-5,
                               atol=1e-6)
    assert bool((values[0, k - draws:] == float("-inf")).all())
    # Batching does not change the draws.
    g = shard_generator(1, 0)
    parts = [encode_rows(logits[a:b], "topk+sampled", k, T, g, draws) for a, b in ((0, 9), (9, 30))]
    assert torch.equal(index, torch.cat([x[1] for x in parts]))


def test_tail_draws_estimate_the_teacher_without_bias():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    T, k, draws, shards = 1.0, 4, 2, 4000
    total = torch.zeros(6, dtype=torch.float64)
    for j in range(shards):
        values, index, _ = encode_rows(logits, "topk+sampled", k, T, shard_generator(0, j), draws)
        total.index_add_(0, index[0], (values[0].double() / T).exp())
    p = torch.softmax(logits[0].double(), -1)
    mean = total / shards
    torch.testing.assert_close(mean[:2], p[:2], rtol=1e-5, atol=1e-7)  # the top: exact
    rest = p[2:].sum()
    # Tail class c's estimate is rest * count / draws: standard error rest sqrt(f (1 - f) /
    # (draws shards)) with f its share of the tail.
    f = p[2:] / rest
    se = rest * (f * (1 - f) / (draws * shards)).sqrt()
    assert bool(((mean[2:] - p[2:]).abs() < 5 * se).all()), (mean, p)


def test_external_logprobs_give_the_same_signal_as_the_logits():
    logits = torch.randn(8, 60) * 2
    for T in (1.0, 0.7):
        values, index, log_rest = encode_rows(logits, "topk+rest", 5, T)
        lp = torch.log_softmax(logits.double() / T, -1).gather(-1, index)
        v2, i2, r2 = from_logprobs(index, lp, T)
        torch.testing.assert_close(r2, log_rest, rtol=1e-5, atol=1e-5)
        student = torch.randn(8, 60)
        a = pykd.distillation_loss_topk(student, index, values, temperature=T,
                                        teacher_log_rest=log_rest)
        b = pykd.distillation_loss_topk(student, i2, v2, temperature=T, teacher_log_rest=r2)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_signals_and_logprobs_are_refused():
    with pytest.raises(ValueError, match="signal must be one of"):
        check_signal("top", 4, 1.0)
    with pytest.raises(ValueError, match="needs top_k"):
        check_signal("sampled", None, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        check_signal("topk+rest", 4, 0.0)
    with pytest.raises(ValueError, match="top_k needs a signal"):
        check_signal(None, 4, 1.0)
    for draws in (None, 0, 4, True):
        with pytest.raises(ValueError, match="needs draws"):
            check_signal("topk+sampled", 4, 1.0, draws)
    with pytest.raises(ValueError, match="draws belongs"):
        check_signal("sampled", 4, 1.0, 2)
    with pytest.raises(ValueError, match="log-probabilities"):
        from_logprobs(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.5, -1.0]]), 1.0)


"""pykd.augment: the transfer-set augmentation of Tang et al. (2019) on token ids."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import pykd
from pykd import augment as A
from pykd.augment import _core as core

CLS, SEP, PAD, MASK = 1, 2, 0, 3
SPECIAL = [CLS, SEP, PAD]
ONES = torch.ones(2, 3, dtype=torch.long)  # a padded batch with no padding, for refusals


def corpus(n=40, seed=0, low=10, high=60, min_len=1, max_len=12):
    """``n`` sentences ``[CLS] w... [SEP]`` with words in ``[low, high)``."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [[CLS, *torch.randint(low, high, (k,), generator=g).tolist(), SEP] for k in lens]


def padded(seqs, side="right"):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


def content(seq):
    return [t for t in seq if t not in SPECIAL]


def specials_of(seq):
    return [t for t in seq if t in SPECIAL]


def is_slice(part, whole):
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def default_set(seqs, **kw):
    args = dict(copies=20, mask_id=MASK, special_ids=SPECIAL, seed=0)
    return A.transfer_set(seqs, **{**args, **kw})


def replaced_set(seqs, vocab, copies=20):
    """Every copy with every non-special token replaced from ``vocab``, nothing else done."""
    return default_set(
        seqs, copies=copies, p_mask=0, p_replace=1.0, p_ngram=0, vocab=vocab, dedupe=False
    )


# ---------------------------------------------------------------------- seeds and reproducibility


def test_same_seed_same_output_everywhere():
    seqs = corpus()
    a, b = default_set(seqs, seed=7), default_set(seqs, seed=7)
    assert a.ids == b.ids and torch.equal(a.sources, b.sources)
    one = dict(
        p_mask=0.3,
        p_replace=0.3,
        p_ngram=0.5,
        mask_id=MASK,
        special_ids=SPECIAL,
        vocab=A.unigram_counts(seqs, special_ids=SPECIAL),
    )
    assert A.augment(seqs[0], seed=3, **one) == A.augment(seqs[0], seed=3, **one)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draws1 = [A.augment(s, seed=g1, **one) for s in seqs]
    draws2 = [A.augment(s, seed=g2, **one) for s in seqs]
    assert draws1 == draws2
    ids, mask = padded(seqs)
    batch = dict(mask_id=MASK, special_ids=SPECIAL, pad_id=PAD, vocab=one["vocab"], seed=11)
    x1, m1 = A.augment_batch(ids, mask, **batch)
    x2, m2 = A.augment_batch(ids, mask, **batch)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)


def test_different_seeds_differ_and_a_generator_advances():
    seqs = corpus()
    assert default_set(seqs, seed=0).ids != default_set(seqs, seed=1).ids
    g = torch.Generator().manual_seed(0)
    kw = dict(p_mask=0.5, p_replace=0.0, p_ngram=0.0, mask_id=MASK, special_ids=SPECIAL)
    long = [CLS, *range(10, 40), SEP]
    assert A.augment(long, seed=g, **kw) != A.augment(long, seed=g, **kw)


def test_the_global_rng_is_neither_used_nor_read():
    seqs = corpus()
    state = torch.get_rng_state()
    first = default_set(seqs, seed=4)
    A.augment(seqs[0], mask_id=MASK, vocab=[1.0] * 70, special_ids=SPECIAL, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # a different global state changes nothing
    assert default_set(seqs, seed=4).ids == first.ids


def test_single_rules_match_augment_with_the_other_probabilities_zero():
    seq = [CLS, *range(10, 30), SEP]
    vocab = [0.0] * 10 + [1.0] * 50
    masked = A.mask_tokens(seq, MASK, p=0.4, special_ids=SPECIAL, seed=9)
    assert masked == A.augment(
        seq, p_mask=0.4, p_replace=0, p_ngram=0, mask_id=MASK, special_ids=SPECIAL, seed=9
    )
    replaced = A.replace_tokens(seq, vocab, p=0.4, special_ids=SPECIAL, seed=9)
    assert replaced == A.augment(
        seq, p_mask=0, p_replace=0.4, p_ngram=0, vocab=vocab, special_ids=SPECIAL, seed=9
    )
    cut = A.sample_ngram(seq, special_ids=SPECIAL, seed=9)
    assert cut == A.augment(seq, p_mask=0, p_replace=0, p_ngram=1.0, special_ids=SPECIAL, seed=9)
    assert masked != seq and replaced != seq and cut != seq


# --------------------------------------------------------------------------------------- rules


def test_zero_probabilities_are_the_identity():
    seqs = corpus()
    zero = dict(p_mask=0.0, p_replace=0.0, p_ngram=0.0, special_ids=SPECIAL)
    for s in seqs:
        assert A.augment(s, seed=0, **zero) == s
    t = torch.tensor(seqs[3], dtype=torch.int32)
    out = A.augment(t, seed=0, **zero)
    assert out.dtype == torch.int32 and torch.equal(out, t)
    res = A.transfer_set(seqs, copies=3, dedupe=False, seed=0, **zero)
    assert res.ids == [s for s in seqs for _ in range(3)]
    ids, mask = padded(seqs)
    x, m = A.augment_batch(ids, mask, pad_id=PAD, seed=0, **zero)
    assert torch.equal(x, ids) and torch.equal(m, mask)


def test_p_mask_one_masks_every_non_special_token_and_nothing_else():
    seq = [CLS, 10, 11, 12, SEP, 13, 14, SEP, PAD, PAD]
    out = A.mask_tokens(seq, MASK, p=1.0, special_ids=SPECIAL, seed=0)
    assert out == [CLS, MASK, MASK, MASK, SEP, MASK, MASK, SEP, PAD, PAD]
    huge = 2**40  # ids too large for the lookup table of special ids
    out = A.mask_tokens([huge, 10, huge + 1, SEP], MASK, p=1.0, special_ids=[huge, SEP], seed=0)
    assert out == [huge, MASK, MASK, SEP]
    res = default_set(corpus(), p_mask=1.0, p_replace=0.0, p_ngram=0.0, dedupe=False)
    for s, src in zip(res.ids, res.sources.tolist()):
        source = corpus()[src]
        assert s == [t if t in SPECIAL else MASK for t in source]


def test_special_ids_are_never_touched():
    # Every token masked or replaced (p_mask + p_replace = 1), every example cut to an n-gram:
    # the special tokens must all survive, in order, and nothing else may be one.
    seqs = [[CLS, *c[1:-1], SEP, *reversed(c[1:-1]), SEP] for c in corpus(max_len=8)]
    vocab = torch.ones(70)  # gives weight to the special ids too: they must still not be drawn
    res = default_set(seqs, p_mask=0.5, p_replace=0.5, p_ngram=1.0, vocab=vocab, dedupe=False)
    for s, src in zip(res.ids, res.sources.tolist()):
        assert specials_of(s) == specials_of(seqs[src])
    touched = default_set(seqs, p_mask=0.5, p_replace=0.5, p_ngram=0.0, vocab=vocab, dedupe=False)
    for s, src in zip(touched.ids, touched.sources.tolist()):
        for new, old in zip(s, seqs[src]):
            assert (new == old) if old in SPECIAL else (new not in SPECIAL)


def test_masking_and_replacement_are_exclusive_with_the_paper_rates():
    seq = [CLS, *([50] * 4000), SEP]
    vocab = [0.0] * 60 + [1.0]  # replacements are 60, so each rule is counted apart
    out = A.augment(
        seq,
        p_mask=0.2,
        p_replace=0.3,
        p_ngram=0.0,
        mask_id=MASK,
        vocab=vocab,
        special_ids=SPECIAL,
        seed=0,
    )
    counts = Counter(out[1:-1])
    assert set(counts) <= {MASK, 60, 50}
    assert abs(counts[MASK] / 4000 - 0.2) < 0.03
    assert abs(counts[60] / 4000 - 0.3) < 0.03


@pytest.mark.parametrize("ngram_range", [(1, 5), (2, 3), (4, 4)])
def test_ngrams_are_contiguous_pieces_within_the_bounds(ngram_range):
    seqs = corpus(max_len=10)
    res = default_set(
        seqs, p_mask=0.0, p_replace=0.0, p_ngram=1.0, ngram_range=ngram_range, dedupe=False
    )
    lo, hi = ngram_range
    seen = Counter()
    for s, src in zip(res.ids, res.sources.tolist()):
        words, source = content(s), content(seqs[src])
        assert min(lo, len(source)) <= len(words) <= min(hi, len(source))
        assert is_slice(words, source)
        assert s == [CLS, *words, SEP]
        if len(source) >= hi:
            seen[len(words)] += 1
    assert set(seen) == set(range(lo, hi + 1))  # every n of the range is drawn


def test_ngram_sampling_rate_and_n_are_uniform():
    seq = [CLS, *range(10, 30), SEP]
    res = default_set([seq], copies=4000, p_mask=0, p_replace=0, p_ngram=0.25, dedupe=False)
    lengths = Counter(len(s) - 2 for s in res.ids)
    assert abs(1 - lengths[20] / 4000 - 0.25) < 0.03
    for n in range(1, 6):
        assert abs(lengths[n] / 4000 - 0.05) < 0.015


def test_replacements_come_only_from_the_vocabulary():
    seqs = corpus()
    allowed = {20, 33, 47}
    weights = torch.zeros(100)
    weights[[20, 33, 47]] = torch.tensor([1.0, 2.0, 5.0])
    weights[[CLS, SEP, MASK]] = 100.0  # special ids and the mask id are never drawn
    res = replaced_set(seqs, weights)
    drawn = Counter(t for s in res.ids for t in content(s))
    assert set(drawn) == allowed
    assert drawn[47] > drawn[33] > drawn[20]  # in proportion to the weights
    counts = A.unigram_counts([[CLS, 10, 10, 11, SEP]], special_ids=SPECIAL)
    out = A.replace_tokens([CLS, 30, 31, 32, SEP], counts, p=1.0, special_ids=SPECIAL, seed=0)
    assert set(out[1:-1]) <= {10, 11}


def test_default_vocabulary_is_the_corpus_unigram():
    seqs = [[CLS, 10, 11, SEP], [CLS, 12, SEP]]
    res = A.transfer_set(
        seqs, copies=50, p_mask=0, p_replace=1.0, p_ngram=0, special_ids=SPECIAL, seed=0
    )
    assert {t for s in res.ids for t in content(s)} == {10, 11, 12}


def test_unigram_counts():
    seqs = corpus()
    expected = Counter(t for s in seqs for t in s if t not in SPECIAL)
    counts = A.unigram_counts(seqs, special_ids=SPECIAL, vocab_size=80)
    assert counts.shape == (80,) and counts.dtype == torch.long
    assert {i: c for i, c in enumerate(counts.tolist()) if c} == dict(expected)
    ids, mask = padded(seqs, "left")
    assert torch.equal(
        A.unigram_counts(ids, attention_mask=mask, special_ids=[CLS, SEP], vocab_size=80), counts
    )
    assert torch.equal(
        A.unigram_counts(ids, pad_id=PAD, special_ids=[CLS, SEP], vocab_size=80), counts
    )


def test_context_vocab_draws_words_seen_after_the_same_word():
    seqs = [[CLS, 10, 20, SEP], [CLS, 10, 21, SEP], [CLS, 11, 30, SEP], [CLS, 12, 40, 41, SEP]]
    vocab = A.context_vocab(seqs, special_ids=SPECIAL)
    res = replaced_set([[CLS, 10, 99, SEP], [CLS, 11, 98, SEP]], vocab, copies=200)
    firsts, seconds = Counter(), {0: Counter(), 1: Counter()}
    for s, src in zip(res.ids, res.sources.tolist()):
        firsts[s[1]] += 1
        seconds[src][s[2]] += 1
    assert set(firsts) == {10, 11, 12}  # words seen after CLS
    assert firsts[10] > firsts[11] and firsts[10] > firsts[12]  # 10 twice as often
    assert set(seconds[0]) == {20, 21}  # the source's left neighbour is 10
    assert set(seconds[1]) == {30}  # ... and 11
    # A rarer context than min_count (and an unseen one) falls back to the unigram counts.
    rare = A.context_vocab(seqs, special_ids=SPECIAL, min_count=2)
    out = replaced_set([[CLS, 11, 98, SEP], [CLS, 99, 98, SEP]], rare, copies=300)
    unigram = {10, 11, 12, 20, 21, 30, 40, 41}
    after = {
        src: {s[2] for s, x in zip(out.ids, out.sources.tolist()) if x == src} for src in (0, 1)
    }
    assert after[0] == unigram and after[1] == unigram


# ------------------------------------------------------------------------- the transfer set


def test_sources_point_at_the_example_each_sequence_comes_from():
    # Each example has its own word range, so a sequence's words show where it came from.
    seqs = [
        [CLS, *range(100 * i + 10, 100 * i + 10 + k), SEP] for i, k in enumerate([5, 1, 8, 3, 6])
    ]
    kw = dict(copies=7, p_mask=0.2, p_replace=0.0, p_ngram=0.5)
    res = default_set(seqs, dedupe=False, **kw)
    assert res.sources.tolist() == [i for i in range(5) for _ in range(7)]
    for s, src in zip(res.ids, res.sources.tolist()):
        assert {t // 100 for t in content(s) if t != MASK} <= {src}
    deduped = default_set(seqs, **kw)
    assert deduped.sources.tolist() == sorted(deduped.sources.tolist())
    ones = [s for s, src in zip(deduped.ids, deduped.sources.tolist()) if src == 1]
    assert sorted(ones) == sorted(
        {tuple(s): s for s, src in zip(res.ids, res.sources.tolist()) if src == 1}.values()
    )
    assert set(map(tuple, ones)) <= {(CLS, 110, SEP), (CLS, MASK, SEP)}


def test_dedupe_keeps_the_first_of_each_sequence_per_source():
    seqs = [[CLS, 10, 11, SEP], [CLS, 10, 11, SEP], [CLS, *range(20, 35), SEP]]
    kw = dict(
        copies=30, p_mask=0.3, p_replace=0.0, p_ngram=0.3, mask_id=MASK, special_ids=SPECIAL, seed=5
    )
    every = A.transfer_set(seqs, dedupe=False, **kw)
    once = A.transfer_set(seqs, dedupe=True, **kw)
    expected, seen = [], set()
    for s, src in zip(every.ids, every.sources.tolist()):
        if (src, tuple(s)) not in seen:
            seen.add((src, tuple(s)))
            expected.append((src, s))
    assert list(zip(once.sources.tolist(), once.ids)) == expected
    assert len(once.ids) < len(every.ids)
    # the two identical examples keep their own copies (dedupe is per source, as in the paper)
    group = {src: [s for x, s in expected if x == src] for src in (0, 1)}
    assert (
        group[0]
        and group[1]
        and len(group[0]) + len(group[1]) > len(set(map(tuple, group[0] + group[1])))
    )


def test_dedupe_is_exact_when_hashes_collide(monkeypatch):
    rows = torch.tensor([[5, 7, 0], [5, 6, 0], [5, 6, 0], [5, 7, 0], [9, 9, 9], [5, 0, 0]])
    lens = torch.tensor([2, 2, 2, 2, 3, 2])
    first = core._first_occurrences
    assert first(rows, lens, 3).tolist() == [True, True, False, True, True, True]
    monkeypatch.setattr(core, "_row_hash", lambda r, n: torch.zeros(r.shape[0], dtype=torch.long))
    assert first(rows, lens, 3).tolist() == [True, True, False, True, True, True]
    # [5, 0] of length 2 is not [5] of length 1, though both rows pad with 0
    assert first(torch.tensor([[5, 0], [5, 0]]), torch.tensor([2, 1]), 2).all()


def test_include_original_and_zero_copies():
    seqs = corpus(n=6)
    res = default_set(seqs, copies=4, include_original=True, p_mask=0.5)
    for i, s in enumerate(seqs):
        group = [x for x, src in zip(res.ids, res.sources.tolist()) if src == i]
        assert group[0] == s and s not in group[1:]
    empty = default_set(seqs, copies=0)
    assert empty.ids == [] and empty.sources.numel() == 0
    only = default_set(seqs, copies=0, include_original=True)
    assert only.ids == seqs and only.sources.tolist() == list(range(6))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_input_keeps_its_width_and_matches_the_list_result(side):
    seqs = corpus()
    ids, mask = padded(seqs, side)
    ids32 = ids.to(torch.int32)
    kw = dict(copies=5, mask_id=MASK, special_ids=[CLS, SEP], seed=2, p_ngram=0.6)
    flat = A.transfer_set(seqs, **kw)
    res = A.transfer_set(ids32, attention_mask=mask, pad_id=PAD, **kw)
    assert res.ids.shape == (len(flat.ids), ids.shape[1]) and res.ids.dtype == torch.int32
    assert res.attention_mask.dtype == mask.dtype
    assert torch.equal(res.sources, flat.sources)
    for row, m, expected in zip(res.ids.tolist(), res.attention_mask.tolist(), flat.ids):
        real = [t for t, k in zip(row, m) if k]
        assert real == expected
        assert all(t == PAD for t, k in zip(row, m) if not k)
        pads = m.index(1) if side == "left" else len(m) - m[::-1].index(1) - 1
        assert (m[pads:] if side == "left" else m[: pads + 1]) == [1] * len(expected)
    # pad_id alone marks the padding too
    again = A.transfer_set(ids32, pad_id=PAD, **kw)
    assert torch.equal(again.ids, res.ids)


def test_augment_batch_keeps_shape_and_padding():
    seqs = corpus(n=64)
    ids, mask = padded(seqs)
    x, m = A.augment_batch(
        ids,
        mask.bool(),
        p_mask=0.2,
        p_replace=0.0,
        p_ngram=0.5,
        mask_id=MASK,
        special_ids=[CLS, SEP],
        pad_id=PAD,
        seed=0,
    )
    assert x.shape == ids.shape and m.dtype == torch.bool
    assert torch.equal(x[~m], torch.full_like(x[~m], PAD))
    assert (m.sum(1) <= mask.sum(1)).all() and (m.sum(1) < mask.sum(1)).any()
    assert (x[:, 0] == CLS).all() and ((x == SEP).sum(1) == 1).all()


def test_progress_bar_and_tensor_sequences(capsys):
    seqs = [torch.tensor(s) for s in corpus(n=5)]
    res = default_set(seqs, copies=2, progress=True)
    assert "transfer set" in capsys.readouterr().err
    assert all(isinstance(s, list) for s in res.ids)


def test_augment_is_exported():
    assert pykd.augment is A and "augment" in pykd.__all__


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(p_mask=1.5), ValueError, r"p_mask must be in \[0, 1\], got 1.5"),
        (dict(p_replace=-0.1), ValueError, r"p_replace must be in \[0, 1\]"),
        (dict(p_ngram=float("nan")), ValueError, r"p_ngram must be in \[0, 1\]"),
        (dict(p_mask="0.1"), TypeError, "p_mask must be a real number"),
        (dict(p_mask=0.6, p_replace=0.6), ValueError, r"p_mask \+ p_replace must be <= 1"),
        (dict(copies=-1), ValueError, "copies must be >= 0, got -1"),
        (dict(copies=2.0), TypeError, "copies must be an int"),
        (dict(mask_id=None), ValueError, "mask_id is required when p_mask > 0"),
        (dict(mask_id=-3), ValueError, "mask_id must be >= 0"),
        (dict(vocab=torch.zeros(50)), ValueError, "empty vocabulary"),
        (dict(vocab=torch.ones(3)), ValueError, "empty vocabulary"),  # only special ids
        (dict(vocab=torch.tensor([1.0, -1.0])), ValueError, "finite and >= 0"),
        (dict(vocab=torch.ones(2, 3)), ValueError, "must be 1-d"),
        (dict(vocab="abc"), TypeError, "vocab must be"),
        (dict(ngram_range=(0, 5)), ValueError, "1 <= low <= high"),
        (dict(ngram_range=(3, 2)), ValueError, "1 <= low <= high"),
        (dict(ngram_range=5), TypeError, "ngram_range must be a pair"),
        (dict(seed=1.5), TypeError, "seed must be an int, a torch.Generator or None"),
        (dict(special_ids=[1, "x"]), TypeError, "special_ids must be ints"),
        (dict(dedupe=1), TypeError, "dedupe must be True or False"),
        (dict(padding_side="top"), ValueError, "padding_side must be"),
    ],
)
def test_transfer_set_refuses_bad_arguments(kwargs, error, match):
    args = {**dict(copies=2, mask_id=MASK, special_ids=SPECIAL), **kwargs}
    with pytest.raises(error, match=match):
        A.transfer_set([[CLS, 10, 11, SEP]], **args)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.tensor([[1, 2]]), ValueError, "must be a 1-d tensor"),
        (torch.tensor(5), ValueError, "must be a 1-d tensor"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer token ids, got dtype torch.float32"),
        (torch.tensor([True]), TypeError, "integer token ids"),
        ([1, 2.5], TypeError, "must hold ints"),
        ([[1, 2], [3]], ValueError, "one sequence of ints"),
        ("abc", TypeError, "ids must be a 1-d integer tensor or a list of ints"),
        ([4, -1], ValueError, "negative token id"),
    ],
)
def test_single_sequence_functions_refuse_bad_ids(ids, error, match):
    with pytest.raises(error, match=match):
        A.mask_tokens(ids, MASK, p=0.5, seed=0)


@pytest.mark.parametrize(
    "sequences, kwargs, error, match",
    [
        (torch.tensor([1, 2, 3]), {}, ValueError, r"pass \[ids\]"),
        ([[1, 2], 3], {}, TypeError, r"sequences\[1\] must be a list of ids"),
        ([[1, 2], [3, 4.0]], {}, TypeError, "must hold ints"),
        (ONES, dict(attention_mask=torch.ones(2, 4)), ValueError, "attention_mask has shape"),
        (ONES, dict(attention_mask=torch.full((2, 3), 2)), ValueError, "only 0 and 1"),
        ([[1, 2]], dict(attention_mask=torch.ones(1, 2)), ValueError, "goes with a 2-d tensor"),
        (ONES, dict(p_ngram=0.5), ValueError, "pad_id is required"),  # no padding to copy
    ],
)
def test_transfer_set_refuses_bad_sequences(sequences, kwargs, error, match):
    with pytest.raises(error, match=match):
        A.transfer_set(sequences, p_replace=0, p_mask=0, **kwargs)


def test_other_refusals():
    with pytest.raises(ValueError, match="vocab is required when p_replace > 0"):
        A.augment([1, 2], p_replace=0.5, p_mask=0.0)
    with pytest.raises(ValueError, match="vocab is required when p_replace > 0"):
        A.augment_batch(ONES, p_mask=0.0)
    with pytest.raises(TypeError, match="ids must be a 2-d integer tensor"):
        A.augment_batch([[1, 2]], p_replace=0.0, p_mask=0.0)
    with pytest.raises(ValueError, match="empty vocabulary"):  # a corpus of special ids only
        A.transfer_set([[CLS, SEP]], special_ids=SPECIAL, p_mask=0)
    with pytest.raises(ValueError, match="vocab_size is 5 but the sequences hold id 9"):
        A.unigram_counts([[9]], vocab_size=5)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        A.context_vocab([[1, 2]], min_count=0)
    with pytest.raises(ValueError, match="mask_id is required"):
        A.mask_tokens([1, 2], None, p=0.0)

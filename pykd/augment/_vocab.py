"""Replacement vocabularies: weights per id and :class:`ContextVocab`, and their samplers.

Above ``_args`` and ``_data``. :func:`unigram_counts` and :func:`context_vocab` build a
vocabulary from a corpus; :func:`_sampler` turns one into the object that draws replacements
for a call, with that call's special ids taken out.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Union

import torch

from pykd.augment._args import IdsLike, _is_int, _is_sequence, _special_tensor, _token_id
from pykd.augment._data import _ragged, _starts, _vocab_size


def _fill_ids(t: torch.Tensor, ids: torch.Tensor, value: object) -> torch.Tensor:
    """``t[i] = value`` for each id ``i`` of ``ids`` that indexes ``t`` (in place); ``t``."""
    t[ids[(ids >= 0) & (ids < t.numel())]] = value
    return t


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Where each id's run starts in a list sorted by id, given ``counts`` per id, and the end."""
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


class ContextVocab:
    """Replacement words conditioned on the left neighbour, built by :func:`context_vocab`.

    A replaced token whose left neighbour (in the source sequence) is ``a`` is drawn from the
    tokens that follow ``a`` in the corpus, in proportion to how often they do (a bigram
    distribution). This approximates Tang et al.'s part-of-speech-guided replacement without a
    tagger. A left neighbour seen fewer than ``min_count`` times (or never, or no neighbour at
    all) falls back to the corpus's unigram distribution, ``counts``.

    Attributes:
        counts: ``(V,)`` int64 unigram counts of the corpus (0 for special ids).
        min_count: the fewest followers a context needs to be used.
        vocab_size: ``V``.
    """

    def __init__(
        self,
        offsets: torch.Tensor,
        followers: torch.Tensor,
        counts: torch.Tensor,
        min_count: int = 1,
    ) -> None:
        self.offsets = offsets  # (V + 1,) followers of id a: followers[offsets[a]:offsets[a+1]]
        self.followers = followers
        self.counts = counts
        self.min_count = min_count

    @property
    def vocab_size(self) -> int:
        return self.counts.numel()

    def __repr__(self) -> str:
        return (
            f"ContextVocab(vocab_size={self.vocab_size}, pairs={self.followers.numel()}, "
            f"min_count={self.min_count})"
        )


VocabLike = Union[torch.Tensor, Sequence[float], ContextVocab]


class _Unigram:
    """Inverse-CDF sampling from non-negative weights, with special ids at weight 0."""

    def __init__(self, fn: str, weights: torch.Tensor, specials: torch.Tensor, what: str) -> None:
        w = _fill_ids(weights.to(torch.float64).clone(), specials, 0.0)
        nonzero = torch.nonzero(w).reshape(-1)
        if nonzero.numel() == 0:
            raise ValueError(
                f"{fn}: empty vocabulary: {what} gives no weight to any id outside "
                "special_ids, so there is nothing to draw a replacement from"
            )
        self.cdf = torch.cumsum(w, 0)
        self.total = float(self.cdf[-1])
        self.last = int(nonzero[-1])

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        # The first index whose cdf exceeds u * total never has weight 0 (its cdf would equal
        # the previous one); the clamp only guards against rounding at the very top.
        return torch.searchsorted(self.cdf, u * self.total, right=True).clamp_(max=self.last)

    def draw(self, prev: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.sample(torch.rand(prev.numel(), generator=g, dtype=torch.float64))


class _Context:
    """Sampling from a :class:`ContextVocab` with the special ids of this call taken out."""

    def __init__(self, fn: str, vocab: ContextVocab, specials: torch.Tensor) -> None:
        v = vocab.vocab_size
        prevs = torch.repeat_interleave(torch.arange(v), vocab.offsets.diff())
        keep = ~torch.isin(vocab.followers, specials)
        self.followers = vocab.followers[keep]
        self.offsets = _offsets(torch.bincount(prevs[keep], minlength=v))
        self.min_count = vocab.min_count
        self.unigram = _Unigram(fn, vocab.counts, specials, "the ContextVocab")

    def draw(self, prev: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        k = prev.numel()
        u_context = torch.rand(k, generator=g, dtype=torch.float64)
        u_unigram = torch.rand(k, generator=g, dtype=torch.float64)
        v = self.offsets.numel() - 1
        known = (prev >= 0) & (prev < v)
        a = torch.where(known, prev, 0)
        start = self.offsets[a]
        count = self.offsets[a + 1] - start
        count = torch.where(known & (count >= self.min_count), count, 0)
        fallback = self.unigram.sample(u_unigram)
        if self.followers.numel() == 0:
            return fallback
        pick = start + torch.minimum((u_context * count).long(), (count - 1).clamp(min=0))
        from_context = self.followers[pick.clamp_(max=self.followers.numel() - 1)]
        return torch.where(count > 0, from_context, fallback)


def _sampler(fn: str, vocab: object, specials: torch.Tensor, mask_id: int | None):
    if mask_id is not None:  # drawing the mask token would be masking, not replacing
        specials = torch.cat([specials, torch.tensor([mask_id])])
    if isinstance(vocab, ContextVocab):
        return _Context(fn, vocab, specials)
    if isinstance(vocab, torch.Tensor):
        w = vocab.detach().cpu()
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"{fn}: vocab weights must be real numbers, got dtype {w.dtype}")
    elif _is_sequence(vocab):
        bad = next(
            (x for x in vocab if isinstance(x, bool) or not isinstance(x, numbers.Real)), None
        )
        if bad is not None:
            raise TypeError(f"{fn}: vocab weights must be real numbers, got {bad!r}")
        w = torch.tensor([float(x) for x in vocab], dtype=torch.float64)
    else:
        raise TypeError(
            f"{fn}: vocab must be a 1-d tensor of weights per id (e.g. from "
            f"unigram_counts), a list of weights or a ContextVocab, got "
            f"{type(vocab).__name__}"
        )
    if w.dim() != 1:
        raise ValueError(f"{fn}: vocab weights must be 1-d (one per id), got shape {list(w.shape)}")
    w = w.to(torch.float64)
    if w.numel() and not (torch.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"{fn}: vocab weights must be finite and >= 0")
    return _Unigram(fn, w, specials, "vocab")


def unigram_counts(
    sequences: torch.Tensor | Iterable[IdsLike],
    *,
    special_ids: Iterable[int] = (),
    vocab_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """How often each id occurs in ``sequences``, special ids and padding left out.

    The replacement distribution for :func:`augment` and :func:`transfer_set` (Tang et al.,
    2019, draw a word of the same part of speech; this draws by corpus frequency instead).
    Pass the result, or any function of it (``counts ** 0.75``, ...), as ``vocab``.

    Args:
        sequences: a list of sequences of ids (lists or 1-d tensors), or a 2-d tensor whose
            padding is given by ``attention_mask`` (0 = padding) or ``pad_id``.
        special_ids: ids whose count is set to 0 (``pad_id`` is added to them).
        vocab_size: the length of the result (default: the largest id + 1).

    Returns:
        A ``(vocab_size,)`` int64 tensor of counts.

    Example:
        >>> unigram_counts([[0, 5, 5, 2], [0, 3, 2]], special_ids=[0, 2]).tolist()
        [0, 0, 0, 1, 0, 2]
    """
    fn = "unigram_counts"
    pad_id = _token_id(fn, "pad_id", pad_id)
    data = _ragged(fn, sequences, attention_mask, pad_id)
    counts = torch.bincount(data.flat, minlength=_vocab_size(fn, data.flat, vocab_size))
    return _fill_ids(counts, _special_tensor(fn, special_ids, pad_id), 0)


def context_vocab(
    sequences: torch.Tensor | Iterable[IdsLike],
    *,
    special_ids: Iterable[int] = (),
    vocab_size: int | None = None,
    min_count: int = 1,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> ContextVocab:
    """A :class:`ContextVocab`: replacements drawn among the words seen after the same word.

    A cheap stand-in for Tang et al.'s (2019) part-of-speech-guided replacement: for every
    adjacent pair ``(a, b)`` in the corpus with ``b`` not special, ``b`` becomes a candidate
    replacement for a token that follows ``a`` (special tokens count as left neighbours, so the
    words seen first in a sentence replace first words). Building it sorts the corpus's pairs
    once (``O(tokens log tokens)``); drawing is a table lookup.

    Args:
        sequences, special_ids, vocab_size, attention_mask, pad_id: as in
            :func:`unigram_counts`.
        min_count: a left neighbour with fewer followers in the corpus than this falls back to
            the unigram distribution (raise it so rare contexts, whose only follower is often
            the word itself, do not make replacement a no-op).

    Example:
        >>> corpus = [[0, 1, 5, 2], [0, 1, 6, 2], [0, 3, 7, 2]]   # 0, 2: CLS, SEP
        >>> vocab = context_vocab(corpus, special_ids=[0, 2])
        >>> replace_tokens([0, 1, 7, 2], vocab, p=1.0, special_ids=[0, 2], seed=2)
        [0, 3, 6, 2]
    """
    fn = "context_vocab"
    pad_id = _token_id(fn, "pad_id", pad_id)
    if not _is_int(min_count):
        raise TypeError(f"{fn}: min_count must be an int, got {min_count!r}")
    if min_count < 1:
        raise ValueError(f"{fn}: min_count must be >= 1, got {min_count}")
    data = _ragged(fn, sequences, attention_mask, pad_id)
    flat = data.flat
    v = _vocab_size(fn, flat, vocab_size)
    specials = _special_tensor(fn, special_ids, pad_id)
    first = torch.zeros(flat.numel(), dtype=torch.bool)
    starts = _starts(data.lens)[data.lens > 0]
    first[starts] = True
    prev, word = flat[:-1], flat[1:]
    pair = ~first[1:] & ~torch.isin(word, specials)
    prev, word = prev[pair], word[pair]
    order = torch.sort(prev, stable=True).indices
    followers = word[order]
    offsets = _offsets(torch.bincount(prev, minlength=v))
    counts = _fill_ids(torch.bincount(flat, minlength=v), specials, 0)
    return ContextVocab(offsets, followers, counts, int(min_count))

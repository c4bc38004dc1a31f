"""Data augmentation on token ids, to build a transfer set for distillation.

Distillation pays off when the student sees the teacher's soft labels on many more inputs than
are labelled. Tang et al., 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks", arXiv:1903.12136, section 3.3) build such a *transfer set* by perturbing the training
sentences with three rules:

- **masking**: a word becomes the mask token with probability ``p_mask``;
- **word replacement**: a word becomes another word with probability ``p_replace``. The paper
  draws a word of the same part of speech; pykd has no tagger, so it draws from the corpus's
  unigram distribution (:func:`unigram_counts`, the default), or, with :func:`context_vocab`,
  from the words seen after the same left neighbour in the corpus (a cheap stand-in for "same
  part of speech": after "the" come nouns and adjectives, after "was" adjectives and verbs);
- **n-gram sampling**: with probability ``p_ngram`` the example is cut down to a random n-gram
  of it, ``n`` uniform in ``ngram_range`` (``[1, 5]`` in the paper).

As in the paper, one uniform draw per position decides between masking (``u < p_mask``),
replacement (``p_mask <= u < p_mask + p_replace``) and nothing, so the two rules are mutually
exclusive, and the n-gram is sampled from the result. :func:`transfer_set` repeats this ``copies``
times per example (20 in the paper) and drops duplicates.

Everything works on **token ids** from any tokenizer, so a "word" here is a token (a word piece
for a subword tokenizer). Conventions shared by all functions:

- ``special_ids`` (CLS, SEP, PAD, ...) are never masked, replaced, drawn as a replacement or cut
  off: an n-gram sample keeps every special token where it was (``[CLS] a b c [SEP]`` ->
  ``[CLS] b c [SEP]``), and the n-gram is a window over the other tokens (for a sentence pair it
  may straddle the middle ``[SEP]``, which stays). The paper's alternation for sentence pairs
  (augment the first sentence, the second, then both) is not done here: a whole sequence is
  augmented.
- Lengths: unpadded input gives unpadded output (a ``list[int]`` or a 1-d tensor gives the same
  kind back; a list of sequences gives a ``list[list[int]]``), and n-gram sampling makes a
  sequence shorter. Padded input (a 2-d tensor with
  an ``attention_mask`` or a ``pad_id``) gives output of the same width: padding stays padding,
  shortened rows are padded back with ``pad_id`` on the side the input pads on, and a new
  attention mask comes with them.
- Randomness comes only from ``seed``: an int (a fresh ``torch.Generator`` seeded with it, so the
  same int gives the same output), a CPU ``torch.Generator`` (used and advanced), or None (a
  generator seeded from the OS, not reproducible). The global RNG is never used. The work runs
  on the CPU; tensors come back on the device they came from.

Example:
    >>> from pykd.augment import augment, transfer_set
    >>> CLS, SEP, MASK = 101, 102, 103
    >>> ids = [CLS, 7, 8, 9, 10, 11, SEP]
    >>> augment(ids, p_mask=0.5, p_replace=0.0, p_ngram=0.0, mask_id=MASK,
    ...         special_ids=[CLS, SEP], seed=1)
    [101, 103, 103, 9, 103, 11, 102]
    >>> out = transfer_set([ids, [CLS, 5, 6, SEP]], copies=3, p_mask=0.2, p_replace=0.2,
    ...                    p_ngram=0.5, mask_id=MASK, special_ids=[CLS, SEP], seed=0)
    >>> for seq, source in zip(out.ids, out.sources.tolist()):
    ...     print(source, seq)
    0 [101, 7, 103, 103, 9, 11, 102]
    0 [101, 7, 8, 5, 10, 103, 102]
    0 [101, 9, 102]
    1 [101, 6, 102]
    1 [101, 8, 9, 102]
    1 [101, 9, 6, 102]
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Union

import torch

__all__ = [
    "ContextVocab",
    "TransferSet",
    "augment",
    "augment_batch",
    "context_vocab",
    "mask_tokens",
    "replace_tokens",
    "sample_ngram",
    "transfer_set",
    "unigram_counts",
]

IdsLike = Union[torch.Tensor, Sequence[int]]
SeedLike = Union[int, torch.Generator, None]
VocabLike = Union[torch.Tensor, Sequence[float], "ContextVocab"]

# Rows (copies of examples) augmented at once by transfer_set: large enough to amortise the
# per-op overhead, small enough to keep a chunk of ids in a few hundred MB at width 512.
_CHUNK_ROWS = 1 << 16


# ------------------------------------------------------------------------------ argument checks


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _prob(fn: str, name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also refuses nan
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {p}")
    return p


def _flag(fn: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def _generator(fn: str, seed: SeedLike) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"{fn}: seed must be a CPU torch.Generator, got one on {seed.device}")
        return seed
    g = torch.Generator()
    if seed is None:
        g.seed()  # from the OS (std::random_device), not from torch's global generator
    elif _is_int(seed):
        g.manual_seed(int(seed))
    else:
        raise TypeError(f"{fn}: seed must be an int, a torch.Generator or None, got {seed!r}")
    return g


def _special_tensor(fn: str, special_ids: object, *extra: int | None) -> torch.Tensor:
    if special_ids is None:
        special_ids = ()
    if isinstance(special_ids, torch.Tensor):
        if special_ids.is_floating_point() or special_ids.is_complex() or special_ids.dim() > 1:
            raise TypeError(
                f"{fn}: special_ids must be ints, got a {special_ids.dtype} tensor "
                f"of shape {list(special_ids.shape)}"
            )
        ids = special_ids.reshape(-1).tolist()
    elif isinstance(special_ids, (str, bytes)) or not isinstance(special_ids, Iterable):
        raise TypeError(f"{fn}: special_ids must be an iterable of ints, got {special_ids!r}")
    else:
        ids = list(special_ids)
        bad = [i for i in ids if not _is_int(i)]
        if bad:
            raise TypeError(f"{fn}: special_ids must be ints, got {bad[0]!r}")
    ids += [i for i in extra if i is not None]
    return torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long)


def _token_id(fn: str, name: str, value: object) -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")
    return int(value)


def _ngram_range(fn: str, ngram_range: object) -> tuple[int, int]:
    if (
        not isinstance(ngram_range, Sequence)
        or len(ngram_range) != 2
        or not all(_is_int(n) for n in ngram_range)
    ):
        raise TypeError(
            f"{fn}: ngram_range must be a pair of ints (low, high), got {ngram_range!r}"
        )
    lo, hi = int(ngram_range[0]), int(ngram_range[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"{fn}: ngram_range must satisfy 1 <= low <= high, got ({lo}, {hi})")
    return lo, hi


def _check_ids_tensor(fn: str, name: str, x: torch.Tensor, dim: int) -> None:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer token ids, got dtype {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{fn}: {name} must be a {dim}-d tensor, got shape {list(x.shape)}")


def _ints_tensor(fn: str, name: str, values: list) -> torch.Tensor:
    """A flat list of ints as a 1-d LongTensor; TypeError for anything else."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    try:  # torch checks the elements in C++, much faster than isinstance per element
        x = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{fn}: {name} must hold ints (token ids): {exc}") from None
    if x.dtype != torch.long or x.dim() != 1:
        bad = next((v for v in values if not _is_int(v)), values[0])
        raise TypeError(f"{fn}: {name} must hold ints (token ids), got {bad!r}")
    return x


def _no_negative(fn: str, name: str, flat: torch.Tensor) -> None:
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError(f"{fn}: {name} holds a negative token id ({int(flat.min())})")


# -------------------------------------------------------------------------------- vocabularies


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


class _Unigram:
    """Inverse-CDF sampling from non-negative weights, with special ids at weight 0."""

    def __init__(self, fn: str, weights: torch.Tensor, specials: torch.Tensor, what: str) -> None:
        w = weights.to(torch.float64).clone()
        drop = specials[(specials >= 0) & (specials < w.numel())]
        w[drop] = 0.0
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
        counts = torch.bincount(prevs[keep], minlength=v)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
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
    elif isinstance(vocab, Sequence) and not isinstance(vocab, (str, bytes)):
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


# ------------------------------------------------------------------------------------ the rules


class _Rules(NamedTuple):
    p_mask: float
    p_replace: float
    p_ngram: float
    mask_id: int | None
    sampler: object  # _Unigram, _Context or None
    specials: torch.Tensor
    ngram: tuple[int, int]


def _rules(
    fn: str,
    p_mask: object,
    p_replace: object,
    p_ngram: object,
    mask_id: object,
    vocab: object,
    special_ids: object,
    ngram_range: object,
    pad_id: int | None = None,
) -> _Rules:
    p_mask = _prob(fn, "p_mask", p_mask)
    p_replace = _prob(fn, "p_replace", p_replace)
    p_ngram = _prob(fn, "p_ngram", p_ngram)
    if p_mask + p_replace > 1.0 + 1e-12:
        raise ValueError(
            f"{fn}: p_mask + p_replace must be <= 1 (one draw per token decides "
            f"between them), got {p_mask} + {p_replace}"
        )
    mask_id = _token_id(fn, "mask_id", mask_id)
    if p_mask > 0 and mask_id is None:
        raise ValueError(f"{fn}: mask_id is required when p_mask > 0 (got p_mask={p_mask})")
    ngram = _ngram_range(fn, ngram_range)
    specials = _special_tensor(fn, special_ids, pad_id)
    sampler = None
    if p_replace > 0:
        if vocab is None:
            raise ValueError(
                f"{fn}: vocab is required when p_replace > 0: pass weights per id "
                "(e.g. unigram_counts(dataset)) or a context_vocab(dataset)"
            )
        sampler = _sampler(fn, vocab, specials, mask_id)
    return _Rules(p_mask, p_replace, p_ngram, mask_id, sampler, specials, ngram)


def _augment_rows(
    rows: torch.Tensor, lens: torch.Tensor, rules: _Rules, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented copy of each left-aligned row of ``rows`` (``lens`` real tokens each).

    Returns the new rows (same width, left-aligned, zeros after the end) and their lengths. The
    draws, in order: a ``(R, T)`` uniform if ``p_mask + p_replace > 0``, the replacement draws,
    then three ``(R,)`` draws if ``p_ngram > 0``; nothing else touches ``g``.
    """
    r, t = rows.shape
    real = torch.arange(t) < lens[:, None]
    content = real
    if rules.specials.numel() and r * t > 0:
        top = int(rows.max())
        if top < 1 << 24:  # a lookup table is several times faster than isin
            table = torch.zeros(top + 1, dtype=torch.bool)
            table[rules.specials[(rules.specials >= 0) & (rules.specials <= top)]] = True
            content = real & ~table[rows]
        else:
            content = real & ~torch.isin(rows, rules.specials)
    out = rows
    p_edit = rules.p_mask + rules.p_replace
    if p_edit > 0 and r * t > 0:
        u = torch.rand(r, t, generator=g)
        out = rows.clone()
        edit = content & (u < p_edit)
        masked = edit & (u < rules.p_mask) if rules.p_mask > 0 else None
        if masked is not None:
            out.masked_fill_(masked, rules.mask_id)
        if rules.p_replace > 0:
            i, j = torch.nonzero(edit if masked is None else edit & ~masked, as_tuple=True)
            prev = torch.where(j > 0, rows[i, (j - 1).clamp_(min=0)], -1)  # source neighbour
            out[i, j] = rules.sampler.draw(prev, g)
    if rules.p_ngram > 0 and r > 0:
        apply = torch.rand(r, generator=g) < rules.p_ngram
        n = torch.randint(rules.ngram[0], rules.ngram[1] + 1, (r,), generator=g)
        s = torch.rand(r, generator=g, dtype=torch.float64)
        hit = torch.nonzero(apply).reshape(-1)  # only these rows are cut: work on them alone
        content, real, n, s = content[hit], real[hit], n[hit], s[hit]
        length = content.sum(1)
        n = torch.minimum(n, length)  # a sentence shorter than n is its own n-gram
        start = torch.minimum((s * (length - n + 1)).long(), length - n)
        rank = content.cumsum(1) - 1  # index among the non-special tokens
        cut = content & ((rank < start[:, None]) | (rank >= (start + n)[:, None]))
        if bool(cut.any()):
            keep = real & ~cut
            pos = torch.where(keep, keep.cumsum(1) - 1, t)  # dropped ones go to a spare column
            packed = torch.zeros(hit.numel(), t + 1, dtype=out.dtype)
            packed.scatter_(1, pos, out[hit])
            out, lens = out.clone(), lens.clone()
            out[hit], lens[hit] = packed[:, :t], keep.sum(1)
    return out, lens


def _row_hash(rows: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """A random linear hash of each row and its length (rows are zero after their end).

    Exact integer arithmetic: the coefficients are bounded so that no sum can overflow int64.
    Two distinct rows collide with probability at most 1 / (the coefficients' range), about
    2**-31 for usual vocabularies and widths; :func:`_first_occurrences` checks equal hashes.
    """
    x = torch.cat([lens[:, None], rows], 1)
    top = max(int(x.max()), 1) if x.numel() else 1
    high = min(2**31, (2**63 - 1) // (top * x.shape[1]))
    g = torch.Generator().manual_seed(0x5EED)  # fixed: dedupe is deterministic
    return x @ torch.randint(1, max(high, 2), (x.shape[1],), generator=g)


def _first_occurrences(rows: torch.Tensor, lens: torch.Tensor, group: int) -> torch.Tensor:
    """Which rows are the first of their kind within consecutive groups of ``group`` rows.

    Exact: rows with equal hashes are compared element by element, and the rare group where a
    hash collision hides the answer is deduplicated in Python.
    """
    m = rows.shape[0]
    if group <= 1 or m == 0:
        return torch.ones(m, dtype=torch.bool)
    h = _row_hash(rows, lens).view(-1, group)
    sorted_h, order = torch.sort(h, dim=1, stable=True)  # equal hashes keep their order
    new_run = torch.ones_like(sorted_h, dtype=torch.bool)
    new_run[:, 1:] = sorted_h[:, 1:] != sorted_h[:, :-1]
    run_start = torch.where(new_run, torch.arange(group), 0).cummax(1).values
    base = torch.arange(0, m, group)[:, None]
    later = (base + order)[~new_run]  # a row whose hash an earlier row of its group has
    first = (base + order.gather(1, run_start))[~new_run]
    same = (rows[later] == rows[first]).all(1) & (lens[later] == lens[first])
    keep = torch.ones(m, dtype=torch.bool)
    keep[later[same]] = False
    for a in torch.unique(later[~same] // group).tolist():  # hash collisions: check by hand
        a *= group
        seen: set[tuple[int, ...]] = set()
        for i, row in enumerate(rows[a : a + group].tolist()):
            key = tuple(row[: int(lens[a + i])])
            keep[a + i] = key not in seen
            seen.add(key)
    return keep


# ----------------------------------------------------------------------------- one sequence


def _one(fn: str, ids: object):
    """``ids`` as a 1-d LongTensor, and a function that returns a result in the input's kind."""
    if isinstance(ids, torch.Tensor):
        _check_ids_tensor(fn, "ids", ids, 1)
        x = ids.detach().cpu().long()
        dtype, device = ids.dtype, ids.device
        back = lambda y: y.to(dtype=dtype, device=device)  # noqa: E731
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if any(isinstance(i, (Sequence, torch.Tensor)) for i in ids):
            raise ValueError(
                f"{fn}: ids must be one sequence of ints; for many sequences use "
                "augment_batch or transfer_set"
            )
        x = _ints_tensor(fn, "ids", list(ids))
        back = lambda y: y.tolist()  # noqa: E731
    else:
        raise TypeError(
            f"{fn}: ids must be a 1-d integer tensor or a list of ints, got {type(ids).__name__}"
        )
    _no_negative(fn, "ids", x)
    return x, back


def _run_one(fn: str, ids: object, rules: _Rules, seed: SeedLike):
    x, back = _one(fn, ids)
    g = _generator(fn, seed)
    out, lens = _augment_rows(x[None], torch.tensor([x.numel()]), rules, g)
    return back(out[0, : int(lens[0])])


def augment(
    ids: IdsLike,
    *,
    p_mask: float = 0.1,
    p_replace: float = 0.1,
    p_ngram: float = 0.25,
    mask_id: int | None = None,
    vocab: VocabLike | None = None,
    special_ids: Iterable[int] = (),
    ngram_range: tuple[int, int] = (1, 5),
    seed: SeedLike = None,
) -> IdsLike:
    """One augmented copy of one sequence, by Tang et al.'s (2019) three rules.

    Each non-special token draws ``u ~ U[0, 1)``: ``u < p_mask`` masks it (``mask_id``),
    ``p_mask <= u < p_mask + p_replace`` replaces it by a draw from ``vocab``; then, with
    probability ``p_ngram``, the sequence is cut to a random n-gram of its non-special tokens,
    ``n`` uniform in ``ngram_range`` (the special tokens stay where they are).

    Args:
        ids: a list of ints or a 1-d integer tensor, without padding (or with the pad id in
            ``special_ids``, which then stays but is not cut off).
        p_mask, p_replace, p_ngram: the probabilities, each in ``[0, 1]``,
            ``p_mask + p_replace <= 1``.
        mask_id: the mask token; required when ``p_mask > 0``.
        vocab: where replacements come from, required when ``p_replace > 0``: weights per id
            (a ``(V,)`` tensor or list, e.g. :func:`unigram_counts`) or a :class:`ContextVocab`.
            Special ids and ``mask_id`` are never drawn.
        special_ids: ids that are never masked, replaced, drawn or cut off.
        ngram_range: ``(low, high)`` bounds of ``n``, inclusive.
        seed: an int, a CPU ``torch.Generator`` or None (see the module docstring).

    Returns:
        The augmented sequence, of the input's kind (a list, or a tensor of the input's dtype and
        device); as long as the input unless an n-gram was sampled.
    """
    rules = _rules("augment", p_mask, p_replace, p_ngram, mask_id, vocab, special_ids, ngram_range)
    return _run_one("augment", ids, rules, seed)


def mask_tokens(
    ids: IdsLike,
    mask_id: int,
    *,
    p: float = 0.1,
    special_ids: Iterable[int] = (),
    seed: SeedLike = None,
) -> IdsLike:
    """Each non-special token of ``ids`` becomes ``mask_id`` with probability ``p``.

    Tang et al.'s (2019) masking rule alone; the same as :func:`augment` with ``p_mask=p`` and
    the other probabilities 0 (and, for the same seed, the same output).

    Example:
        >>> mask_tokens([101, 5, 6, 7, 102], mask_id=103, p=1.0, special_ids=[101, 102])
        [101, 103, 103, 103, 102]
    """
    rules = _rules("mask_tokens", p, 0.0, 0.0, mask_id, None, special_ids, (1, 5))
    if rules.mask_id is None:
        raise ValueError("mask_tokens: mask_id is required")
    return _run_one("mask_tokens", ids, rules, seed)


def replace_tokens(
    ids: IdsLike,
    vocab: VocabLike,
    *,
    p: float = 0.1,
    special_ids: Iterable[int] = (),
    seed: SeedLike = None,
) -> IdsLike:
    """Each non-special token of ``ids`` becomes a draw from ``vocab`` with probability ``p``.

    Tang et al.'s (2019) word-replacement rule alone, with ``vocab`` (weights per id, or a
    :class:`ContextVocab`) in place of their part-of-speech lookup; special ids are never drawn.

    Example:
        >>> replace_tokens([1, 5, 6, 2], vocab=[0, 0, 0, 0, 0, 0, 0, 0, 0, 1], p=1.0,
        ...                special_ids=[1, 2])
        [1, 9, 9, 2]
    """
    if vocab is None:
        raise ValueError("replace_tokens: vocab is required")
    rules = _rules("replace_tokens", 0.0, p, 0.0, None, vocab, special_ids, (1, 5))
    return _run_one("replace_tokens", ids, rules, seed)


def sample_ngram(
    ids: IdsLike,
    *,
    p: float = 1.0,
    ngram_range: tuple[int, int] = (1, 5),
    special_ids: Iterable[int] = (),
    seed: SeedLike = None,
) -> IdsLike:
    """With probability ``p``, cut ``ids`` to a random n-gram of its non-special tokens.

    Tang et al.'s (2019) n-gram sampling alone: ``n`` is uniform in ``ngram_range`` (capped at
    the number of non-special tokens), the window's start uniform among the possible ones, and
    every special token is kept in its place, so ``[CLS] a b c d [SEP]`` may become
    ``[CLS] b c [SEP]``.

    Example:
        >>> sample_ngram([101, 5, 6, 7, 8, 102], ngram_range=(2, 2), special_ids=[101, 102],
        ...              seed=0)
        [101, 7, 8, 102]
    """
    rules = _rules("sample_ngram", 0.0, 0.0, p, None, None, special_ids, ngram_range)
    return _run_one("sample_ngram", ids, rules, seed)


# ------------------------------------------------------------------------------------ datasets


class _Ragged(NamedTuple):
    """A dataset as its real tokens, row after row, and how it was laid out."""

    flat: torch.Tensor  # int64, all real tokens
    lens: torch.Tensor  # int64 (N,)
    width: int | None  # None for unpadded input, else the padded width T
    ids_dtype: torch.dtype | None
    mask_dtype: torch.dtype | None
    device: torch.device | None
    left: bool  # pads on the left
    pad_value: int | None  # the value the input pads with, if one


def _ragged(
    fn: str,
    sequences: object,
    attention_mask: object = None,
    pad_id: int | None = None,
    padding_side: str | None = None,
) -> _Ragged:
    if padding_side not in (None, "left", "right"):
        raise ValueError(
            f"{fn}: padding_side must be 'left', 'right' or None, got {padding_side!r}"
        )
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() == 1:
            raise ValueError(
                f"{fn}: sequences must be a batch (a 2-d tensor or a list of "
                "sequences), got a 1-d tensor; for one sequence pass [ids]"
            )
        _check_ids_tensor(fn, "sequences", sequences, 2)
        ids = sequences.detach().cpu().long()
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(
                    f"{fn}: attention_mask must be a tensor, got {type(attention_mask).__name__}"
                )
            if attention_mask.shape != sequences.shape:
                raise ValueError(
                    f"{fn}: attention_mask has shape {list(attention_mask.shape)}, "
                    f"sequences {list(sequences.shape)}"
                )
            m = attention_mask.detach().cpu()
            if not ((m == 0) | (m == 1)).all():
                raise ValueError(f"{fn}: attention_mask must hold only 0 and 1")
            real = m.bool()
            mask_dtype = attention_mask.dtype
        else:
            real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
            mask_dtype = torch.long
        flat = ids[real]
        _no_negative(fn, "sequences", flat)
        pads = ids[~real]
        pad_value = pad_id
        if pad_value is None and pads.numel() and bool((pads == pads[0]).all()):
            pad_value = int(pads[0])
        if padding_side is None:
            left = ids.shape[1] > 0 and bool(real[:, -1].all()) and not bool(real[:, 0].all())
        else:
            left = padding_side == "left"
        return _Ragged(
            flat,
            real.sum(1),
            ids.shape[1],
            sequences.dtype,
            mask_dtype,
            sequences.device,
            left,
            pad_value,
        )
    if attention_mask is not None:
        raise ValueError(
            f"{fn}: attention_mask goes with a 2-d tensor of ids; a list of "
            "sequences holds no padding"
        )
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
        raise TypeError(
            f"{fn}: sequences must be a 2-d integer tensor or a list of sequences "
            f"of ids, got {type(sequences).__name__}"
        )
    rows = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, torch.Tensor):
            _check_ids_tensor(fn, f"sequences[{i}]", seq, 1)
            rows.append(seq.tolist())
        elif isinstance(seq, Sequence) and not isinstance(seq, (str, bytes)):
            rows.append(seq)
        else:
            raise TypeError(
                f"{fn}: sequences[{i}] must be a list of ids or a 1-d tensor, got "
                f"{type(seq).__name__}"
            )
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = _ints_tensor(fn, "sequences", list(itertools.chain.from_iterable(rows)))
    _no_negative(fn, "sequences", flat)
    return _Ragged(flat, lens, None, None, None, None, False, None)


def _padded(flat: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Rows of ``flat`` (``lens`` long each) left-aligned in a zero-padded 2-d tensor."""
    n = lens.numel()
    width = int(lens.max()) if n else 0
    rows = torch.zeros(n, width, dtype=torch.long)
    if flat.numel():
        row = torch.repeat_interleave(torch.arange(n), lens)
        starts = torch.cumsum(lens, 0) - lens
        col = torch.arange(flat.numel()) - torch.repeat_interleave(starts, lens)
        rows[row, col] = flat
    return rows


def _vocab_size(fn: str, flat: torch.Tensor, vocab_size: object) -> int:
    top = int(flat.max()) + 1 if flat.numel() else 0
    if vocab_size is None:
        return top
    if not _is_int(vocab_size):
        raise TypeError(f"{fn}: vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < top:
        raise ValueError(f"{fn}: vocab_size is {vocab_size} but the sequences hold id {top - 1}")
    return int(vocab_size)


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
    specials = _special_tensor(fn, special_ids, pad_id)
    counts[specials[(specials >= 0) & (specials < counts.numel())]] = 0
    return counts


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
    starts = (torch.cumsum(data.lens, 0) - data.lens)[data.lens > 0]
    first[starts] = True
    prev, word = flat[:-1], flat[1:]
    pair = ~first[1:] & ~torch.isin(word, specials)
    prev, word = prev[pair], word[pair]
    order = torch.sort(prev, stable=True).indices
    followers = word[order]
    offsets = torch.cat(
        [torch.zeros(1, dtype=torch.long), torch.bincount(prev, minlength=v).cumsum(0)]
    )
    counts = torch.bincount(flat, minlength=v)
    counts[specials[(specials >= 0) & (specials < v)]] = 0
    return ContextVocab(offsets, followers, counts, int(min_count))


class TransferSet(NamedTuple):
    """The result of :func:`transfer_set`.

    Attributes:
        ids: the augmented sequences, grouped by source in source order: a ``list[list[int]]``
            for a list input, a ``(M, T)`` tensor (the input's width, dtype and device) for a
            padded 2-d tensor input.
        sources: ``(M,)`` int64, the index of the example each sequence comes from.
        attention_mask: ``(M, T)`` for a 2-d tensor input (the input mask's dtype, int64 if it
            had none), else None.
    """

    ids: list[list[int]] | torch.Tensor
    sources: torch.Tensor
    attention_mask: torch.Tensor | None


def _repad(rows: torch.Tensor, lens: torch.Tensor, data: _Ragged, pad: int):
    """Left-aligned rows back to the input's width, padded on its side, and their mask."""
    width = data.width
    col = torch.arange(width)
    src = col - (width - lens[:, None]) if data.left else col.expand(lens.numel(), width)
    mask = (src >= 0) & (src < lens[:, None])
    if rows.shape[1] == 0:
        ids = torch.full((lens.numel(), width), pad, dtype=torch.long)
    else:
        gathered = rows.gather(1, src.clamp(0, rows.shape[1] - 1))
        ids = torch.where(mask, gathered, pad)
    return (
        ids.to(dtype=data.ids_dtype, device=data.device),
        mask.to(dtype=data.mask_dtype, device=data.device),
    )


def _transfer(
    fn: str,
    data: _Ragged,
    rules: _Rules,
    copies: int,
    g: torch.Generator,
    dedupe: bool,
    include_original: bool,
    progress: bool,
) -> TransferSet:
    n_examples = data.lens.numel()
    group = copies + int(include_original)
    pad = None
    if data.width is not None:
        pad = data.pad_value
        shrinks = rules.p_ngram > 0 and copies > 0
        if pad is None and (shrinks or bool((data.lens < data.width).any())):
            raise ValueError(
                f"{fn}: pad_id is required to pad shortened sequences back to "
                "the input's width (the input's padding holds no single value)"
            )
        if pad is None:
            pad = 0  # never written: no row is shorter than the width
    starts = torch.cumsum(data.lens, 0) - data.lens
    per_chunk = max(1, _CHUNK_ROWS // max(group, 1))
    out_lists: list[list[int]] = []
    out_rows, out_sources = [], []
    from tqdm.auto import tqdm

    with tqdm(total=n_examples, desc="transfer set", unit="ex", disable=not progress) as bar:
        for a in range(0, n_examples, per_chunk):
            b = min(a + per_chunk, n_examples)
            lens = data.lens[a:b]
            lo = int(starts[a]) if b > a else 0
            rows = _padded(data.flat[lo : lo + int(lens.sum())], lens)
            c, t = rows.shape
            if copies > 0:
                aug, aug_lens = _augment_rows(
                    rows.repeat_interleave(copies, 0), lens.repeat_interleave(copies), rules, g
                )
            else:
                aug, aug_lens = rows[:0], lens[:0]
            if include_original:  # the source first in its group
                aug = torch.cat([rows[:, None], aug.view(c, copies, t)], 1).view(c * group, t)
                aug_lens = torch.cat([lens[:, None], aug_lens.view(c, copies)], 1).view(-1)
            sources = torch.arange(a, b).repeat_interleave(group)
            if dedupe:
                keep = _first_occurrences(aug, aug_lens, group)
                if not bool(keep.all()):
                    aug, aug_lens, sources = aug[keep], aug_lens[keep], sources[keep]
            if data.width is None:  # real tokens only, then cut into rows: the fastest lists
                flat = aug[torch.arange(aug.shape[1]) < aug_lens[:, None]].tolist()
                ends = torch.cumsum(aug_lens, 0).tolist()
                out_lists.extend(flat[e - n : e] for e, n in zip(ends, aug_lens.tolist()))
            else:
                out_rows.append(_repad(aug, aug_lens, data, pad))
            out_sources.append(sources)
            bar.update(b - a)
    sources = torch.cat(out_sources) if out_sources else torch.zeros(0, dtype=torch.long)
    if data.width is None:
        return TransferSet(out_lists, sources, None)
    if out_rows:
        ids = torch.cat([r[0] for r in out_rows])
        mask = torch.cat([r[1] for r in out_rows])
    else:
        ids = torch.zeros(0, data.width, dtype=data.ids_dtype, device=data.device)
        mask = torch.zeros(0, data.width, dtype=data.mask_dtype, device=data.device)
    return TransferSet(ids, sources, mask)


def transfer_set(
    sequences: torch.Tensor | Iterable[IdsLike],
    copies: int = 20,
    *,
    p_mask: float = 0.1,
    p_replace: float = 0.1,
    p_ngram: float = 0.25,
    mask_id: int | None = None,
    vocab: VocabLike | None = None,
    special_ids: Iterable[int] = (),
    ngram_range: tuple[int, int] = (1, 5),
    seed: SeedLike = 0,
    dedupe: bool = True,
    include_original: bool = False,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    padding_side: str | None = None,
    progress: bool = False,
) -> TransferSet:
    """Tang et al.'s (2019) transfer set: ``copies`` augmented copies of each example.

    Each copy is one :func:`augment` draw (masking / replacement decided per token by one
    uniform draw, then n-gram sampling); with ``dedupe`` a copy equal to an earlier one of the
    same example is dropped, as in the paper (which uses ``copies=20``, ``p_mask = p_replace =
    0.1``, ``p_ngram = 0.25``), so an example gives at most ``copies`` sequences. Label the
    result with the teacher and train the student on it (plus, usually, the original data).

    Args:
        sequences: a list of sequences of ids (lists or 1-d tensors), or a padded 2-d tensor
            with its ``attention_mask`` (or a ``pad_id`` that marks padding).
        copies: augmented copies per example, ``>= 0``.
        p_mask, p_replace, p_ngram, mask_id, special_ids, ngram_range: as in :func:`augment`.
        vocab: the replacement distribution (weights per id or a :class:`ContextVocab`);
            default: :func:`unigram_counts` of ``sequences``.
        seed: an int (default 0), a CPU ``torch.Generator`` or None. The same seed and arguments
            give the same transfer set.
        dedupe: drop repeated sequences within each example's group.
        include_original: put each unchanged example first in its group (extra to ``copies``;
            with ``dedupe``, copies equal to it are then dropped).
        attention_mask: for a 2-d tensor, 1 for real tokens and 0 for padding.
        pad_id: the padding id: marks padding when no ``attention_mask`` is given, pads
            shortened rows back (default: the single value the input's padding holds), and is
            treated as special.
        padding_side: ``"left"`` or ``"right"``, the side shortened rows are padded on; default:
            left if every row's last position is real and some row's first is not.
        progress: show a tqdm bar over the examples.

    The work is vectorised over chunks of copies: 50k sentences of ~35 tokens x 20 copies take
    about 5-15 s for a padded tensor and 15-30 s for lists on 2 CPU cores, most of the list
    case in building the million Python lists (which also take ~1.5 GB; a padded tensor input
    gives a compact tensor output). Duplicates are found by hashing and confirmed exactly.

    Returns:
        A :class:`TransferSet` ``(ids, sources, attention_mask)``: the sequences grouped by
        source (``sources[i]`` is the index of the example ``ids[i]`` comes from, so groups can
        be kept together, e.g. out of an evaluation split), in the input's length convention
        (see the module docstring).
    """
    fn = "transfer_set"
    if not _is_int(copies):
        raise TypeError(f"{fn}: copies must be an int, got {copies!r}")
    if copies < 0:
        raise ValueError(f"{fn}: copies must be >= 0, got {copies}")
    dedupe = _flag(fn, "dedupe", dedupe)
    include_original = _flag(fn, "include_original", include_original)
    progress = _flag(fn, "progress", progress)
    pad_id = _token_id(fn, "pad_id", pad_id)
    g = _generator(fn, seed)
    data = _ragged(fn, sequences, attention_mask, pad_id, padding_side)
    if vocab is None and _prob(fn, "p_replace", p_replace) > 0:
        specials = _special_tensor(fn, special_ids, pad_id)
        vocab = torch.bincount(data.flat)
        vocab[specials[(specials >= 0) & (specials < vocab.numel())]] = 0
    rules = _rules(fn, p_mask, p_replace, p_ngram, mask_id, vocab, special_ids, ngram_range, pad_id)
    return _transfer(fn, data, rules, copies, g, dedupe, include_original, progress)


def augment_batch(
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    p_mask: float = 0.1,
    p_replace: float = 0.1,
    p_ngram: float = 0.25,
    mask_id: int | None = None,
    vocab: VocabLike | None = None,
    special_ids: Iterable[int] = (),
    ngram_range: tuple[int, int] = (1, 5),
    pad_id: int | None = None,
    padding_side: str | None = None,
    seed: SeedLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented copy of each row of a padded batch, of the same shape (for a collate_fn).

    The rules of :func:`augment` (Tang et al., 2019) applied row by row to a ``(B, T)`` tensor:
    padding (``attention_mask == 0``, or ``ids == pad_id`` without a mask) stays padding, and a
    row cut to an n-gram is padded back to ``T`` with ``pad_id`` on the batch's padding side.
    ``vocab`` is required when ``p_replace > 0``: a batch is too small to estimate it from.

    Returns:
        ``(ids, attention_mask)``, both ``(B, T)``, in the input's dtypes and device.

    Example:
        >>> ids = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 102, 0, 0]])
        >>> new, mask = augment_batch(ids, ids != 0, p_mask=0.0, p_replace=0.0, p_ngram=1.0,
        ...                           ngram_range=(1, 1), special_ids=[101, 102], pad_id=0,
        ...                           seed=0)
        >>> new
        tensor([[101,   6, 102,   0,   0],
                [101,   8, 102,   0,   0]])
        >>> mask
        tensor([[ True,  True,  True, False, False],
                [ True,  True,  True, False, False]])
    """
    fn = "augment_batch"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{fn}: ids must be a 2-d integer tensor, got {type(ids).__name__}; "
            "for lists of sequences use transfer_set(..., copies=1, dedupe=False)"
        )
    _check_ids_tensor(fn, "ids", ids, 2)
    pad_id = _token_id(fn, "pad_id", pad_id)
    rules = _rules(fn, p_mask, p_replace, p_ngram, mask_id, vocab, special_ids, ngram_range, pad_id)
    g = _generator(fn, seed)
    data = _ragged(fn, ids, attention_mask, pad_id, padding_side)
    out = _transfer(fn, data, rules, 1, g, dedupe=False, include_original=False, progress=False)
    return out.ids, out.attention_mask

"""The functions on one sequence: :func:`augment` and the three rules alone.

Above ``_core``: each checks its arguments, then augments the sequence as a batch of one row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pykd.augment._args import (
    IdsLike,
    SeedLike,
    _check_ids_tensor,
    _generator,
    _ints_tensor,
    _is_sequence,
    _no_negative,
)
from pykd.augment._core import _augment_rows, _rules
from pykd.augment._vocab import VocabLike


def _one(fn: str, ids: object):
    """``ids`` as a 1-d LongTensor, and a function that returns a result in the input's kind."""
    if isinstance(ids, torch.Tensor):
        _check_ids_tensor(fn, "ids", ids, 1)
        x = ids.detach().cpu().long()
        dtype, device = ids.dtype, ids.device
        back = lambda y: y.to(dtype=dtype, device=device)  # noqa: E731
    elif _is_sequence(ids):
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


def _augment_one(
    fn: str,
    ids: object,
    seed: SeedLike,
    required: str | None = None,
    *,
    p_mask: object = 0.0,
    p_replace: object = 0.0,
    p_ngram: object = 0.0,
    mask_id: object = None,
    vocab: object = None,
    special_ids: object = (),
    ngram_range: object = (1, 5),
):
    """Check the rules, then ``ids`` and ``seed``, and give one augmented copy of ``ids``.

    ``required`` names what a one-rule function cannot do without even at ``p = 0``:
    ``"vocab"`` is checked before the rules, ``"mask_id"`` after them (so each bad call gets
    the same error as before these functions shared this code).
    """
    if required == "vocab" and vocab is None:
        raise ValueError(f"{fn}: vocab is required")
    rules = _rules(fn, p_mask, p_replace, p_ngram, mask_id, vocab, special_ids, ngram_range)
    if required == "mask_id" and rules.mask_id is None:
        raise ValueError(f"{fn}: mask_id is required")
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
    return _augment_one(
        "augment",
        ids,
        seed,
        p_mask=p_mask,
        p_replace=p_replace,
        p_ngram=p_ngram,
        mask_id=mask_id,
        vocab=vocab,
        special_ids=special_ids,
        ngram_range=ngram_range,
    )


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
    return _augment_one(
        "mask_tokens", ids, seed, "mask_id", p_mask=p, mask_id=mask_id, special_ids=special_ids
    )


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
    return _augment_one(
        "replace_tokens", ids, seed, "vocab", p_replace=p, vocab=vocab, special_ids=special_ids
    )


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
    return _augment_one(
        "sample_ngram", ids, seed, p_ngram=p, special_ids=special_ids, ngram_range=ngram_range
    )

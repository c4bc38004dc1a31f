"""The transfer-set builder and its one-copy form for padded batches (the top layer).

:func:`transfer_set` and :func:`augment_batch` read a dataset (``_data``), check the rules
(``_core``), augment the examples' copies a chunk at a time, drop repeats within each example's
group, and give the result back in the input's layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from pykd.augment._args import (
    IdsLike,
    SeedLike,
    _check_ids_tensor,
    _flag,
    _generator,
    _is_int,
    _prob,
    _special_tensor,
    _token_id,
)
from pykd.augment._core import _augment_rows, _first_occurrences, _Rules, _rules
from pykd.augment._data import _padded, _Ragged, _ragged, _repad, _starts
from pykd.augment._vocab import VocabLike, _fill_ids

# Rows (copies of examples) augmented at once by transfer_set: large enough to amortise the
# per-op overhead, small enough to keep a chunk of ids in a few hundred MB at width 512.
_CHUNK_ROWS = 1 << 16


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


def _pad_value(fn: str, data: _Ragged, rules: _Rules, copies: int) -> int | None:
    """The id that pads output rows of a padded input (None for unpadded input)."""
    if data.width is None:
        return None
    pad = data.pad_value
    shrinks = rules.p_ngram > 0 and copies > 0
    if pad is None and (shrinks or bool((data.lens < data.width).any())):
        raise ValueError(
            f"{fn}: pad_id is required to pad shortened sequences back to "
            "the input's width (the input's padding holds no single value)"
        )
    return 0 if pad is None else pad  # 0 is never written: no row is shorter than the width


def _groups(
    rows: torch.Tensor,
    lens: torch.Tensor,
    first: int,
    rules: _Rules,
    copies: int,
    g: torch.Generator,
    dedupe: bool,
    include_original: bool,
):
    """The group of copies of each row (examples ``first``, ...): rows, lengths and sources."""
    c, t = rows.shape
    group = copies + int(include_original)
    if copies > 0:
        aug, aug_lens = _augment_rows(
            rows.repeat_interleave(copies, 0), lens.repeat_interleave(copies), rules, g
        )
    else:
        aug, aug_lens = rows[:0], lens[:0]
    if include_original:  # the source first in its group
        aug = torch.cat([rows[:, None], aug.view(c, copies, t)], 1).view(c * group, t)
        aug_lens = torch.cat([lens[:, None], aug_lens.view(c, copies)], 1).view(-1)
    sources = torch.arange(first, first + c).repeat_interleave(group)
    if dedupe:
        keep = _first_occurrences(aug, aug_lens, group)
        if not bool(keep.all()):
            aug, aug_lens, sources = aug[keep], aug_lens[keep], sources[keep]
    return aug, aug_lens, sources


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
    pad = _pad_value(fn, data, rules, copies)
    starts = _starts(data.lens)
    per_chunk = max(1, _CHUNK_ROWS // max(copies + int(include_original), 1))
    out_lists: list[list[int]] = []
    out_rows, out_sources = [], []
    from tqdm.auto import tqdm

    with tqdm(total=n_examples, desc="transfer set", unit="ex", disable=not progress) as bar:
        for a in range(0, n_examples, per_chunk):
            b = min(a + per_chunk, n_examples)
            lens = data.lens[a:b]
            lo = int(starts[a]) if b > a else 0
            rows = _padded(data.flat[lo : lo + int(lens.sum())], lens)
            aug, aug_lens, sources = _groups(
                rows, lens, a, rules, copies, g, dedupe, include_original
            )
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
        vocab = _fill_ids(torch.bincount(data.flat), _special_tensor(fn, special_ids, pad_id), 0)
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

"""The per-row augmentation core: the rules of a call, applied to left-aligned rows at once.

Above ``_args`` and ``_vocab``. :func:`_rules` checks a call's rule arguments once;
:func:`_augment_rows` applies them to a batch of rows (masking and replacement by one uniform
draw per token, then n-gram sampling); :func:`_first_occurrences` finds the rows to keep when
copies of the same example are deduplicated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pykd.augment._args import _ngram_range, _prob, _special_tensor, _token_id
from pykd.augment._vocab import _fill_ids, _sampler


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
            table = _fill_ids(torch.zeros(top + 1, dtype=torch.bool), rules.specials, True)
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

"""Datasets as ragged rows of real tokens, and back to padded rows (above ``_args``).

A dataset comes in as a list of sequences or as a padded 2-d tensor; :func:`_ragged` turns
either into all its real tokens, row after row (``flat``, ``lens``), and remembers the layout so
that :func:`_repad` can give output of the input's width, padding side, dtypes and device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import NamedTuple

import torch

from pykd.augment._args import (
    _check_ids_tensor,
    _ints_tensor,
    _is_int,
    _is_sequence,
    _no_negative,
)


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
        return _ragged_tensor(fn, sequences, attention_mask, pad_id, padding_side)
    if attention_mask is not None:
        raise ValueError(
            f"{fn}: attention_mask goes with a 2-d tensor of ids; a list of "
            "sequences holds no padding"
        )
    return _ragged_lists(fn, sequences)


def _real_positions(fn: str, ids: torch.Tensor, attention_mask: object, pad_id: int | None):
    """Where the real tokens of ``ids`` (on the CPU) are, and the mask dtype to give back."""
    if attention_mask is None:
        real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
        return real, torch.long
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"{fn}: attention_mask must be a tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != ids.shape:
        raise ValueError(
            f"{fn}: attention_mask has shape {list(attention_mask.shape)}, "
            f"sequences {list(ids.shape)}"
        )
    m = attention_mask.detach().cpu()
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{fn}: attention_mask must hold only 0 and 1")
    return m.bool(), attention_mask.dtype


def _ragged_tensor(
    fn: str,
    sequences: torch.Tensor,
    attention_mask: object,
    pad_id: int | None,
    padding_side: str | None,
) -> _Ragged:
    if sequences.dim() == 1:
        raise ValueError(
            f"{fn}: sequences must be a batch (a 2-d tensor or a list of "
            "sequences), got a 1-d tensor; for one sequence pass [ids]"
        )
    _check_ids_tensor(fn, "sequences", sequences, 2)
    ids = sequences.detach().cpu().long()
    real, mask_dtype = _real_positions(fn, ids, attention_mask, pad_id)
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


def _ragged_lists(fn: str, sequences: object) -> _Ragged:
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
        elif _is_sequence(seq):
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


def _starts(lens: torch.Tensor) -> torch.Tensor:
    """Where each row starts in ``flat``, given the rows' lengths."""
    return torch.cumsum(lens, 0) - lens


def _padded(flat: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Rows of ``flat`` (``lens`` long each) left-aligned in a zero-padded 2-d tensor."""
    n = lens.numel()
    width = int(lens.max()) if n else 0
    rows = torch.zeros(n, width, dtype=torch.long)
    if flat.numel():
        row = torch.repeat_interleave(torch.arange(n), lens)
        col = torch.arange(flat.numel()) - torch.repeat_interleave(_starts(lens), lens)
        rows[row, col] = flat
    return rows


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


def _vocab_size(fn: str, flat: torch.Tensor, vocab_size: object) -> int:
    top = int(flat.max()) + 1 if flat.numel() else 0
    if vocab_size is None:
        return top
    if not _is_int(vocab_size):
        raise TypeError(f"{fn}: vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < top:
        raise ValueError(f"{fn}: vocab_size is {vocab_size} but the sequences hold id {top - 1}")
    return int(vocab_size)

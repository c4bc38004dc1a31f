"""Argument checks shared by pykd.augment's public functions (the bottom layer: torch only).

Every check takes ``fn``, the public function's name, and raises TypeError or ValueError with a
message that starts with it.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Union

import torch

IdsLike = Union[torch.Tensor, Sequence[int]]
SeedLike = Union[int, torch.Generator, None]


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_sequence(x: object) -> bool:
    """A sequence that is not a string (a list, a tuple, ...)."""
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


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

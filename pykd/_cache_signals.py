"""What a teacher cache stores of each row of teacher logits: its "signal".

* ``"topk"``: the k largest logits and their classes; the loss renormalises them (biased: no
  mass off the top-k);
* ``"topk+rest"``: the same plus the log of the mass off them at the build's temperature, which
  ``distill_loss_topk``'s ``teacher_log_rest`` turns into a rest bucket;
* ``"sampled"``: ``k`` classes drawn with replacement from the teacher's softmax at the build's
  temperature, kept as distinct classes with logits ``T log(count)`` (Random-Sampling KD: the
  op's softmax at T is then count / k, an unbiased estimate of the teacher; docs/loss.md);
* ``"topk+sampled"``: the ``k - draws`` largest exactly, and the mass off them spread over
  ``draws`` classes drawn from the teacher's tail (its softmax without them): logits
  ``T log p`` for the top entries and ``T log(rest * count / draws)`` for the drawn ones, so
  the op's softmax at T is exact on the top and unbiased on the tail.

Every row of a signal is ``k`` (class, value) pairs, so the three share the top-k op and the
shard layout; class indices are stored in the fewest bytes the vocabulary needs. Sampling is
reproducible: each shard draws from its own generator seeded from the cache's seed and the
shard's number, uniforms consumed row after row, so a shard's rows do not depend on the batch
size, on resuming, or on which process built it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

SIGNALS = ("topk", "topk+rest", "sampled", "topk+sampled")
# Signals whose values hold at one temperature only (the rest's mass, the draws' distribution).
TEMPERATURE_BOUND = ("topk+rest", "sampled", "topk+sampled")
# Signals that draw classes (seeded per shard).
SAMPLED = ("sampled", "topk+sampled")


def signal_key(signal: str | None, temperature: float, seed: int,
               draws: int | None = None) -> dict[str, Any]:
    """A cache key's entries for ``signal``: none for full logits (so full-logit caches from
    before signals stay valid), else the signal, compact indices and what the rows depend on (a
    top-k cache from before signals is stale: it holds int32 indices)."""
    if signal is None:
        return {}
    key: dict[str, Any] = {"signal": signal, "index": "compact"}
    if signal in TEMPERATURE_BOUND:
        key["temperature"] = float(temperature)
    if signal in SAMPLED:
        key["seed"] = int(seed)
    if signal == "topk+sampled":
        key["draws"] = int(draws)
    return key


def check_signal(signal: str | None, k: int | None, temperature: float,
                 draws: int | None = None) -> None:
    """ValueError for a signal, k, temperature and draws that do not go together."""
    if signal != "topk+sampled" and draws is not None:
        raise ValueError(f"draws belongs to the 'topk+sampled' signal, not {signal!r}")
    if signal is None:
        if k is not None:
            raise ValueError("top_k needs a signal; the full-logit cache stores every logit")
        return
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS} or None, got {signal!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"signal {signal!r} needs top_k, a positive int, got {k!r}")
    if signal == "topk+sampled" and not (
            isinstance(draws, int) and not isinstance(draws, bool) and 1 <= draws < k):
        raise ValueError(f"signal 'topk+sampled' needs draws, an int in [1, top_k), of its top_k "
                         f"entries per row, got draws={draws!r} with top_k={k}")
    check_temperature(temperature)


def check_temperature(temperature: float) -> None:
    """ValueError unless ``temperature`` is a finite number > 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")


def index_bytes(vocab_size: int) -> int:
    """Bytes per stored class index: 2 up to 65,536 classes, 3 up to 16,777,216, else 4."""
    if vocab_size <= 1 << 16:
        return 2
    return 3 if vocab_size <= 1 << 24 else 4


def index_layout(vocab_size: int, k: int) -> tuple[np.dtype, tuple[int, ...]]:
    """numpy dtype and per-row shape of the stored indices."""
    width = index_bytes(vocab_size)
    if width == 3:
        return np.dtype(np.uint8), (k, 3)
    return np.dtype("<u2" if width == 2 else "<i4"), (k,)


def pack_indices(indices: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[R, k]`` int64 class indices as stored (see :func:`index_layout`), little-endian."""
    width = index_bytes(vocab_size)
    if width == 3:
        little = indices.astype("<u4").view(np.uint8).reshape(*indices.shape, 4)
        return np.ascontiguousarray(little[..., :3])
    return indices.astype("<u2" if width == 2 else "<i4")


def unpack_indices(stored: np.ndarray, vocab_size: int) -> torch.Tensor:
    """The int64 class indices of stored ones (the inverse of :func:`pack_indices`)."""
    if index_bytes(vocab_size) == 3:
        wide = np.zeros((*stored.shape[:-1], 4), dtype=np.uint8)
        wide[..., :3] = stored
        return torch.from_numpy(wide.view("<u4")[..., 0].astype(np.int64))
    return torch.from_numpy(stored.astype(np.int64))


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The draws' generator of one shard: a function of the cache's seed and the shard alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + shard) % (1 << 63))


@torch.no_grad()
def encode_rows(logits: torch.Tensor, signal: str, k: int, temperature: float,
                generator: torch.Generator | None = None, draws: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch of ``[R, V]`` teacher logits as ``signal`` stores them.

    Returns, on the CPU, float32 ``values [R, k]``, int64 ``indices [R, k]`` and, for
    ``"topk+rest"``, the float32 ``log_rest [R]`` (else None). The work runs where the logits
    are (a GPU teacher's rows never cross to the host whole). ``"sampled"`` and
    ``"topk+sampled"`` (``draws`` of its ``k`` entries) draw from ``generator`` (the shard's,
    on the CPU).
    """
    x = logits.detach().float()
    if signal == "sampled":
        values, index = _sampled(x, k, temperature, generator)
        return values.cpu(), index.cpu(), None
    if signal == "topk+sampled":
        assert draws is not None
        values, index = _top_and_tail(x, k - draws, draws, temperature, generator)
        return values.cpu(), index.cpu(), None
    top = x.topk(k, dim=-1)
    if signal == "topk":
        return top.values.cpu(), top.indices.cpu(), None
    _, log_rest = _top_log_probs(x, top.indices, temperature)
    return top.values.cpu(), top.indices.cpu(), log_rest.float().cpu()


def _top_log_probs(x: torch.Tensor, index: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-probabilities at ``temperature`` of the classes ``index`` and the log of the
    mass off them, ``log(1 - exp(logsumexp log p))`` (``-inf`` where they hold all of it)."""
    # (log_softmax then a gather measured faster than torch.logsumexp over the row.)
    log_p = torch.log_softmax(x.double() / temperature, dim=-1).gather(-1, index)
    kept = torch.logsumexp(log_p, dim=-1).clamp(max=0.0)
    return log_p, torch.log(-torch.expm1(kept))


def _top_and_tail(x: torch.Tensor, top_k: int, draws: int, temperature: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest classes with their log-probabilities, then ``draws`` draws from the
    softmax of the others, each distinct class carrying ``rest * count / draws``; every value is
    T times a log-probability, so the entries' softmax at T is that distribution itself."""
    top = x.topk(top_k, dim=-1)
    log_p, log_rest = _top_log_probs(x, top.indices, temperature)
    # The tail: the row without its top. A row whose top holds all the mass still takes
    # distinct tail classes (uniform draws, stored as unused -inf slots): the op needs k distinct
    # indices. One [R, V] temporary, no host sync.
    empty = (log_rest == float("-inf"))[:, None]
    tail = torch.where(empty, 0.0, x).scatter_(-1, top.indices, float("-inf"))
    counts_log, tail_index = _sampled(tail, draws, 1.0, generator, exclude=top.indices)
    tail_lp = counts_log.double() + log_rest[:, None] - math.log(draws)
    tail_lp = torch.where(empty, float("-inf"), tail_lp)
    values = temperature * torch.cat([log_p, tail_lp], dim=-1)
    return values.float(), torch.cat([top.indices, tail_index], dim=-1)


def _sampled(x: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws from ``softmax(x / temperature)`` per row as distinct classes with values
    ``temperature * log(count)``; padding slots (-inf) take classes neither drawn nor in
    ``exclude`` (``[R, e]`` classes of zero probability, kept out of the row's indices)."""
    rows, vocab = x.shape
    # Inverse CDF on float64 cumulative probabilities: k uniforms per row (drawn on the CPU,
    # consumed in row order, so the draws do not depend on how rows are batched).
    cdf = torch.softmax(x.double() / temperature, dim=-1).cumsum(-1)
    u = torch.rand(rows, k, dtype=torch.float64, generator=generator).to(x.device)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=vocab - 1)
    # Distinct classes and their counts from the k sorted draws (no [R, V] table): slot s of a
    # row holds its s-th distinct class, in class order, then padding.
    drawn = draws.sort(-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = first.cumsum(-1) - 1
    counts = torch.zeros(rows, k, dtype=torch.float64, device=x.device)
    counts.scatter_add_(-1, slot, torch.ones_like(u))
    index = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
    # Padding slots (count 0, so logit -inf) take the smallest classes not drawn (nor excluded):
    # k distinct indices per row. Among the first min(2k + e, V) classes at least k - distinct
    # are free.
    extra = 0 if exclude is None else exclude.shape[-1]
    candidates = torch.arange(min(2 * k + extra, vocab), device=x.device)
    taken = (candidates[None, :, None] == drawn[:, None, :]).any(-1)
    if exclude is not None:
        taken |= (candidates[None, :, None] == exclude[:, None, :]).any(-1)
    free = (taken * len(candidates) + candidates).argsort(-1)  # free classes first, ascending
    pad = counts == 0
    rank = (pad.cumsum(-1) - 1).clamp(min=0)
    index = torch.where(pad, candidates[free.gather(-1, rank)], index)
    return (temperature * counts.log()).float(), index


def from_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An external engine's top-k ``logprobs`` (``[R, k]``, normalised over the whole vocabulary
    at ``temperature``) as a ``"topk+rest"`` signal at that temperature.

    Log-probabilities at T are ``logits / T - logsumexp(logits / T)``: times T they are the
    logits up to a per-row constant, which the top-k softmax ignores at any temperature; the
    rest is the mass they miss at T. Unused slots may hold ``-inf``.
    """
    lp = logprobs.double()
    if bool((lp > 1e-6).any()) or bool(lp.isnan().any()):
        raise ValueError("logprobs must be log-probabilities (<= 0, no NaN)")
    kept = torch.logsumexp(lp, dim=-1).clamp(max=0.0)
    log_rest = torch.log(-torch.expm1(kept))
    values = torch.where(lp == float("-inf"), lp, lp * temperature)
    return values.float(), token_ids.long(), log_rest.float()

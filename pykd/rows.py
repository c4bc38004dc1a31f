"""Loss rows: which rows of the logits a batch scores, and against which labels.

One home for the rule, so that :class:`pykd.Distiller`, :class:`pykd.MutualDistiller` and the
Hugging Face :class:`~pykd.integrations.hf.DistillationTrainer` all score the same rows of the
same batch. A row counts where it has something to predict:

* with labels, where the label (shifted one position left for a causal LM) is not
  ``ignore_index``; for a causal LM with an ``attention_mask``, the logits' own position must be
  in the mask too;
* without labels, every non-padding position of ``[B, T, V]`` logits (every sample of
  ``[B, C]`` ones); for a causal LM only those whose next position is not padding either, since
  a position whose next token does not exist or is padding has nothing to predict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pykd._batches import Batch, parse_batch, shift_left, to_device, token_positions


def loss_rows(batch: Batch, *, token_logits: bool, causal_lm: bool = False,
              ignore_index: int = -100, where: str = "the batch"
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The target of each loss row (None without labels) and which rows count.

    Both are shaped like the logits without their last dimension: ``[B, T]`` for token-level
    logits, ``[B]`` otherwise. Labels are shifted (never the logits, whose slicing would copy
    them) so that row ``t`` of a causal LM is scored against the label at ``t + 1``.

    Args:
        batch: a parsed batch (:func:`pykd._batches.parse_batch`).
        token_logits: whether the logits are ``[B, T, V]`` (only read without labels).
        causal_lm: next-token prediction: row ``t`` predicts position ``t + 1``.
        ignore_index: the label of rows that count for nothing.
        where: which batch it is, for error messages.

    Raises:
        TypeError: the labels are not integers.
        ValueError: under ``causal_lm``, labels and ``attention_mask`` shaped differently, or
            token-level logits without labels, mask or ``input_ids``.
    """
    if batch.labels is None:
        if not token_logits:
            return None, torch.ones(batch.size, dtype=torch.bool, device=_device(batch))
        valid = token_positions(batch)
        return None, (valid & shift_left(valid, False)) if causal_lm else valid
    labels = batch.labels
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype} ({where}); "
                        "converting would truncate them")
    target = labels.long()
    if causal_lm:
        target = shift_left(target, ignore_index)
    valid = target != ignore_index
    if causal_lm and batch.attention_mask is not None:
        if batch.attention_mask.shape != target.shape:
            raise ValueError(
                f"labels shaped {tuple(target.shape)} do not match the attention_mask shaped "
                f"{tuple(batch.attention_mask.shape)} ({where})"
            )
        # Row t is the logits at position t, which must be in the mask too: with left padding
        # the last pad's shifted label is the first real token, yet the pad's logits are no
        # output of the model on real input (a teacher cache holds none for it).
        valid = valid & (batch.attention_mask.to(valid.device) != 0)
    return target, valid


def _device(batch: Batch) -> torch.device:
    found = next((t for t in (batch.labels, batch.positions_like, batch.attention_mask)
                  if t is not None), None)
    return found.device if found is not None else torch.device("cpu")


def _check_sample_weight(weight: torch.Tensor | None, where: str) -> None:
    """Refuse sample weights that are complex, negative, NaN or infinite."""
    # The raw weights: after normalising, all -1 would pass (-1 / -3 > 0), and mixed signs can
    # too where the op does not check (CUDA), giving a NaN loss that blames the logits.
    if weight is None:
        return
    if weight.is_complex():
        raise TypeError(f"sample_weight must be real, got {weight.dtype} ({where})")
    bad = ~(torch.isfinite(weight) & (weight >= 0))
    if bool(bad.any()):
        raise ValueError(f"sample_weight must be finite and >= 0, got "
                         f"{weight[bad][0].item()!r} ({where})")


def batch_on(raw: Any, device: torch.device, where: str) -> Batch:
    """``raw`` parsed (:func:`pykd._batches.parse_batch`) on ``device``, its sample weights
    checked first."""
    # Where the loader made them (the host, as a rule), reading the weights costs no sync.
    _check_sample_weight(parse_batch(raw).sample_weight, where)
    return parse_batch(to_device(raw, device))


def row_weights(rows: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """float32 weights of ``rows`` (bool, ``[B, ...]``): the rows times their sample's weight."""
    weights = rows.float()
    if sample_weight is not None:
        weights = weights * sample_weight.float().view(-1, *([1] * (rows.dim() - 1)))
    return weights


@dataclasses.dataclass
class Prepared:
    """A micro-batch on the training device with its rows worked out before any forward."""

    where: str  # which batch it is, for error messages
    batch: Batch
    target: torch.Tensor | None
    valid: torch.Tensor  # (*) bool, the rows of the logits that count
    logit_w: torch.Tensor  # (*) float32: valid * sample weight, summed into the normaliser
    hidden_w: torch.Tensor | None = None  # the same for the rows of the hidden states

    def check_logits(self, logits: torch.Tensor) -> None:
        """The batch's rows (its labels, or its token positions without them) are those of
        ``logits`` (or of a linear head's input, which has the same rows)."""
        lead = tuple(logits.shape[:-1])
        if tuple(self.valid.shape) == lead:
            return
        given = ("labels" if self.target is not None
                 else "the token positions (attention_mask or input_ids)")
        raise ValueError(f"{given} shaped {tuple(self.valid.shape)} do not match the logits "
                         f"shaped {tuple(logits.shape)} ({self.where}): one per row of logits, "
                         f"shaped {lead}")

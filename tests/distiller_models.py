"""Tiny models and data for the Distiller tests (also imported by the DDP worker script)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch import nn

import pykd

VOCAB = 11


@dataclasses.dataclass
class HFOutput:
    """Like a Hugging Face ModelOutput read through attributes."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class TinyLM(nn.Module):
    """Embedding, ``depth`` tanh layers and a head: ids [B, T] -> logits [B, T, VOCAB].

    ``pooled=True`` averages the tokens under the attention mask first (sequence classification,
    logits [B, VOCAB]). ``output`` picks the return type: "tensor", "dict" or "object".
    """

    def __init__(self, width: int = 8, depth: int = 2, output: str = "dict",
                 pooled: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, VOCAB)
        self.output, self.pooled = output, pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        states = [h]
        for block in self.blocks:
            h = torch.tanh(block(h))
            states.append(h)
        if self.pooled:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask.unsqueeze(-1).to(h.dtype)
            h = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
        logits = self.head(self.drop(h))
        if self.output == "tensor":
            return logits
        if self.output == "dict":
            return {"logits": logits, "hidden_states": tuple(states)}
        return HFOutput(logits, tuple(states))


def token_batch(batch: int, length: int, generator: torch.Generator,
                min_length: int = 2) -> dict[str, torch.Tensor]:
    """HF-style batch with right padding: input_ids, attention_mask, labels (-100 on padding)."""
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    lengths = torch.randint(min_length, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator).masked_fill(mask == 0,
                                                                                       -100)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def make(teacher=None, student=None, **options) -> pykd.Distiller:
    """A Distiller of TinyLMs (or the given models), without progress bars."""
    options.setdefault("progress", False)
    teacher = teacher if teacher is not None else TinyLM(width=12, depth=3)
    student = student if student is not None else TinyLM(width=6)
    return pykd.Distiller(teacher, student, **options)


def batches(n: int, size: int = 3, length: int = 5, seed: int = 1) -> list[dict]:
    """``n`` token batches of ``size`` padded sequences (see :func:`token_batch`)."""
    generator = torch.Generator().manual_seed(seed)
    return [token_batch(size, length, generator) for _ in range(n)]


def same_weights(a: nn.Module, b: nn.Module, **tol) -> None:
    """The two modules' state dicts are equal (within ``tol``, for assert_close)."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name, **tol)


class TokenDataset(torch.utils.data.Dataset):
    """Padded token sequences; ``noisy`` replaces tokens using Python's and NumPy's global RNGs,
    as a data augmentation would, so that resuming must restore those too."""

    def __init__(self, n: int, length: int = 6, seed: int = 0, noisy: bool = False) -> None:
        data = token_batch(n, length, torch.Generator().manual_seed(seed))
        self.items = [{k: v[i] for k, v in data.items()} for i in range(n)]
        self.noisy = noisy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.items[i])
        if self.noisy and random.random() < 0.5:
            ids = item["input_ids"].clone()
            ids[0] = int(np.random.randint(VOCAB))
            item["input_ids"] = ids
        return item


class Killed(Exception):
    """Stands in for a kill: raised from a callback to stop a run mid-training."""


class Kill(pykd.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, distiller, step, metrics):
        if step == self.at:
            raise Killed(f"killed at step {step}")

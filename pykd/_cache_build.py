"""Building a teacher cache: the teacher run over the samples of each shard its manifest lacks,
its outputs stored shard by shard (a killed build resumes at the first shard not stored)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pykd._batches import call_model, floating_dtype, logits_and_hidden, parse_batch, to_device
from pykd._cache_files import ShardStore

# The rows to store of one batch's logits, and how many belong to each sample.
RowsFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def build_shards(store: ShardStore, shards: range, teacher: nn.Module, dataset: Dataset, *,
                 batch_size: int, collate_fn: Callable[[list[Any]], Any] | None, rows: RowsFn,
                 progress: bool, on_shard: Callable[[int], None] | None) -> None:
    """Run ``teacher`` over the samples of each of ``shards`` and store its outputs in ``store``.

    The teacher runs where its parameters are, in eval mode under ``torch.no_grad()``, and is put
    back in its mode; ``rows(logits, batch)`` gives the rows to store of a batch's logits (and
    checks them against the cache). Arguments as in :meth:`pykd.TeacherCache.build`.
    """
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    # Floating inputs take the teacher's dtype (float32 data into a bfloat16 teacher).
    float_dtype = floating_dtype(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        for j in tqdm(shards, desc="teacher cache", unit="shard", disable=not progress):
            _build_shard(store, j, teacher, dataset, batch_size, collate_fn, device, float_dtype,
                         rows)
            if on_shard is not None:
                on_shard(j)
    finally:
        teacher.train(was_training)


@torch.no_grad()
def _build_shard(store: ShardStore, j: int, teacher: nn.Module, dataset: Dataset,
                 batch_size: int, collate_fn: Callable[[list[Any]], Any] | None,
                 device: torch.device, float_dtype: torch.dtype | None, rows_of: RowsFn) -> None:
    options = {} if collate_fn is None else {"collate_fn": collate_fn}
    loader = DataLoader(Subset(dataset, store.samples(j)), batch_size=batch_size, **options)
    values, indices, counts = [], [], []
    for raw in loader:
        batch = parse_batch(to_device(raw, device, float_dtype))
        logits, _ = logits_and_hidden(call_model(teacher, batch.inputs, {}))
        rows, count = rows_of(logits, batch)
        counts.append(count.cpu())
        if store.top_k is not None:
            top = rows.float().topk(store.top_k, dim=-1)
            values.append(top.values)
            indices.append(top.indices.to(torch.int32))
        else:
            values.append(rows)
    store.write_shard(j, torch.cat(values).float().cpu().numpy(),
                      np.concatenate([[0], torch.cat(counts).cumsum(0).numpy()]),
                      torch.cat(indices).cpu().numpy() if indices else None)

"""Batches and model outputs as the training loop, its objectives and the teacher cache read
them, and the order of an epoch's batches."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

Outputs = tuple[torch.Tensor, Union[Sequence[torch.Tensor], None]]  # logits, hidden states


@dataclasses.dataclass
class IndexedBatch:
    """A batch together with its samples' indices into a :class:`pykd.TeacherCache`.

    ``index[n]`` is the cache's sample (its position in the dataset the cache was built on) of
    the batch's ``n``-th sample; ``batch`` is any batch the Distiller takes (a dict, a tuple, a
    tensor), its samples masked as when the cache was built. Trained on from a cache, the
    Distiller looks the teacher's rows up by ``index`` instead of running the teacher.
    :meth:`pykd.TeacherCache.attach` makes loaders of these; any iterable of them (a stream of
    transfer rows, a sampler of your own) works as well::

        batches = (pykd.IndexedBatch(index, collate([dataset[i] for i in index]))
                   for index in my_order)

    Args:
        index: ``[B]`` integer indices (a tensor, or a sequence of ints, kept as int64).
        batch: the batch.
    """

    index: torch.Tensor  # [B] int64
    batch: Any

    def __post_init__(self) -> None:
        index = self.index
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index, dtype=torch.long)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool \
                or index.dim() != 1:
            raise TypeError(f"IndexedBatch.index must be a 1-D integer tensor of the samples' "
                            f"cache indices, got {index.dim()}-D {index.dtype}")
        self.index = index


@dataclasses.dataclass
class Batch:
    inputs: Any
    labels: torch.Tensor | None
    sample_weight: torch.Tensor | None
    attention_mask: torch.Tensor | None
    positions_like: torch.Tensor | None  # an input shaped [B, T, ...] where there is no mask
    size: int
    index: torch.Tensor | None = None  # dataset indices, from an IndexedBatch


def logits_and_hidden(output: Any) -> Outputs:
    """The logits and (if any) hidden states of a model's output."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, Mapping):
        logits, hidden = output.get("logits"), output.get("hidden_states")
    else:
        logits, hidden = getattr(output, "logits", None), getattr(output, "hidden_states", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "a model must return a logits tensor, a dict with 'logits' or an object with .logits, "
            f"got {type(output).__name__}"
        )
    return logits, hidden


def call_model(model: nn.Module, inputs: Any, extra: Mapping[str, Any]) -> Any:
    """``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``, plus keyword ``extra``."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **extra)
    return model(inputs, **extra)


# Where ``DistillationConfig.inputs`` may send a batch key.
ROUTES = ("teacher", "student", "both")


def routed_inputs(inputs: Mapping[str, Any], routes: Mapping[str, str] | None,
                  model: str) -> Mapping[str, Any]:
    """The keyword inputs of ``model`` (``"teacher"`` or ``"student"``): ``inputs`` without
    the keys that ``routes`` sends only to the other model (a key it does not name goes to
    both)."""
    if not routes:
        return inputs
    return {key: value for key, value in inputs.items()
            if routes.get(key, "both") in (model, "both")}


def to_device(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move the tensors of a nested batch (casting floating ones to ``float_dtype`` if given)."""
    if isinstance(obj, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and obj.is_floating_point() else None
        # Only a host-to-GPU copy may be asynchronous: the GPU's stream orders it before the
        # kernels that read it, whereas nothing orders a copy into host memory before its reads.
        non_blocking = torch.device(device).type == "cuda" and obj.device.type == "cpu"
        return obj.to(device=device, dtype=dtype, non_blocking=non_blocking)
    if isinstance(obj, IndexedBatch):
        return IndexedBatch(obj.index, to_device(obj.batch, device, float_dtype))
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, float_dtype) for v in obj)
    return obj


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of a model's first floating-point parameter, None if it has none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, Iterable) and not isinstance(obj, (str, bytes)):
        for value in values:
            found = first_tensor(value)
            if found is not None:
                return found
    return None


def split_batch(batch: Any) -> tuple[Any, Any, Any]:
    """``(inputs, labels, sample_weight)`` of a batch (or of one dataset item).

    Dict batches are Hugging Face style: model keyword inputs plus optional ``"labels"`` and
    ``"sample_weight"``. Tuples are ``(inputs,)``, ``(inputs, labels)`` or
    ``(inputs, labels, sample_weight)``. A bare tensor is the input.
    """
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None), inputs.pop("sample_weight", None)
    if isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                "a tuple batch is (inputs, labels, sample_weight) or a prefix of it, "
                f"got {len(batch)} items"
            )
        inputs, labels, weight = (*batch, None, None)[:3]
        return inputs, labels, weight
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    raise TypeError(f"batches must be dicts, tuples or tensors, got {type(batch).__name__}")


def _token_inputs(inputs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask of the logits' token positions and an input shaped like them. An
    encoder-decoder's logits are the decoder's positions: its ``decoder_attention_mask`` and
    ``decoder_input_ids`` name them, never the encoder's mask (which may even be as long)."""
    if isinstance(inputs, Mapping):
        for prefix in ("decoder_", ""):
            mask, ids = inputs.get(prefix + "attention_mask"), inputs.get(prefix + "input_ids")
            if isinstance(mask, torch.Tensor) or isinstance(ids, torch.Tensor):
                return mask, ids if isinstance(ids, torch.Tensor) else mask
    return None, first_tensor(inputs)


def parse_batch(batch: Any) -> Batch:
    """Split a batch (see :func:`split_batch`) and find its size, mask and token positions."""
    index = None
    if isinstance(batch, IndexedBatch):
        index, batch = batch.index, batch.batch
    inputs, labels, weight = split_batch(batch)
    for name, value in (("labels", labels), ("sample_weight", weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    mask, positions_like = _token_inputs(inputs)
    sized = next((t for t in (labels, positions_like, mask) if t is not None), None)
    if sized is None:
        raise ValueError("a batch must hold at least one tensor")
    if weight is not None and tuple(weight.shape) != (sized.shape[0],):
        raise ValueError(
            f"sample_weight must be shaped ({sized.shape[0]},), got {tuple(weight.shape)}"
        )
    if index is not None and tuple(index.shape) != (sized.shape[0],):
        raise ValueError(f"the sample indices must be shaped ({sized.shape[0]},), "
                         f"got {tuple(index.shape)}")
    return Batch(inputs, labels, weight, mask, positions_like, sized.shape[0], index)


def token_positions(batch: Batch) -> torch.Tensor:
    """[B, T] bool: the token positions that are not padding."""
    if batch.attention_mask is not None:
        return batch.attention_mask != 0
    if batch.positions_like is not None and batch.positions_like.dim() >= 2:
        return torch.ones(batch.positions_like.shape[:2], dtype=torch.bool,
                          device=batch.positions_like.device)
    raise ValueError(
        "token-level outputs without labels need an 'attention_mask' or 'input_ids' "
        "in the batch to tell which positions count"
    )


def rebuildable(data: Any) -> bool:
    """A DataLoader that can be re-created with another sampler (see :func:`loader_like`)."""
    return (
        isinstance(data, DataLoader)
        and data.batch_size is not None
        and not isinstance(data.dataset, IterableDataset)
        and (type(data.sampler) is SequentialSampler
             or (type(data.sampler) is RandomSampler and not data.sampler.replacement))
    )


def loader_like(loader: DataLoader, dataset: Dataset, collate_fn: Any,
                **options: Any) -> DataLoader:
    """A DataLoader over ``dataset`` with ``loader``'s batch size, workers and other settings,
    plus ``options`` (the sampler or ``shuffle``, or a ``batch_sampler``; a generator)."""
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    # A batch sampler makes the batches: DataLoader refuses a batch size or drop_last beside it.
    if "batch_sampler" not in options:
        extra.update(batch_size=loader.batch_size, drop_last=loader.drop_last)
    return DataLoader(
        dataset, collate_fn=collate_fn, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, **extra, **options,
    )


def shift_left(x: torch.Tensor, fill: Any) -> torch.Tensor:
    """Row t takes x[:, t + 1]; the last row gets ``fill`` (causal LM next-token alignment).

    Shifting the labels (and masks), never the logits, keeps the [B, T, V] logits contiguous:
    slicing them would make the loss copy them.
    """
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


class _OrderSampler(Sampler[int]):
    """The sample order the training loop controls, so a resumed run sees the same batches.

    A permutation seeded from (seed, epoch) (or the identity), padded by wrapping around to a
    multiple of the world size when every process must run the same number of steps, strided
    across processes like ``DistributedSampler`` and minus the samples already consumed.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world: int,
                 pad: bool, skip: int) -> None:
        if shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if pad and n % world:
            total = math.ceil(n / world) * world
            order = (order * math.ceil(total / n))[:total]
        self.indices = order[rank::world][skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_batches(data: Iterable[Any], *, epoch: int, skip: int, train: bool, seed: int,
                  rank: int, world: int) -> tuple[Iterator[Any], int | None]:
    """This process's batches of ``epoch`` after the first ``skip``, and how many remain.

    A :func:`rebuildable` loader is re-created with the loop's own order (shuffled from
    ``(seed, epoch)`` when it shuffles and ``train``), sharded across the ``world`` processes;
    any other iterable is used as it is.
    """
    if rebuildable(data):
        sampler = _OrderSampler(
            len(data.dataset), shuffle=train and isinstance(data.sampler, RandomSampler),
            seed=seed, epoch=epoch, rank=rank, world=world, pad=train,
            skip=skip * data.batch_size,
        )
        loader = loader_like(
            data, data.dataset, data.collate_fn, sampler=sampler,
            # Its own generator: otherwise creating the iterator draws from the global RNG,
            # which a resumed run would replay at a different point.
            generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch) + rank),
        )
        return iter(loader), len(loader)
    set_epoch = getattr(getattr(data, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    with torch.random.fork_rng(devices=[]):
        batches = iter(data)
    total = len(data) - skip if hasattr(data, "__len__") else None
    return itertools.islice(batches, skip, None), total

"""A teacher cache from outputs computed elsewhere: an inference engine's top-k token ids and
log-probabilities per position (:meth:`pykd.TeacherCache.from_logprobs`), checked sample by
sample against the dataset they claim to score, and written as the shards of a ``"topk+rest"``
cache (:mod:`pykd._cache_signals`)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from pykd._batches import parse_batch, token_positions
from pykd._cache_build import Processes, prepare
from pykd._cache_files import ShardStore, new_manifest
from pykd._cache_signals import from_logprobs

Record = tuple[Any, Any]


def read_logprobs_jsonl(path: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The records of a JSON-lines dump of an engine's top-k log-probabilities, one line per
    sample: ``{"token_ids": [[id, ...], ...], "logprobs": [[lp, ...], ...]}`` (one inner list
    per position, ``k`` entries each; or flat lists for one row per sample). Other fields are
    ignored. Yields ``(token_ids, logprobs)`` as int64 and float64 arrays, lazily.

    Raises:
        ValueError: a line is not such an object, naming the line.
    """
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ids = np.asarray(item["token_ids"], dtype=np.int64)
                lps = np.asarray(item["logprobs"], dtype=np.float64)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a record with 'token_ids' and "
                                 f"'logprobs' lists ({error})") from None
            yield ids, lps


def import_logprobs(path: Path, dataset: Dataset, records: Iterable[Record], *,
                    key: dict[str, Any], temperature: float, vocab_size: int, shard_size: int,
                    collate_fn: Callable[[list[Any]], Any] | None, overwrite: bool,
                    progress: bool) -> dict[str, Any]:
    """Write ``records`` (see :meth:`pykd.TeacherCache.from_logprobs`) as the shards of a cache
    at ``path``; returns its manifest. A finished cache of the same key is kept as it is, an
    unfinished one completed (its records for finished shards are read and skipped)."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    stream = map(_pair, records)
    first = next(stream, None)
    if first is None:
        raise ValueError("no records: the dump must hold one record per sample")
    k = np.shape(first[0])[-1] if np.ndim(first[0]) else 0
    if k < 1:
        raise ValueError("a record's token_ids must be [k] or [rows, k] with k >= 1")
    key = {**key, "top_k": k, "signal": "topk+rest", "index": "compact",
           "temperature": float(temperature)}
    manifest = prepare(path, new_manifest(key, len(dataset), shard_size), overwrite=overwrite,
                       processes=Processes(False))
    token_level = np.ndim(first[0]) == 2
    for name, value in (("token_level", token_level), ("vocab_size", vocab_size)):
        if manifest[name] not in (None, value):
            raise ValueError(f"the records' {name} {value} differs from the cache's "
                             f"{manifest[name]}")
        manifest[name] = value
    store = ShardStore(path, manifest)
    collate = collate_fn or default_collate
    stream = itertools.chain([first], stream)
    for j in tqdm(range(store.num_shards()), desc="importing", unit="shard",
                  disable=not progress):
        samples = store.samples(j)
        chunk = list(itertools.islice(stream, len(samples)))
        if len(chunk) < len(samples):
            raise ValueError(f"{samples.start + len(chunk)} records for {len(dataset)} samples: "
                             "the dump must hold one record per sample, in order")
        if str(j) in manifest["shards"]:
            continue
        ids, lps, counts = [], [], []
        for i, (token_ids, logprobs) in zip(samples, chunk):
            rows = _rows_of(dataset[i], collate, token_level)
            a, b = _check_record(i, token_ids, logprobs, rows, k, vocab_size, token_level)
            ids.append(a)
            lps.append(b)
            counts.append(len(a))
        values, index, log_rest = from_logprobs(torch.from_numpy(np.concatenate(ids)),
                                                torch.from_numpy(np.concatenate(lps)),
                                                temperature)
        store.write_shard(j, values.numpy(), np.concatenate([[0], np.cumsum(counts)]),
                          index.numpy(), log_rest.numpy())
    if next(stream, None) is not None:
        raise ValueError(f"more records than the dataset's {len(dataset)} samples: the dump "
                         "must hold one record per sample, in order")
    return manifest


def _pair(record: Any) -> Record:
    """``(token_ids, logprobs)`` of a record given as that pair or as a mapping with those
    keys (a parsed JSON line)."""
    if isinstance(record, dict):
        return record["token_ids"], record["logprobs"]
    token_ids, logprobs = record
    return token_ids, logprobs


def _rows_of(item: Any, collate: Callable[[list[Any]], Any], token_level: bool) -> int:
    """How many rows the Distiller will look up for one sample: its token positions."""
    if not token_level:
        return 1
    return int(token_positions(parse_batch(collate([item]))).sum())


def _check_record(i: int, token_ids: Any, logprobs: Any, rows: int, k: int, vocab_size: int,
                  token_level: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i``'s record as ``[rows, k]`` int64 ids and float64 log-probabilities, or a
    ValueError naming the sample and what does not fit."""
    ids = np.asarray(token_ids, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float64)
    shape = (rows, k) if token_level else (k,)
    where = f"sample {i}: "
    if ids.shape != shape or lps.shape != shape:
        raise ValueError(f"{where}token_ids {ids.shape} and logprobs {lps.shape} must both be "
                         f"{shape} ({rows} token positions, k = {k})")
    ids, lps = ids.reshape(-1, k), lps.reshape(-1, k)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{where}a token id is outside [0, {vocab_size})")
    if k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        raise ValueError(f"{where}a position repeats a token id; the k ids must be distinct")
    if np.isnan(lps).any() or (lps > 1e-6).any():
        raise ValueError(f"{where}logprobs must be log-probabilities (<= 0, no NaN)")
    return ids, np.minimum(lps, 0.0)

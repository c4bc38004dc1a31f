"""The training loop shared by every objective (:mod:`pykd.objective`).

It owns :meth:`~TrainingLoop.fit` and :meth:`~TrainingLoop.evaluate`; the optimizer step over
accumulated micro-batches with the exact normaliser of the whole step; clipping, AMP and the
non-finite checks (:mod:`pykd.update`); the order of the batches; checkpoints and exact resume;
callbacks, JSONL metrics and progress bars; and DDP under ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import numbers
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pykd._batches import epoch_batches
from pykd.checkpoint import PathLike, load_checked, rng_state, save_atomic, set_rng_state
from pykd.config import PRECISIONS, TrainingConfig, configure
from pykd.objective import Objective
from pykd.update import NonFiniteLossError, Updater

_CHECKPOINT_KEYS = ("format", "optimizer", "scheduler", "scaler", "global_step", "epoch",
                    "batch_in_epoch", "rng", "world_size")

__all__ = ["NonFiniteLossError", "TrainingLoop"]


def _all_rng_states(world_size: int) -> list[Any]:
    """Every process's RNG states, gathered (every process must call this)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


class _MetricsLog:
    """The JSON-lines metrics file (None: not written, as on processes other than 0) and the
    samples per second between logging steps."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.restart()

    def restart(self) -> None:
        self.clock, self.samples = time.perf_counter(), 0

    def throughput(self) -> float:
        """Samples per second since the last call (or :meth:`restart`)."""
        now = time.perf_counter()
        rate = self.samples / max(now - self.clock, 1e-9)
        self.clock, self.samples = now, 0
        return rate

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class TrainingLoop:
    """Train an :class:`pykd.objective.Objective`: the loop behind :class:`pykd.Distiller` and
    :class:`pykd.MutualDistiller`, which document the behaviour in full.

    Each optimizer step takes ``accumulation_steps`` micro-batches; their loss rows are weighed
    by the inverse of the objective's normalisers summed over all of them and all processes, so
    the gradient is that of one batch holding them all. A NaN or infinite loss or gradient norm
    raises :class:`NonFiniteLossError` (fp16 overflows are skipped as ``GradScaler`` skips them);
    a step whose rows all weigh 0 is not taken.

    Args:
        objective: what each step computes.
        config: the loop's options, a :class:`pykd.TrainingConfig` (``accumulation_steps``,
            ``max_grad_norm``, ``precision``, ``seed``, checkpoints, metrics, ``progress``,
            ``callbacks``, ``ddp_kwargs``, and the ``optimizer``, ``lr`` and ``scheduler``
            passed to the objective's :meth:`~pykd.objective.Objective.make_optimizers`).
        **options: any of those options, laid over ``config``.

    Attributes:
        config, objective, optimizers, schedulers, scaler, callbacks: the pieces above.
        global_step, epoch, batch_in_epoch: steps taken, the epoch in progress and the batches
            of it already consumed.
        rank, world_size, device: this process's place and the objective's device.
    """

    def __init__(self, objective: Objective, config: TrainingConfig | None = None,
                 **options: Any) -> None:
        self.config = config = configure(TrainingConfig, config, options)
        self.objective = objective
        for name in ("accumulation_steps", "max_grad_norm", "seed", "log_every", "progress",
                     "checkpoint_path", "checkpoint_every"):
            setattr(self, name, getattr(config, name))  # where users have always read them
        self.metrics_path = None if config.metrics_path is None else Path(config.metrics_path)
        self.callbacks = list(config.callbacks)

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = objective.device
        self._model = objective.module
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self._model = DistributedDataParallel(objective.module, device_ids=device_ids,
                                                  **dict(config.ddp_kwargs or {}))
        self.optimizers, self.schedulers = objective.make_optimizers(
            config.optimizer, config.lr, config.scheduler)
        self._amp_dtype = PRECISIONS[config.precision]
        self.scaler = (torch.amp.GradScaler(self.device.type) if config.precision == "fp16"
                       else None)
        self._updater = Updater(self.optimizers, self.schedulers, self.scaler,
                                config.max_grad_norm)

        self._log = _MetricsLog(self.metrics_path if self.rank == 0 else None)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # ----------------------------------------------------------------------------- public API

    def fit(self, train_loader: Iterable[Any], epochs: int = 1,
            eval_loader: Iterable[Any] | None = None, *,
            resume_from: PathLike | None = None) -> dict[str, float]:
        """Train for ``epochs`` epochs in all (counting those of a resumed checkpoint).

        A ``DataLoader`` over a map-style dataset with a sequential or shuffling sampler is
        re-created with the loop's own order (shuffled from ``(seed, epoch)`` when the loader
        shuffles), sharded across processes under ``torch.distributed``; any other iterable of
        batches is used as it is (already sharded, deterministic to resume).

        Args:
            train_loader: the training batches (see :class:`pykd.Distiller` for batch formats).
            epochs: the total number of epochs.
            eval_loader: batches to :meth:`evaluate` after every epoch.
            resume_from: a checkpoint to continue from (weights, optimizer, position, RNG).

        Returns:
            The metrics of the last evaluation, or ``{}`` without ``eval_loader``.

        Raises:
            ValueError: ``train_loader`` yields no batch in an epoch (an iterator used up by an
                earlier epoch, say), or ``eval_loader`` none at all.
            NonFiniteLossError: a loss or gradient is NaN or infinite.
        """
        if not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if 0 < epochs <= self.epoch:
            # Calling fit once per epoch in a loop is a common habit that would train only once.
            warnings.warn(
                f"fit(epochs={epochs}) trains nothing: {self.epoch} epoch(s) are already done and "
                "epochs counts all of them in total (so that a resumed run stops where the "
                f"uninterrupted one would); pass epochs={self.epoch + epochs} to train {epochs} "
                "more", UserWarning, stacklevel=2,
            )
        self._emit("on_fit_start")
        self._updater.zero_grad()
        self._log.restart()
        metrics: dict[str, float] = {}
        while self.epoch < epochs:
            epoch = self.epoch
            self._emit("on_epoch_start", epoch)
            self._train_epoch(train_loader, epoch, epochs)
            metrics = {}
            if eval_loader is not None:
                metrics = self._evaluate(eval_loader, "eval_loader")
                self._log.write({"split": "eval", "step": self.global_step,
                                     "epoch": epoch, **metrics})
                self._emit("on_eval_end", metrics)
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self._emit("on_epoch_end", epoch, metrics)
            # Saved after the evaluation and the callbacks, so that the RNG states it holds are
            # past whatever they drew and a resumed run draws the same numbers.
            if self.checkpoint_path is not None:
                self.save_checkpoint(self.checkpoint_path)
        self._emit("on_fit_end")
        return metrics

    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """The objective's metrics (:meth:`~pykd.objective.Objective.summary`) on ``loader``,
        at the current schedules. Under ``torch.distributed`` each process evaluates its shard
        and the sums are all-reduced, so every process must call it.

        Raises:
            ValueError: ``loader`` yields no batch.
        """
        return self._evaluate(loader, "loader")

    @torch.no_grad()
    def _evaluate(self, loader: Iterable[Any], name: str) -> dict[str, float]:
        module = self.objective.module
        was_training = module.training
        module.eval()
        hyper = self.objective.hyperparameters(self.global_step)
        sums = self.objective.zero_stats()
        labelled, count = False, 0
        batches, total = self._batches(loader, epoch=0, skip=0, train=False)
        bar = tqdm(batches, total=total, desc="eval", unit="batch", leave=False,
                   disable=not self.progress or self.rank != 0)
        try:
            for i, raw in enumerate(bar):
                prep = self.objective.prepare(raw, f"evaluation batch {i}")
                labelled |= prep.target is not None
                with self._autocast():
                    rows = self.objective.forward(prep, module, hyper)
                sums += self.objective.stats(rows, prep, hyper)
                count += 1
        finally:
            bar.close()
            module.train(was_training)
        # The batch count travels with the sums: one process may have none where others do.
        totals = self._all_reduce(torch.cat([sums, sums.new_tensor([count])]))
        if totals[-1].item() == 0:
            raise ValueError(f"{name} yielded no batches to evaluate")
        return self.objective.summary(totals[:-1], hyper, labelled)

    def save_checkpoint(self, path: PathLike) -> None:
        """Save everything needed to resume (on process 0; every process must call this)."""
        rngs = _all_rng_states(self.world_size)
        if self.rank != 0:
            return
        save_atomic({
            "format": self.objective.checkpoint_format, **self.objective.state_dict(),
            **self._updater.state_dict(), "global_step": self.global_step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "world_size": self.world_size,
        }, path)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore a :meth:`save_checkpoint` file, including this process's RNG states.

        The file is read as data (``weights_only=True``); a file of another kind, or one saved
        with another number of processes, raises ``ValueError``.
        """
        fmt = self.objective.checkpoint_format
        state = load_checked(path, (*_CHECKPOINT_KEYS, *self.objective.state_dict()))
        if state["format"] != fmt:
            raise ValueError(f"{path}: checkpoint format {state['format']!r}, expected {fmt!r}")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was saved by {state['world_size']} processes, this run has "
                f"{self.world_size}: the data shards and position would not match"
            )
        self._updater.check_state(state, path)
        self.objective.load_state_dict(state)
        self._updater.load_state_dict(state)
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        set_rng_state(state["rng"][self.rank])

    # ------------------------------------------------------------------------------ training

    def _train_epoch(self, loader: Iterable[Any], epoch: int, epochs: int) -> None:
        self.objective.module.train()
        start = self.batch_in_epoch
        batches, total = self._batches(loader, epoch, start, train=True)
        if total is not None:
            total += start
        with tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}",
                  unit="batch", disable=not self.progress or self.rank != 0) as bar:
            while group := list(itertools.islice(batches, self.accumulation_steps)):
                detailed = self.log_every > 0 and (self.global_step + 1) % self.log_every == 0
                metrics = self._step(group, epoch, detailed)
                self.batch_in_epoch += len(group)
                bar.update(len(group))
                if metrics is None:  # no step taken (see Updater.go_ahead): nothing to report
                    continue
                if not bar.disable:  # formatting the postfix costs ~10 us a step
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                if detailed:
                    self._log.write({"split": "train", **metrics})
                self._emit("on_step_end", self.global_step, metrics)
                # After the callbacks, for the same reason as at the epoch end (see fit).
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 \
                        and self.checkpoint_path is not None:
                    self.save_checkpoint(self.checkpoint_path)
        # Resuming at the very end of an epoch legitimately leaves no batch; a fresh epoch must.
        if start == 0 and self.batch_in_epoch == 0:
            raise ValueError(
                f"train_loader yielded no batches in epoch {epoch}"
                + ("" if epoch == 0 else "; an iterator or generator is used up after one pass: "
                   "give a list or a DataLoader")
            )

    def _step(self, group: list[Any], epoch: int, detailed: bool) -> dict[str, float] | None:
        """One optimizer step over the micro-batches of ``group``; ``detailed`` adds metrics.

        Returns None where no step is taken (see :meth:`pykd.update.Updater.go_ahead`).
        """
        objective, step, first = self.objective, self.global_step, self.batch_in_epoch
        hyper = objective.hyperparameters(step)
        prepared = [objective.prepare(raw, f"batch {first + j} of epoch {epoch}")
                    for j, raw in enumerate(group)]
        # The normaliser of the whole step (all micro-batches, all processes) is known before any
        # forward, so each micro-batch's rows carry their final weight and nothing is rescaled.
        denominators = self._all_reduce(
            torch.stack([objective.normalisers(p) for p in prepared]).sum(0).double())
        loss_scale = self._updater.loss_scale(self.device)
        inverse = torch.where(denominators > 0, self.world_size / denominators,
                              torch.zeros_like(denominators)).float() * loss_scale
        sums = objective.zero_stats()
        losses = []
        for j, prep in enumerate(prepared):
            last = j == len(prepared) - 1
            no_sync = self._model.no_sync if self.world_size > 1 and not last else \
                contextlib.nullcontext
            with no_sync():
                with self._autocast():
                    rows = objective.forward(prep, self._model, hyper)
                loss = objective.loss(rows, inverse, hyper)
                if detailed:
                    sums += objective.stats(rows, prep, hyper)
                losses.append(loss.detach())
                loss.backward()
        norms = self._updater.grad_norms()
        losses = (self._all_reduce(torch.stack(losses).double())
                  / (self.world_size * loss_scale.double()))
        # One sync per step: the per-micro-batch losses summed over processes (unscaled), the
        # step's normalisers and each optimizer's gradient norm (equal on every process after
        # DDP's all-reduce), read together.
        values = torch.cat([losses, denominators,
                            torch.stack([n.to(self.device, torch.float64) for n in norms])]
                           ).tolist()
        n, terms = len(prepared), len(denominators)
        step_losses = values[:n]
        where = f"at step {step + 1} (epoch {epoch}, {{batches}} of the epoch)"
        if not self._updater.go_ahead(step_losses, values[n:n + terms], values[n + terms:],
                                      loss_scale, where, first):
            return None
        lr = self._updater.apply(norms)
        self.global_step += 1
        self._log.samples += sum(p.batch.size for p in prepared) * self.world_size
        metrics = {"step": self.global_step, "epoch": epoch, "loss": sum(step_losses), "lr": lr,
                   **objective.schedule_metrics(hyper)}
        if detailed:
            has_labels = any(p.target is not None for p in prepared)
            # The summary's loss is rebuilt from its parts; keep the exact one.
            metrics = {**objective.summary(self._all_reduce(sums), hyper, has_labels), **metrics}
            metrics["samples_per_s"] = self._log.throughput()
        return metrics

    # -------------------------------------------------------------------------------- helpers

    def _batches(self, data: Iterable[Any], epoch: int, skip: int, train: bool) -> Any:
        return epoch_batches(data, epoch=epoch, skip=skip, train=train, seed=self.seed,
                             rank=self.rank, world=self.world_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

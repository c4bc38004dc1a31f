"""The multi-process half of test_distiller's DDP test.

``torchrun --nproc_per_node 2 distiller_ddp_worker.py OUT 4`` trains with 4 samples per process
and batch, checkpointing to OUT.ckpt; the test runs :func:`train` in one process with 8 and
compares.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from distiller_models import TinyLM, TokenDataset
from torch.utils.data import DataLoader

import pykd


def train(batch_size: int, checkpoint: str | None = None) -> tuple[pykd.Distiller, dict]:
    """Token-level KD with hidden matching, accumulation and clipping; returns the eval metrics."""
    torch.manual_seed(0)
    teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
    distiller = pykd.Distiller(
        teacher, student, temperature=2.0, alpha=0.5, lr=0.05, accumulation_steps=2,
        max_grad_norm=1.0, hidden=pykd.HiddenMatch({1: 2, 2: 3}, student_width=6,
                                                   teacher_width=12),
        checkpoint_path=checkpoint, checkpoint_every=1, progress=False,
    )
    train_data = DataLoader(TokenDataset(32, seed=1), batch_size=batch_size, shuffle=True)
    eval_data = DataLoader(TokenDataset(10, seed=2), batch_size=3)
    metrics = distiller.fit(train_data, epochs=2, eval_loader=eval_data)
    return distiller, metrics


if __name__ == "__main__":
    # A lost peer fails the collectives after a minute instead of hanging the test run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    distiller, metrics = train(batch_size=int(sys.argv[2]), checkpoint=sys.argv[1] + ".ckpt")
    if dist.get_rank() == 0:
        torch.save({"student": distiller.student.state_dict(),
                    "projections": distiller.projections.state_dict(),
                    "metrics": metrics, "world_size": distiller.world_size}, sys.argv[1])
    # Tear down in order (DDP's reducer, then the group, once both ranks are done): a gloo group
    # left to interpreter shutdown can abort the process.
    del distiller
    dist.barrier()
    dist.destroy_process_group()

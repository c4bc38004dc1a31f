"""The multi-process half of test_onpolicy's DDP test.

``torchrun --nproc_per_node 2 onpolicy_ddp_worker.py OUT 4`` trains on-policy with 4 samples per
process and batch; the test runs :func:`train` in one process with 8 and compares. Greedy samples
(of uneven lengths) make the two runs' samples the same, so the step's normaliser over both
processes' generated tokens is what is compared.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from distiller_models import TinyLM, TokenDataset
from torch.utils.data import DataLoader

import pykd


def train(batch_size: int) -> pykd.Distiller:
    torch.manual_seed(0)
    teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
    distiller = pykd.Distiller(
        teacher, student, causal_lm=True, divergence="jsd", alpha=0.5, lr=0.05,
        accumulation_steps=2, progress=False,
        on_policy=pykd.OnPolicy(lmbda=0.5, temperature=0.0, eos_token_id=3, max_new_tokens=4,
                                prompt_tokens=2, seed=3),
    )
    distiller.fit(DataLoader(TokenDataset(32, seed=1), batch_size=batch_size, shuffle=True),
                  epochs=2)
    return distiller


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    distiller = train(batch_size=int(sys.argv[2]))
    if dist.get_rank() == 0:
        torch.save({"student": distiller.student.state_dict(),
                    "world_size": distiller.world_size}, sys.argv[1])
    del distiller
    dist.barrier()
    dist.destroy_process_group()

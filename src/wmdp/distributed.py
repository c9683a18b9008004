"""Data-parallel evaluation: `torchrun --nproc-per-node N -m wmdp eval ...`.

Each process scores every N-th row (rows are sorted by length first, so the shares are
balanced) and the scores are gathered to all; rank 0 alone writes files. A row's score does not
depend on which batch it ran in, so 1 and N processes give the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op when alone)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()

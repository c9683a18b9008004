"""Processes under torchrun (or `accelerate launch`): the process group and what rank 0 does.

Data-parallel evaluation, `torchrun --nproc-per-node N -m wmdp eval ...`: each process scores
every N-th row (rows are sorted by length first, so the shares are balanced) and the scores are
gathered to all; rank 0 alone writes files. A row's score does not depend on which batch it ran
in, so 1 and N processes give the same numbers. Full fine-tuning (`wmdp unlearn ga|npo|...`)
joins the same group and shards the model with FSDP (`wmdp.unlearn.parallel`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch

from wmdp.errors import WmdpError

T = TypeVar("T")


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


def is_sharded(x: Any) -> bool:
    """Whether `x` is a DTensor: a parameter of a model FSDP sharded (`wmdp.unlearn.parallel`)."""
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def barrier() -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 alone (it writes files), its result on every process; a WmdpError it
    raises is raised on every process, so none waits for the others forever."""
    if rank_world()[1] == 1:
        return fn()
    result: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            result = ("ok", fn())
        except WmdpError as e:
            result = ("error", str(e))
    kind, value = broadcast(result)
    if kind == "error":
        raise WmdpError(value)
    return value

"""Full fine-tuning on many processes: torch's FSDP2 (`fully_shard`), launched by torchrun or
accelerate, with the same command and config as one process.

    torchrun --nproc-per-node 8 -m wmdp unlearn npo --config npo.yaml
    accelerate launch --num-processes 8 -m wmdp unlearn npo --config npo.yaml
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 -m wmdp unlearn npo --config npo.yaml   # and node-rank 1

Every decoder block and the root module are sharded over all processes (parameters, gradients
and AdamW's moments: 1/N each), and every forward gathers the block it runs. The engine is
torch's FSDP2, the one accelerate's FSDP plugin (version 2) calls; it is used directly because
accelerate turns FSDP on only for GPUs, and this path must be testable on CPU (gloo).

Each step's global batch is the one process's: the same texts in the same order, split into N
contiguous shares (`share`). A loss that is a mean over tokens (or texts) is not the mean of the
ranks' means when the shares hold different token counts, so every mean goes through
`global_mean`: the rank's sum over the global count (all-reduced), times N, so that the average
over ranks (what FSDP does to gradients, and what the loop does to metrics) is the global mean.
1 and N processes then take the same update, up to float summation order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import torch
from torch import nn

from wmdp.distributed import is_sharded, rank_world
from wmdp.errors import WmdpError
from wmdp.models import decoder_layers
from wmdp.unlearn.batches import Step

# the methods whose steps are means over a batch's tokens or texts (RMU trains a few tensors of
# one prefix and fits one GPU; SSD takes no step; the -sam and -lat variants are not ported)
DATA_PARALLEL = ("ga", "graddiff", "npo", "llmu", "scrub", "undo")

T = TypeVar("T")
_active = False  # set by `training` while a data-parallel run's steps go on


def active() -> bool:
    """Whether a data-parallel training run is going on in this process."""
    return _active


@contextmanager
def training(enabled: bool) -> Iterator[None]:
    """Means are global (`global_mean`) inside; outside (evaluation, planning) they are local."""
    global _active
    saved, _active = _active, enabled and rank_world()[1] > 1
    try:
        yield
    finally:
        _active = saved


def check_method(name: str, device_map: str | None) -> None:
    """One-line errors for what cannot run data-parallel, before anything is loaded."""
    world = rank_world()[1]
    if world == 1:
        return
    if name not in DATA_PARALLEL:
        raise WmdpError(f"{name} does not run data-parallel ({world} processes); run it as one "
                        f"process, without torchrun (data-parallel: {', '.join(DATA_PARALLEL)})")
    if device_map:
        raise WmdpError(f"device_map {device_map!r} with {world} processes: FSDP shards the "
                        "model over the processes; drop --device-map")


def share(texts: list[T]) -> list[T]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    rank, world = rank_world() if _active else (0, 1)
    if world == 1:
        return texts
    _check_split(len(texts), world)
    lo, hi = (rank * len(texts)) // world, ((rank + 1) * len(texts)) // world
    return texts[lo:hi]


class RankShare:
    """A `TopicBatches` whose steps hold this rank's share of each batch; the whole corpora
    (`forget`, `retain`), step count and topics are the global schedule's."""

    def __init__(self, schedule: Any) -> None:
        self.whole = schedule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.whole, name)

    def __len__(self) -> int:
        return len(self.whole)

    def __getitem__(self, idx: int) -> Any:
        step = self.whole[idx]
        return Step(step.idx, step.topic, share(step.forget), share(step.retain))


def _check_split(n: int, world: int) -> None:
    if n < world:
        raise WmdpError(f"a batch of {n} texts cannot be split over {world} processes: "
                        f"give batch_size >= {world} and corpora whose last batch holds at "
                        f"least {world} texts (or lower max_num_batches)")


def check_shares(schedule: Any) -> None:
    """Every step's batches split over the ranks (the same error on every rank, at once)."""
    for idx in range(schedule.num_batches):
        step = schedule[idx]
        for texts in (step.forget, step.retain):
            _check_split(len(texts), rank_world()[1])


def global_mean(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """`total / count` (count clamped to 1); data-parallel: this rank's `total` over the global
    count times N, whose average over ranks is the global mean."""
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).detach()
    if not _active:
        return total / count.clamp(min=1.0)
    import torch.distributed as dist

    count = count.clone()
    dist.all_reduce(count)
    return total * rank_world()[1] / count.clamp(min=1.0)


def mean_over_ranks(value: float, metrics: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The loss and metrics averaged over ranks: the global figures (see `global_mean`)."""
    if not _active:
        return value, metrics
    import torch.distributed as dist

    keys = list(metrics)  # every rank's method logs the same keys, in the same order
    t = torch.tensor([value] + [metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= rank_world()[1]
    return t[0].item(), {k: t[i + 1].item() for i, k in enumerate(keys)}


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    if rank_world()[1] == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(t)
    return t.item() == 0.0


# -- sharding -----------------------------------------------------------------------------------
def shard_model(model: nn.Module, device: str) -> nn.Module:
    """FSDP2 over all processes: each decoder block, then the root (embeddings, final norm, LM
    head). Every module reshards after its forward, the root too (FSDP's default keeps the
    root gathered), so values written into the shards (`wmdp.layers.swapped`: LLMU's, SCRUB's
    and UNDO's original weights) are what the next forward sees."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = torch.device(device).type
    mesh = init_device_mesh(kind, (rank_world()[1],))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor; a plain tensor as it is."""
    return x.to_local() if is_sharded(x) else x


def full(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank: every rank calls it)."""
    return x.full_tensor() if is_sharded(x) else x


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor (the same on every rank) laid out as `ref`: sharded as it, or on its
    device."""
    if not is_sharded(ref):
        return value.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements,
                             src_data_rank=None)  # every rank holds it: no communication


def base_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 puts an `FSDP<Class>` in front of it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (on CPU), empty elsewhere; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # LinearWarmupDecay wraps one


def optimizer_state(model: nn.Module, optimizer: Any) -> dict:
    """The optimizer's state with whole tensors (rank 0 holds it); every rank calls it."""
    if not is_sharded(next(model.parameters())):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    inner = get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                     options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    state = optimizer.state_dict()
    return {**state, "optimizer": inner} if "optimizer" in state else inner


def load_optimizer_state(model: nn.Module, optimizer: Any, state: dict) -> None:
    """`optimizer_state`'s dict (whole on every rank) back into a sharded optimizer."""
    if not is_sharded(next(model.parameters())):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    inner = state["optimizer"] if _torch_optimizer(optimizer) is not optimizer else state
    if inner is not state:  # the wrapper's own count, then the torch optimizer's shards
        optimizer.load_state_dict({**state, "optimizer": _torch_optimizer(optimizer).state_dict()})
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), inner,
                             options=StateDictOptions(full_state_dict=True))


__all__ = ["DATA_PARALLEL", "active", "training", "check_method", "share", "RankShare",
           "check_shares", "global_mean", "mean_over_ranks", "all_ranks", "shard_model",
           "local", "full", "like", "base_class", "model_state",
           "optimizer_state", "load_optimizer_state"]

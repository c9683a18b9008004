"""Peak memory of a stage, measured by following every tensor storage that is alive.

    tracker = PeakTracker()
    tracker.register(*model.parameters())          # what exists before the stage runs
    with tracker:
        loss = step(); loss.backward()
    tracker.peak                                   # bytes: registered + the stage's peak

A TorchDispatchMode sees each op's outputs; a storage counts from its first appearance until
Python's weak reference to it dies (autograd's saved tensors keep theirs alive, so activations
held for backward count until backward frees them). Views share their base's storage and count
once. The same tracker measures real CPU tensors and the planner's fake ones (storage sizes
without data), so a prediction and a measurement are made by one rule.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SCALAR = torch.ops.aten._local_scalar_dense.default


class PeakTracker(TorchDispatchMode):
    """Live storage bytes and their peak. `fake_scalars`: `.item()` answers 1.0 (fake tensors
    have no values; a stage that logs a loss still runs)."""

    def __init__(self, fake_scalars: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self.fake_scalars = fake_scalars

    def register(self, *tensors: Any) -> None:
        """Count storages that already exist (weights, gradients, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or storage-less tensors
            return
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is _SCALAR and self.fake_scalars:
            return 1.0  # a step count of 1 keeps AdamW's bias correction finite
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())

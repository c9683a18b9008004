"""Run a decoder only as far as it must go, and re-run a span of its layers.

    h = forward_to_layer(model, inputs, layer_id)          # (B, T, d), no layer after layer_id runs
    span = capture_span(model, inputs, first, last)        # frozen pass, records each layer's inputs
    h = replay_span(model, span)                           # the same layers again, current weights

These work on any HF decoder whose blocks `wmdp.models.decoder_layers` can name: the model's own
forward builds masks and position embeddings; hooks record what each block received, and stop
the forward once the wanted block has run (an exception, caught here), so later layers and the
LM head never run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from wmdp.models import TrainedTensor, decoder_layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _call_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass


def read_layers(model: nn.Module, inputs: dict[str, torch.Tensor], layer_ids: Sequence[int],
                read: Callable[[torch.Tensor], torch.Tensor] = lambda h: h) -> dict[int, torch.Tensor]:
    """`read(h)` of the residual stream after each block in `layer_ids`, in one forward that
    stops after the last of them (the LM head never runs). `h` is (B, T, d)."""
    layers = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    last = max(layer_ids)

    def hook_for(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out[i] = read(_hidden(output))
            if i == last:
                raise _Stop
        return hook

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in layer_ids]
    try:
        _call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out


def forward_to_layer(model: nn.Module, inputs: dict[str, torch.Tensor],
                     layer_id: int) -> torch.Tensor:
    """The residual stream after decoder block `layer_id` (the reference's `forward_with_cache`)."""
    return read_layers(model, inputs, [layer_id])[layer_id]


@dataclass
class Span:
    """What blocks first..last received in one pass, and what the last one returned."""

    first: int
    last: int
    calls: list[tuple[tuple, dict]]  # (args, kwargs) of each block, hidden state included
    output: torch.Tensor             # (B, T, d) after block `last`

    @property
    def input(self) -> torch.Tensor:
        args, kwargs = self.calls[0]
        return args[0] if args else kwargs["hidden_states"]


def capture_span(model: nn.Module, inputs: dict[str, torch.Tensor], first: int,
                 last: int) -> Span:
    """One pass up to block `last`, recording the inputs of blocks first..last."""
    layers = decoder_layers(model)
    calls: list[tuple[tuple, dict]] = []
    out: list[torch.Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, dict(kwargs)))

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        out.append(_hidden(output))
        raise _Stop

    handles = [layers[i].register_forward_pre_hook(pre_hook, with_kwargs=True)
               for i in range(first, last + 1)]
    handles.append(layers[last].register_forward_hook(post_hook))
    try:
        _call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return Span(first, last, calls, out[0])


def replay_span(model: nn.Module, span: Span, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run blocks first..last again on the recorded inputs, with the weights as they are now."""
    layers = decoder_layers(model)
    h = span.input if hidden is None else hidden
    for i, (args, kwargs) in zip(range(span.first, span.last + 1), span.calls):
        if args:
            h = _hidden(layers[i](h, *args[1:], **kwargs))
        else:
            h = _hidden(layers[i](**{**kwargs, "hidden_states": h}))
    return h


@contextmanager
def swapped(tensors: list[TrainedTensor], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily give `tensors` the given values (e.g. the originals, for a frozen pass)."""
    saved = []
    with torch.no_grad():
        for t, v in zip(tensors, values):
            if _swappable(t):  # swap storage: no copy
                saved.append(t.param.data)
                t.param.data = v
            else:
                saved.append(_values(t).clone())
                _values(t).copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                if _swappable(t):
                    t.param.data = s
                else:
                    _values(t).copy_(s)


def _swappable(t: TrainedTensor) -> bool:
    """A whole plain tensor; not a slice, nor an FSDP shard (FSDP gathers from its own buffer,
    so a shard's values must be written into it)."""
    from torch.distributed.tensor import DTensor

    return t.index is None and not isinstance(t.param, DTensor)


def _values(t: TrainedTensor) -> torch.Tensor:
    return t.param.data if t.index is None else t.param.data[t.index]

"""Each stage's step, run on a model's fake tensors under `PeakTracker`: what it allocates.

    m = rmu_memory(model, fake_mode, Workload(batch_size=2, max_length=512), layer_id=15)

A stage runs as the loop runs it (loss, zero_grad, backward, optimizer step), once untracked so
gradients and optimizer state exist as they do from the second step on, then once tracked. The
steps are wmdp's own: RMU's frozen-forget step (its largest: a frozen pass and a replay on forget
text, then on retain text) through `wmdp.layers`; the baselines' losses through `wmdp.unlearn.lm`;
evaluation's one forward with the LM head on the scored positions (`wmdp.scoring.logits_at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from wmdp.layers import capture_span, forward_to_layer, replay_span, swapped
from wmdp.models import TrainedTensor, train_only
from wmdp.plan.memtrack import PeakTracker, storage_bytes
from wmdp.scoring import logits_at
from wmdp.unlearn.lm import mean_nll, sequence_logprob, token_kl
from wmdp.unlearn.optim import LegacyAdamW, torch_adamw
from wmdp.unlearn.rmu import mean_cosine, mean_norm, mse


@dataclass
class Workload:
    batch_size: int = 4          # texts (questions) per step
    max_length: int = 512        # tokens per text; texts are assumed this long (truncated)
    retain_length: int | None = None  # RMU's retain_max_length (None: max_length)


@dataclass
class Memory:
    """Bytes a stage holds: its weights, copies of trained tensors' original values, gradients,
    optimizer state, and activations (the measured peak beyond all of those)."""

    weights: int = 0
    copies: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def persistent(self) -> int:
        return self.weights + self.copies + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.persistent + self.activations


def batch(b: int, t: int) -> dict[str, torch.Tensor]:
    """A batch of b full-length texts: (B, T) ids, mask and positions."""
    ids = torch.ones(b, t, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(t).expand(b, t)}


def _ids(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets: the ids alone. The batches are unpadded, and on real tensors the
    model sees an all-ones mask and skips it (causal attention, no mask tensor); fake tensors
    hide that the mask is all ones, and the model would build a (B, 1, T, T) mask that the real
    run never holds. The losses still read the mask."""
    return {"input_ids": inputs["input_ids"]}


def used_weights(model: nn.Module, run: Callable[[], Any]) -> list[torch.Tensor]:
    """Parameters and buffers of the modules `run` calls (for RMU: the prefix to layer_id)."""
    ran: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.append(mod))
               for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [t for m in dict.fromkeys(ran) for t in (*m.parameters(recurse=False),
                                                    *m.buffers(recurse=False))]


def _state_tensors(optimizer: Any) -> list[torch.Tensor]:
    if isinstance(optimizer, LegacyAdamW):
        return [*optimizer.exp_avg, *optimizer.exp_avg_sq]
    return [v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def run_steps(fake_mode: Any, weights: list[torch.Tensor], tensors: list[TrainedTensor],
              copies: list[torch.Tensor], optimizer: Any, loss_fn: Callable[[], torch.Tensor],
              tracker_factory: Callable[[], PeakTracker] = lambda: PeakTracker(True)) -> Memory:
    """The loop's step twice (the second measured); a stage without optimizer runs `loss_fn` once
    (no gradient)."""
    def step() -> None:
        loss = loss_fn()
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    with fake_mode:
        if optimizer is not None:
            with PeakTracker(fake_scalars=True):  # .item() on fake values answers 1
                step()
        grads = [t.param.grad for t in tensors if t.param.grad is not None]
        state = _state_tensors(optimizer) if optimizer is not None else []
        tracker = tracker_factory()
        tracker.register(*weights, *copies, *grads, *state)
        base = tracker.live
        with tracker:
            step()
    return Memory(weights=storage_bytes(weights), copies=storage_bytes(copies),
                  gradients=storage_bytes(grads), optimizer=storage_bytes(state),
                  activations=max(0, tracker.peak - base))


def all_weights(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# -- evaluation ---------------------------------------------------------------------------------
def eval_memory(model: nn.Module, fake_mode: Any, work: Workload, positions: int = 1) -> Memory:
    """One scoring batch: the forward without gradients, the LM head on `positions` per row
    (1 for WMDP/MMLU letters), log-softmax in float32."""
    def loss() -> torch.Tensor:
        with torch.no_grad():
            inputs = batch(work.batch_size, work.max_length)
            pos = torch.arange(work.max_length - positions, work.max_length)
            logits = logits_at(model, inputs["input_ids"], pos.expand(work.batch_size, -1))
            return torch.log_softmax(logits.float(), dim=-1)

    for p in model.parameters():
        p.requires_grad_(False)
    return run_steps(fake_mode, all_weights(model), [], [], None, loss)


# -- RMU ----------------------------------------------------------------------------------------
def rmu_memory(model: nn.Module, fake_mode: Any, work: Workload, layer_id: int,
               layer_ids: list[int], prefix: bool, alpha: float = 1200.0) -> Memory:
    """RMU's frozen-forget step (rmu.RMU.loss at step 0 mod frozen_forget_every): a frozen pass
    and a replay of blocks first..layer_id on forget text, then the same on retain text, one
    backward, legacy AdamW on the MLP output projections of `layer_ids`. `prefix`: only the
    weights the forward to layer_id uses are loaded (embeddings, blocks 0..layer_id, rotary)."""
    first = min(layer_ids)
    with fake_mode:
        tensors = train_only(model, "mlp_out", layer_ids)
        originals = [t.view().detach().clone() for t in tensors]
        optimizer = LegacyAdamW(tensors)
        d = model.config.hidden_size
        dtype = next(model.parameters()).dtype
        control = torch.rand(1, 1, d).to(dtype)
        weights = all_weights(model)
        if prefix:
            weights = used_weights(model, lambda: forward_to_layer(model, _ids(batch(1, 2)),
                                                                   layer_id))
    retain_length = work.retain_length or work.max_length

    def loss() -> torch.Tensor:
        forget = batch(work.batch_size, work.max_length)
        mask = forget["attention_mask"]
        with torch.no_grad(), swapped(tensors, originals):
            span = capture_span(model, _ids(forget), first, layer_id)
        h_forget = replay_span(model, span)
        logged = [mean_cosine(h_forget, span.output, mask), mean_norm(span.output, mask)]
        forget_loss = mse(h_forget, control, None)
        retain = batch(work.batch_size, retain_length)
        rmask = retain["attention_mask"]
        with torch.no_grad(), swapped(tensors, originals):
            span = capture_span(model, _ids(retain), first, layer_id)
        h_retain = replay_span(model, span)
        retain_loss = alpha * mse(h_retain, span.output, None)
        logged += [mean_norm(h_forget, mask), mean_norm(h_retain, rmask),
                   mean_cosine(h_retain, span.output, rmask)]
        torch.stack([v.float() for v in logged]).sum().item()  # the engine's one sync
        return forget_loss + retain_loss

    return run_steps(fake_mode, weights, tensors, originals, optimizer, loss)


# -- baselines and the audit's relearning: full fine-tuning ---------------------------------------
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**_ids(inputs), use_cache=False).logits


def baseline_memory(model: nn.Module, fake_mode: Any, work: Workload, method: str) -> Memory:
    """One step of a full fine-tuning method (params=all, the baselines' default) with torch's
    AdamW (SSD: its importance pass, no optimizer). LLMU and SCRUB keep every trained tensor's
    original value (`copies`); NPO keeps only B log-likelihoods per batch."""
    b, t = work.batch_size, work.max_length
    with fake_mode:
        tensors = train_only(model, "all", [])
        keeps = method in ("llmu", "scrub")
        originals = [x.view().detach().clone() for x in tensors] if keeps else []
        optimizer = torch_adamw(tensors, 1e-5, weight_decay=0.01) if method != "ssd" else None
        ref = torch.zeros(b)

    def original() -> Any:
        return swapped(tensors, originals)

    def nll(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_nll(_logits(model, inputs), inputs)

    def loss() -> torch.Tensor:
        forget = batch(b, t)
        if method in ("ga", "relearn"):
            value = nll(forget)
            return -value if method == "ga" else value
        if method == "graddiff":
            return -nll(forget) + nll(batch(b, t))
        if method == "npo":
            ratio = sequence_logprob(_logits(model, forget), forget) - ref
            return -20.0 * F.logsigmoid(-0.1 * ratio).mean() + nll(batch(b, t))
        if method == "llmu":  # K=5 random answers per prompt: B*5 rows of 64+64 tokens
            pairs = batch(b * 5, 128)
            value = -0.5 * nll(forget) + nll(pairs)
            retain = batch(b, t)
            with torch.no_grad(), original():
                teacher = _logits(model, retain)
            return value + token_kl(teacher, _logits(model, retain), retain)
        if method == "scrub":  # the max step runs inside loss() (scrub.py); the min step after
            with torch.no_grad(), original():
                teacher = _logits(model, forget)
            (-token_kl(teacher, _logits(model, forget), forget, 4.0)).backward()
            optimizer.step()
            optimizer.zero_grad()
            retain = batch(b, t)
            with torch.no_grad(), original():
                teacher = _logits(model, retain)
            student = _logits(model, retain)
            return 0.001 * token_kl(teacher, student, retain, 4.0) + mean_nll(student, retain)
        raise ValueError(method)

    if method == "ssd":
        return _ssd_memory(model, fake_mode, tensors, work)
    return run_steps(fake_mode, all_weights(model), tensors, originals, optimizer, loss)


def _ssd_memory(model: nn.Module, fake_mode: Any, tensors: list[TrainedTensor],
                work: Workload) -> Memory:
    """SSD: forget and retain importances (two float32 tensors per parameter) and one backward."""
    with fake_mode:
        importance = [torch.zeros_like(x.view(), dtype=torch.float32)
                      for x in tensors for _ in range(2)]

    def loss() -> torch.Tensor:
        inputs = batch(work.batch_size, work.max_length)
        with torch.enable_grad():
            mean_nll(_logits(model, inputs), inputs).backward()
        for acc, x in zip(importance[0::2], tensors):  # the forget importances
            acc += x.param.grad.float() ** 2
        return torch.zeros(())

    memory = run_steps(fake_mode, all_weights(model), [], importance, None, loss)
    memory.optimizer, memory.copies = memory.copies, 0  # the importances are SSD's state
    memory.gradients = storage_bytes([x.param for x in tensors])  # a gradient per parameter
    memory.activations = max(0, memory.activations - memory.gradients)
    return memory

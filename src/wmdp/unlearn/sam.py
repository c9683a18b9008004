"""Sharpness-aware unlearning (Fan et al. 2025, "Towards LLM Unlearning Resilient to
Relearning Attacks: A Sharpness-Aware Minimization Perspective and Beyond"): `npo-sam`, `rmu-sam`.

    wmdp unlearn npo-sam --preset sandbox --model sandbox/model --output runs/npo-sam \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl

The forget loss is taken at weights nudged by rho along its own normalised gradient, the
worst point of a small ball around w, so the minimum it finds is flat: a few relearning steps
do not climb back out of it. Per step, as the authors' `SAMTrainer`
(OPTML-Group/Unlearn-Smooth, WMDP/src/unlearn/base.py):

    g      = grad forget_loss(w)                 # over every trained tensor
    eps    = rho * g / |g|                       # |.|: the L2 norm over all of them together
    g_sam  = grad forget_loss(w + eps)           # then w is restored exactly
    update = optimizer step on g_sam + gamma * grad retain_loss(w)

Here the loop takes the step: `loss()` returns `sam_term + retain_loss`, where `sam_term`'s
value is forget_loss(w + eps) and its gradient with respect to the trained tensors is g_sam (a
linear term in w with g_sam detached). Cost: two forget forward/backward passes per step
instead of one.

`npo-sam` is NPO (npo.py: the sequence-level log-ratio, NPO+RT's retain NLL with weight gamma);
the authors' code takes the ratio of mean token losses instead. `rmu-sam` applies the same
perturbation to RMU's forget loss (the MSE to the control vector), RMU's retain loss unchanged;
the paper did not run RMU+SAM, so its rho is a choice made here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from wmdp.errors import WmdpError
from wmdp.layers import capture_span, forward_to_layer, replay_span, swapped
from wmdp.models import TrainedTensor
from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import presets, sequence_logprob
from wmdp.unlearn.npo import NPO, NPOConfig
from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS
from wmdp.unlearn.rmu import RMU, RMUConfig, mean_norm, mse


def _grads(loss: torch.Tensor, tensors: list[TrainedTensor]) -> list[torch.Tensor]:
    """d loss / d each trained tensor (a slice's gradient for a slice); zeros where unused."""
    grads = torch.autograd.grad(loss, [t.param for t in tensors], allow_unused=True)
    out = []
    for t, g in zip(tensors, grads):
        g = torch.zeros_like(t.param) if g is None else g
        out.append(g if t.index is None else g[t.index])
    return out


def sam_term(tensors: list[TrainedTensor], forget_loss: Callable[[], torch.Tensor],
             rho: float) -> tuple[torch.Tensor, dict[str, float]]:
    """A scalar whose value is forget_loss(w + eps) and whose gradient is grad forget_loss there,
    eps = rho * g / |g| with g = grad forget_loss(w); the weights are w again on return."""
    loss = forget_loss()
    grads = _grads(loss, tensors)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    scale = rho / (norm + 1e-12)  # a zero gradient leaves w where it is
    nudged = [t.view().detach() + (g.float() * scale).to(g.dtype) for t, g in zip(tensors, grads)]
    with swapped(tensors, nudged):
        loss_sam = forget_loss()
        grads_sam = _grads(loss_sam, tensors)
    linear = sum((g.detach() * t.view()).sum() for t, g in zip(tensors, grads_sam))
    term = linear - linear.detach() + loss_sam.detach()  # value: the loss; gradient: g_sam
    return term, {"forget_loss": loss.item(), "forget_loss_sam": loss_sam.item(),
                  "forget_grad_norm": norm.item()}


def _check_rho(rho: float, method: str) -> None:
    if not (rho == rho and 0 <= rho < float("inf")):
        raise WmdpError(f"{method}: rho is {rho!r}, expected a number >= 0 (0: no perturbation)")


# -- NPO + SAM ------------------------------------------------------------------------------------
@dataclass
class NPOSAMConfig(NPOConfig):
    """NPO's hyperparameters plus SAM's radius; defaults are the authors' WMDP config
    (configs/unlearn/wmdp/NPO+SAM.json: beta 0.1, gamma 1, sam_rho 0.1, lr 1e-5, no decay)."""

    rho: float = 0.1                  # radius of the weight perturbation (L2, all trained tensors)
    weight_decay: float = 0.0         # the authors' config: 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rho(self.rho, "npo-sam")


class NPOSAM(NPO):
    name = "npo-sam"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        ref = self.ref_logprobs[step.idx % self.schedule.num_batches]

        def forget_loss() -> torch.Tensor:  # NPO's, as npo.py
            log_ratio = sequence_logprob(self.logits(forget), forget) - ref
            return -(2.0 / c.beta) * F.logsigmoid(-c.beta * log_ratio).mean()

        term, metrics = sam_term(self.tensors, forget_loss, c.rho)
        return self.plus_retain_nll(step, term, metrics, c.retain_weight)


# zephyr-7b: the authors' WMDP config (500 steps of batch 4, linear warmup over a tenth);
# sandbox: NPO's sandbox settings (npo.py) with the authors' rho
NPO_SAM_PRESETS = presets("npo-sam", zephyr={"lr": 1e-5, "beta": 0.1, "retain_weight": 1.0,
                                             "rho": 0.1},
                          sandbox={"lr": 2e-3, "lr_schedule": "constant", "rho": 0.1})
NPO_SAM_PRESETS["zephyr-7b"]["config"]["max_num_batches"] = 500


# -- RMU + SAM ------------------------------------------------------------------------------------
@dataclass
class RMUSAMConfig(RMUConfig):
    """RMU's hyperparameters plus SAM's radius on the forget loss."""

    rho: float = 0.01                 # radius of the weight perturbation (a choice; see above)

    def __post_init__(self) -> None:
        _check_rho(self.rho, "rmu-sam")


class RMUSAM(RMU):
    name = "rmu-sam"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self._encode(step.forget, self._forget_max_length(step.topic))
        fmask = forget["attention_mask"]
        control = self._control(step.topic)
        kept: dict[str, torch.Tensor] = {}

        def forget_loss() -> torch.Tensor:
            h = forward_to_layer(self.model, forget, c.layer_id)
            kept.setdefault("h", h.detach())  # the first call's: activations at w
            return mse(h, control, fmask if c.mask_padding else None)

        term, metrics = sam_term(self.tensors, forget_loss, c.rho)
        retain_loss, retain_metrics = rmu_retain_loss(self, step)
        metrics.update(forget_norm=mean_norm(kept["h"], fmask).item(), **retain_metrics)
        return term + retain_loss, metrics


def rmu_retain_loss(rmu: RMU, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
    """RMU's retain term as rmu.py computes it: alpha * mse to the frozen activations."""
    c = rmu.config
    retain = rmu._encode(step.retain, c.retain_max_length)
    rmask = retain["attention_mask"]
    with torch.no_grad(), swapped(rmu.tensors, rmu.originals):
        span = capture_span(rmu.model, retain, rmu.first, c.layer_id)
    h_retain = replay_span(rmu.model, span)  # the blocks below the first trained one run once
    retain_mse = mse(h_retain, span.output, rmask if c.mask_padding else None)
    retain_loss = rmu.alpha[step.topic] * retain_mse
    return retain_loss, {"retain_loss": retain_loss.item(), "retain_mse": retain_mse.item(),
                         "retain_norm": mean_norm(h_retain, rmask).item()}


def _rmu_presets(method: str, rho: float, **sandbox: Any) -> dict[str, dict]:
    """RMU's presets with `rho` (and `sandbox`'s extra settings) added to each."""
    out = copy.deepcopy(RMU_PRESETS)
    for name, preset in out.items():
        preset[method] = {**preset.pop("rmu"), "rho": rho,
                          **(sandbox if name == "sandbox" else {})}
    return out


RMU_SAM_PRESETS = _rmu_presets("rmu-sam", 0.01)

__all__ = ["sam_term", "rmu_retain_loss", "NPOSAM", "NPOSAMConfig", "RMUSAM", "RMUSAMConfig", "NPO_SAM_PRESETS",
           "RMU_SAM_PRESETS"]

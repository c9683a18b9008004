"""RMU with latent adversarial training (Sheshadri et al. 2024, "Latent Adversarial Training
Improves Robustness to Persistent Harmful Behaviors in LLMs"): `rmu-lat`.

    wmdp unlearn rmu-lat --preset sandbox --model sandbox/model --output runs/rmu-lat \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl

Per step, an adversary first looks for the hidden state that undoes the forgetting: a
perturbation delta (B, T, d) added to the residual stream after block `adv_layer` (below
`layer_id`) on the forget batch's real tokens, moved by `pgd_steps` AdamW steps at
`adv_lr` that lower the forget text's language-model loss, each followed by a projection of
every token's delta onto the L2 ball of radius `epsilon`. Then RMU's update runs with delta
added on the forget pass (the control vector must be reached even from the adversary's state)
and without it on the retain pass; `model_iterations_per_step` updates per batch.

Read from the authors' `run_rmu` and `projected_gradient_descent` (aengusl/latent-adversarial-
training, latent_at/lat_methods.py; `GDAdversary` in latent_at/laa/attacks.py): per-token
clipping to epsilon, an AdamW adversary from zero each batch, the attack at the MLP output of
block `pgd_layers` (its residual stream contribution: the same as adding after the block), its
"toward" loss (cross-entropy on the forget tokens). Differences: the authors also add an "away"
loss, log(1 - p) on retain tokens, to the adversary (coefficient 1); here the adversary only
undoes the forgetting, as the method is described. The adversary's LM loss needs the whole model,
so rmu-lat loads every layer (plain RMU stops at `layer_id`). Cost per step: `pgd_steps` full
forward/backward passes on top of RMU's.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from wmdp.errors import WmdpError
from wmdp.layers import forward_to_layer
from wmdp.models import decoder_layers
from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import mean_nll
from wmdp.unlearn.loop import check_finite
from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS
from wmdp.unlearn.rmu import RMU, RMUConfig, mean_norm, mse
from wmdp.unlearn.sam import rmu_retain_loss


@dataclass
class RMULATConfig(RMUConfig):
    """RMU's hyperparameters plus the adversary's; adversary defaults are `run_rmu`'s."""

    adv_layer: int = 6                # block after which delta is added (< layer_id; run_rmu: 7
                                      # with layer_id 8, i.e. layer_id - 1)
    epsilon: float = 2.0              # L2 bound of each token's delta
    adv_lr: float = 5e-2              # the adversary's AdamW learning rate
    pgd_steps: int = 16               # adversary steps per batch
    model_iterations_per_step: int = 1  # RMU updates per batch under one delta (run_rmu: 4)

    def __post_init__(self) -> None:
        for name in ("epsilon", "adv_lr"):
            value = getattr(self, name)
            if not (value == value and 0 < value < float("inf")):
                raise WmdpError(f"rmu-lat: {name} is {value!r}, expected a positive number")
        for name in ("pgd_steps", "model_iterations_per_step"):
            if getattr(self, name) < 1:
                raise WmdpError(f"rmu-lat: {name} is {getattr(self, name)}, expected >= 1")


@contextmanager
def perturbed(model: nn.Module, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """Add `delta` (B, T, d) to the residual stream after decoder block `layer`."""
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def project(delta: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each token's delta scaled onto the L2 ball of radius epsilon; zero on padding."""
    norms = delta.norm(dim=-1, keepdim=True)  # (B, T, 1)
    return delta / torch.clamp(norms / epsilon, min=1.0) * mask.unsqueeze(-1).to(delta.dtype)


def latent_attack(model: nn.Module, inputs: dict[str, torch.Tensor], layer: int, epsilon: float,
                  lr: float, steps: int) -> tuple[torch.Tensor, list[float]]:
    """The adversary: delta after block `layer` that lowers the LM loss of `inputs`, within
    epsilon per token. Returns delta (B, T, d, float32, no grad) and the loss before each step."""
    mask = inputs["attention_mask"]
    d = model.config.hidden_size
    delta = torch.zeros(*mask.shape, d, device=mask.device, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=lr)  # run_rmu's adversary optimizer
    losses = []
    for _ in range(steps):
        with perturbed(model, layer, delta):
            loss = mean_nll(model(**inputs, use_cache=False).logits, inputs)
        delta.grad, = torch.autograd.grad(loss, [delta])  # no gradient into the weights
        optimizer.step()
        with torch.no_grad():
            delta.copy_(project(delta, mask, epsilon))
        losses.append(loss.item())
    return delta.detach(), losses


class RMULAT(RMU):
    name = "rmu-lat"

    def validate(self, n_topics: int) -> None:
        super().validate(n_topics)
        c = self.config
        if not 0 <= c.adv_layer < c.layer_id:
            raise WmdpError(f"rmu-lat: adv_layer {c.adv_layer} must be a block below layer_id "
                            f"{c.layer_id} (0..{c.layer_id - 1})")

    def prefix_layer(self) -> int | None:
        return None  # the adversary's LM loss runs the whole model

    def make_optimizer(self) -> Any:
        self.optimizer = super().make_optimizer()  # the extra updates of a batch take it too
        return self.optimizer

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self._encode(step.forget, self._forget_max_length(step.topic))
        delta, adv = latent_attack(self.model, forget, c.adv_layer, c.epsilon, c.adv_lr,
                                   c.pgd_steps)
        for _ in range(c.model_iterations_per_step - 1):  # run_rmu's extra updates per batch
            loss, metrics = self._rmu_loss(step, forget, delta)
            check_finite(loss.item(), "loss", step.idx, metrics)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        loss, metrics = self._rmu_loss(step, forget, delta)
        metrics.update(adv_nll_first=adv[0], adv_nll_last=adv[-1])
        return loss, metrics

    def _rmu_loss(self, step: Step, forget: dict[str, torch.Tensor],
                  delta: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """RMU's loss with delta on the forget pass (rmu.py; no frozen-forget cosine)."""
        c = self.config
        fmask = forget["attention_mask"]
        with perturbed(self.model, c.adv_layer, delta):
            h_forget = forward_to_layer(self.model, forget, c.layer_id)
        forget_loss = mse(h_forget, self._control(step.topic), fmask if c.mask_padding else None)
        retain_loss, metrics = rmu_retain_loss(self, step)
        return forget_loss + retain_loss, {
            "forget_loss": forget_loss.item(), "forget_norm": mean_norm(h_forget, fmask).item(),
            **metrics}


# zephyr-7b: run_rmu's defaults (layer 8, blocks 6-8, adversary after block 7, epsilon 2,
# adversary lr 5e-2, 16 steps, 4 updates per batch, 200 batches, torch AdamW) on the WMDP paper's
# model and corpora. sandbox: RMU's sandbox settings, the adversary after block 1 (below the
# steered block 2) with epsilon 1.0 (about 15% of the residual stream's norm there, ~7 on
# sandbox-small) and 8 steps, one update per batch (RMU's update count).
RMU_LAT_PRESETS = copy.deepcopy(RMU_PRESETS)
for _preset in RMU_LAT_PRESETS.values():  # the adversary one block below the steered one
    _hp = _preset.pop("rmu")
    _preset["rmu-lat"] = {**_hp, "adv_layer": _hp["layer_id"] - 1}
RMU_LAT_PRESETS["zephyr-7b"]["config"]["max_num_batches"] = 200
RMU_LAT_PRESETS["zephyr-7b"]["rmu-lat"].update(
    layer_id=8, layer_ids=[6, 7, 8], adv_layer=7, epsilon=2.0, adv_lr=5e-2, pgd_steps=16,
    model_iterations_per_step=4, optimizer="adamw")
RMU_LAT_PRESETS["sandbox"]["rmu-lat"].update(adv_layer=1, epsilon=1.0, pgd_steps=8)

__all__ = ["RMULAT", "RMULATConfig", "RMU_LAT_PRESETS", "latent_attack", "perturbed", "project"]

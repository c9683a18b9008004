"""Negative Preference Optimization (NPO), Zhang et al. 2024, "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning" (arXiv 2404.05868).

    wmdp unlearn npo --preset sandbox --model sandbox/model --output runs/npo ...

DPO with only a rejected answer: each forget text y is pushed below the reference (original)
model's likelihood, through a bounded loss that slows the collapse plain gradient ascent runs into:

    log_ratio = log p_theta(y) - log p_ref(y)                  # (B,), summed over y's tokens
    forget_loss = -(2 / beta) * mean(logsigmoid(-beta * log_ratio))
    loss = forget_loss + retain_weight * nll(retain)           # retain_weight 0: plain NPO

As beta -> 0 the forget loss becomes gradient ascent on log p_theta(y). Defaults are the paper's
TOFU runs (licong-lin/negative-preference-optimization): beta 0.1, AdamW lr 1e-5, and NPO+RT's
retain term with weight 1 (its `npo_coeff` 1, `grad_diff_coeff` 1).

The reference model is never kept: before the first step, log p_ref(y) of every forget batch in
the schedule is computed once with the original weights (one forward per forget batch, B floats
each), and a resumed run recomputes them from the reloaded original model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wmdp.unlearn.batches import Step, TopicBatches
from wmdp.unlearn.lm import LMMethod, presets, sequence_logprob


@dataclass
class NPOConfig:
    """NPO's hyperparameters; defaults are the paper's (TOFU, NPO+RT)."""

    beta: float = 0.1                 # inverse temperature of the preference loss
    retain_weight: float = 1.0        # weight of the retain NLL (NPO+RT); 0 for plain NPO
    lr: float = 1e-5                  # AdamW learning rate (the paper's TOFU runs: 1e-5)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)


class NPO(LMMethod):
    name = "npo"

    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int) -> None:
        super().setup(model, tokenizer, schedule, seed)
        self.ref_logprobs: list[torch.Tensor] = []   # per step of an epoch: (B,) log p_ref
        with torch.no_grad():
            for idx in range(schedule.num_batches):  # later epochs repeat these batches
                forget = self.tokenize(schedule[idx].forget)
                self.ref_logprobs.append(sequence_logprob(self.logits(forget), forget))

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        ref = self.ref_logprobs[step.idx % self.schedule.num_batches]
        log_ratio = sequence_logprob(self.logits(forget), forget) - ref
        forget_loss = -(2.0 / c.beta) * F.logsigmoid(-c.beta * log_ratio).mean()
        metrics = {"forget_loss": forget_loss.item(), "log_ratio": log_ratio.mean().item()}
        return self.plus_retain_nll(step, forget_loss, metrics, c.retain_weight)


PRESETS = presets("npo", zephyr={}, sandbox={"lr": 2e-3})

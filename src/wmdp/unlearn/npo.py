"""Negative Preference Optimization (NPO), Zhang et al. 2024, "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning" (arXiv 2404.05868).

    wmdp unlearn npo --preset sandbox --model sandbox/model --output runs/npo ...

DPO with only a rejected answer: each forget text y is pushed below the reference (original)
model's likelihood, through a bounded loss that slows the collapse plain gradient ascent runs into:

    log_ratio = log p_theta(y) - log p_ref(y)                  # (B,), summed over y's tokens
    forget_loss = -(2 / beta) * mean(logsigmoid(-beta * log_ratio))
    loss = forget_loss + retain_weight * nll(retain)           # retain_weight 0: plain NPO

As beta -> 0 the forget loss becomes gradient ascent on log p_theta(y). Defaults are the paper's
TOFU runs (licong-lin/negative-preference-optimization, `TOFU/config/forget.yaml`, run by HF's
Trainer): beta 0.1, NPO+RT's retain term with weight 1 (its `npo_coeff` 1, `grad_diff_coeff` 1),
AdamW at lr 1e-5 with weight decay 0.01 (not on biases and norm weights), and the Trainer's
linear schedule: warmup from 0 over the first epoch of its 10 (`warmup_ratio` 0.1 of this run's
steps), then linear decay to 0 at the last step.

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
from wmdp.unlearn.lm import LMMethod, check_positive, check_settings, presets, sequence_logprob
from wmdp.unlearn.parallel import global_mean


@dataclass
class NPOConfig:
    """NPO's hyperparameters; defaults are the paper's (TOFU, NPO+RT)."""

    beta: float = 0.1                 # inverse temperature of the preference loss
    retain_weight: float = 1.0        # weight of the retain NLL (NPO+RT); 0 for plain NPO
    lr: float = 1e-5                  # AdamW peak learning rate (the paper's TOFU runs: 1e-5)
    weight_decay: float = 0.01        # AdamW's decoupled decay of 2-D tensors (the paper's: 0.01)
    lr_schedule: str = "linear"       # linear: warmup then decay to 0 (HF's Trainer); constant
    warmup_ratio: float = 0.1         # share of the steps warming up (the paper's: 1 epoch of 10)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "npo")
        check_positive(self, "npo", "beta")
        check_positive(self, "npo", "retain_weight", zero=True)


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
        n = len(log_ratio)  # means over all ranks' texts (wmdp.unlearn.parallel)
        forget_loss = -(2.0 / c.beta) * global_mean(F.logsigmoid(-c.beta * log_ratio).sum(), n)
        metrics = {"forget_loss": forget_loss.item(),
                   "log_ratio": global_mean(log_ratio.detach().sum(), n).item()}
        return self.plus_retain_nll(step, forget_loss, metrics, c.retain_weight)


# sandbox: a constant rate and no decay, the settings its sweep was measured with (lm.py)
PRESETS = presets("npo", zephyr={}, sandbox={"lr": 2e-3, "lr_schedule": "constant",
                                             "weight_decay": 0.0})

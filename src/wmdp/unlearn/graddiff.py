"""Gradient difference (GradDiff): ascent on the forget corpus, descent on the retain corpus.

    wmdp unlearn graddiff --preset sandbox --model sandbox/model --output runs/graddiff ...

    loss = -forget_weight * nll(forget) + retain_weight * nll(retain)

Liu et al. 2022 ("Continual Learning and Private Unlearning"), TOFU's `grad_diff` (Maini et
al. 2024): both weights 1, and TOFU's optimizer recipe as in `ga` (AdamW at lr 1e-5, weight
decay 0.01, linear warmup over the first 0.2 of the steps then linear decay to 0). Each step
pairs a forget batch with a retain batch of the same topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import LMMethod, check_settings, mean_nll, presets


@dataclass
class GradDiffConfig:
    """Gradient difference's hyperparameters; defaults are TOFU's."""

    forget_weight: float = 1.0        # weight of the (negated) forget loss
    retain_weight: float = 1.0        # weight of the retain loss (TOFU: 1)
    lr: float = 1e-5                  # AdamW peak learning rate (TOFU: 1e-5)
    weight_decay: float = 0.01        # AdamW's decoupled decay of 2-D tensors (TOFU: 0.01)
    lr_schedule: str = "linear"       # linear: warmup then decay to 0 (HF's Trainer); constant
    warmup_ratio: float = 0.2         # share of the steps warming up (TOFU: 1 epoch of 5)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "graddiff")


class GradDiff(LMMethod):
    name = "graddiff"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        forget_nll = mean_nll(self.logits(forget), forget)
        forget_loss = -c.forget_weight * forget_nll
        metrics = {"forget_loss": forget_loss.item(), "forget_nll": forget_nll.item()}
        return self.plus_retain_nll(step, forget_loss, metrics, c.retain_weight)


# sandbox: a constant rate and no decay, the settings its sweep was measured with (lm.py)
PRESETS = presets("graddiff", zephyr={}, sandbox={"lr": 1e-3, "lr_schedule": "constant",
                                                  "weight_decay": 0.0})

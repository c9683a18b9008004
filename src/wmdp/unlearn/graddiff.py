"""Gradient difference (GradDiff): ascent on the forget corpus, descent on the retain corpus.

    wmdp unlearn graddiff --preset sandbox --model sandbox/model --output runs/graddiff ...

    loss = -forget_weight * nll(forget) + retain_weight * nll(retain)

Liu et al. 2022 ("Continual Learning and Private Unlearning"), TOFU's `grad_diff` (Maini et
al. 2024): both weights 1, AdamW at lr 1e-5 (locuslab/tofu `config/forget.yaml`; weight decay
0.01 left out, as in `ga`). Each step pairs a forget batch with a retain batch of the same topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import LMMethod, mean_nll, presets


@dataclass
class GradDiffConfig:
    """Gradient difference's hyperparameters; defaults are TOFU's."""

    forget_weight: float = 1.0        # weight of the (negated) forget loss
    retain_weight: float = 1.0        # weight of the retain loss (TOFU: 1)
    lr: float = 1e-5                  # AdamW learning rate (TOFU: 1e-5)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)


class GradDiff(LMMethod):
    name = "graddiff"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        forget_nll = mean_nll(self.logits(forget), forget)
        forget_loss = -c.forget_weight * forget_nll
        metrics = {"forget_loss": forget_loss.item(), "forget_nll": forget_nll.item()}
        return self.plus_retain_nll(step, forget_loss, metrics, c.retain_weight)


PRESETS = presets("graddiff", zephyr={}, sandbox={"lr": 1e-3})

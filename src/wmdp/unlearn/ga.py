"""Gradient ascent (GA): raise the language-model loss on the forget corpus.

    wmdp unlearn ga --preset sandbox --model sandbox/model --output runs/ga \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl

    loss = -nll(forget)          # mean over the forget batch's real next tokens

The field's simplest baseline (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy
Risks in Language Models"; TOFU's `grad_ascent`, Maini et al. 2024). Defaults follow TOFU's
forget config (locuslab/tofu `config/forget.yaml`): AdamW, lr 1e-5, full fine-tuning; its weight
decay of 0.01 is left out (over 150 steps at lr 1e-5 it moves no weight measurably). The retain
corpus is not used; unbounded, GA ends in collapse, so the step count is its real knob.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import LMMethod, mean_nll, presets


@dataclass
class GAConfig:
    """Gradient ascent's hyperparameters; defaults are TOFU's."""

    lr: float = 1e-5                  # AdamW learning rate (TOFU: 1e-5)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)


class GradientAscent(LMMethod):
    name = "ga"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        forget = self.tokenize(step.forget)
        nll = mean_nll(self.logits(forget), forget)
        return -nll, {"forget_loss": -nll.item(), "forget_nll": nll.item()}


PRESETS = presets("ga", zephyr={}, sandbox={"lr": 1.5e-4})

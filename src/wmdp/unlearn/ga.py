"""Gradient ascent (GA): raise the language-model loss on the forget corpus.

    wmdp unlearn ga --preset sandbox --model sandbox/model --output runs/ga \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl

    loss = -nll(forget)          # mean over the forget batch's real next tokens

The field's simplest baseline (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy
Risks in Language Models"; TOFU's `grad_ascent`, Maini et al. 2024). Defaults are TOFU's forget
recipe (locuslab/tofu `config/forget.yaml` and `forget.py`, run by HF's Trainer): AdamW at lr
1e-5, weight decay 0.01 (not on biases and norm weights, as the Trainer groups them), full
fine-tuning, and the Trainer's linear schedule: warmup from 0 over the first epoch of TOFU's 5
(`warmup_ratio` 0.2 of this run's steps), then linear decay to 0 at the last step. The retain
corpus is not used; unbounded, GA ends in collapse, so the step count is its real knob.
`--lr-schedule constant --weight-decay 0` gives plain AdamW at a fixed rate (the sandbox preset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import LMMethod, check_settings, mean_nll, presets


@dataclass
class GAConfig:
    """Gradient ascent's hyperparameters; defaults are TOFU's."""

    lr: float = 1e-5                  # AdamW peak learning rate (TOFU: 1e-5)
    weight_decay: float = 0.01        # AdamW's decoupled decay of 2-D tensors (TOFU: 0.01)
    lr_schedule: str = "linear"       # linear: warmup then decay to 0 (HF's Trainer); constant
    warmup_ratio: float = 0.2         # share of the steps warming up (TOFU: 1 epoch of 5)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "ga")


class GradientAscent(LMMethod):
    name = "ga"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        forget = self.tokenize(step.forget)
        nll = mean_nll(self.logits(forget), forget)
        return -nll, {"forget_loss": -nll.item(), "forget_nll": nll.item()}


# sandbox: a constant rate and no decay, the settings its sweep was measured with (lm.py)
PRESETS = presets("ga", zephyr={}, sandbox={"lr": 1.5e-4, "lr_schedule": "constant",
                                            "weight_decay": 0.0})

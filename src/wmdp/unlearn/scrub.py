"""SCRUB: Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning" (NeurIPS 2023).

    wmdp unlearn scrub --preset sandbox --model sandbox/model --output runs/scrub ...

A student (the model being trained) and its teacher (the original model) alternate two steps:

    max step, forget batch:  loss = -KL_T(teacher || student)(forget)          # move away
    min step, retain batch:  loss = alpha * KL_T(teacher || student)(retain)
                                    + gamma * nll(retain)                      # stay close

KL_T is the distillation KL at temperature T (times T^2) of each next-token distribution,
averaged over real tokens. The authors' code (meghdadk/SCRUB; its `DistillKL`, `train_distill`)
runs, per epoch, a max pass over the forget set (for the first `msteps` epochs) and then a min
pass over the retain set; here each loop step is one max step on its forget batch (for the first
`max_steps` steps; null: every step) and then one min step on its retain batch, so the loop's
pairing of forget and retain batches is kept. Defaults are the code's large-scale setting (its
`large_scale_unlearning` notebook, the one later benchmarks reuse): alpha 0.001, gamma 0.99,
kd_T 4, and its optimizer, one SGD with momentum 0.9 and weight decay 5e-4 (L2, torch's, on
every tensor) at lr 5e-4 shared by the max and min steps, constant (its decay epochs 3, 5, 9 are
never reached in its 3 epochs); max passes in the first 2 of 3 epochs, which `max_steps` at 2/3
of the run reproduces (the default here, null, keeps them throughout). Its small-scale notebook
uses alpha 0.5, gamma 1, T 2. That recipe was set for ResNets on CIFAR; no LLM setting of SCRUB
was retrieved here (the WMDP paper's tuned values are not reproduced), so the zephyr-7b preset
is a choice made here: AdamW (`optimizer: adamw`) at lr 1e-5 with weight decay 0.01, the
TOFU-derived baselines' optimizer and rate, held constant.

The max step is taken inside `loss()` with the loop's own optimizer (the one `make_optimizer`
returned), checked for NaN like the loop's; the loop then takes the min step on the returned
loss. The teacher is the original weights swapped in (see `wmdp.unlearn.lm`): no second model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wmdp.errors import WmdpError
from wmdp.unlearn.batches import Step
from wmdp.unlearn.lm import (LMMethod, check_positive, check_settings, mean_nll, presets,
                             token_kl)
from wmdp.unlearn.loop import check_finite
from wmdp.unlearn.optim import torch_adamw, torch_sgd

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class SCRUBConfig:
    """SCRUB's hyperparameters; defaults are the authors' code's."""

    alpha: float = 0.001              # weight of the retain KL in the min step
    gamma: float = 0.99               # weight of the retain NLL (task loss) in the min step
    temperature: float = 4.0          # distillation temperature T of both KL terms ("kd_T")
    max_steps: int | None = None      # steps (from the first) that take a max step; null: all
    optimizer: str = "sgd"            # sgd (with momentum, the code's) or adamw
    lr: float = 5e-4                  # learning rate (the code's, for CIFAR ResNets)
    momentum: float = 0.9             # SGD momentum (the code's); unused by adamw
    weight_decay: float = 5e-4        # SGD: L2 added to the gradient; adamw: decoupled (the code's)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "scrub")
        if self.optimizer not in OPTIMIZERS:
            raise WmdpError(f"scrub: optimizer {self.optimizer!r} is not one of "
                            f"{', '.join(OPTIMIZERS)}")
        check_positive(self, "scrub", "temperature")
        check_positive(self, "scrub", "alpha", "gamma", zero=True)
        if not 0 <= self.momentum < 1:
            raise WmdpError(f"scrub: momentum is {self.momentum!r}, expected 0 <= momentum < 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise WmdpError(f"scrub: max_steps is {self.max_steps}, expected >= 0 or null")


class SCRUB(LMMethod):
    name = "scrub"
    keeps_originals = True

    def make_optimizer(self) -> Any:
        """One optimizer for the max and min steps (the code's: momentum carries across)."""
        c = self.config
        if c.optimizer == "sgd":
            self.optimizer = torch_sgd(self.tensors, c.lr, c.momentum, c.weight_decay)
        else:
            self.optimizer = torch_adamw(self.tensors, c.lr, weight_decay=c.weight_decay,
                                         decay_1d=True)
        return self.optimizer

    def _kl(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.original():
            teacher = self.logits(inputs)
        student = self.logits(inputs)
        return token_kl(teacher, student, inputs, self.config.temperature), student

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        metrics: dict[str, float] = {}
        if c.max_steps is None or step.idx < c.max_steps:
            forget_kl, _ = self._kl(self.tokenize(step.forget))
            metrics.update(max_loss=-forget_kl.item(), forget_kl=forget_kl.item())
            check_finite(forget_kl.item(), "max-step loss", step.idx, metrics)
            self.optimizer.zero_grad()
            (-forget_kl).backward()
            self.optimizer.step()
        retain = self.tokenize(step.retain)
        retain_kl, student = self._kl(retain)
        retain_nll = mean_nll(student, retain)
        min_loss = c.alpha * retain_kl + c.gamma * retain_nll
        metrics.update(min_loss=min_loss.item(), retain_kl=retain_kl.item(),
                       retain_nll=retain_nll.item())
        return min_loss, metrics


# zephyr-7b: AdamW at the TOFU-derived baselines' rate and decay, constant (see above);
# sandbox: AdamW, no decay, the settings its sweep was measured with (lm.py)
PRESETS = presets("scrub", zephyr={"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.01},
                  sandbox={"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0})

"""The optimizer settings every fine-tuning loop shares: AdamW's weight decay and the learning-rate
schedule. The learning rate itself is each config's own (a method's paper default, relearning's
one rate, the protocol's grid of rates).

    @dataclass
    class RelearnConfig(FinetuneSettings):   # FinetuneSettings(OptimizerSettings)
        lr: float = 1e-3
    RelearnConfig(lr_schedule="linear", warmup_ratio=0.1).check_optimizer("relearn")

A subclass changes a default by declaring the field again (dataclasses keep the base's order).
No torch here: the loops build the optimizer (`wmdp.unlearn.optim`); this module only says what
the settings are and refuses bad ones in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wmdp.errors import WmdpError

SCHEDULES = ("constant", "linear")


@dataclass
class OptimizerSettings:
    """AdamW's weight decay and the schedule of its learning rate."""

    weight_decay: float = 0.0         # AdamW's decoupled decay
    lr_schedule: str = "constant"     # constant, or linear: warmup then decay to 0 (HF's Trainer)
    warmup_ratio: float = 0.0         # share of the steps warming up (lr_schedule linear)

    def check_optimizer(self, where: str) -> None:
        """One line naming the bad setting (`where`: the config's prefix, e.g. "relearn")."""
        def bad(name: str, expected: str) -> WmdpError:
            return WmdpError(f"{where}.{name} is {getattr(self, name)!r}, expected {expected}")

        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise bad("weight_decay", "a number >= 0")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", " or ".join(SCHEDULES))
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1):
            raise bad("warmup_ratio", "a fraction of the run's steps, 0 to 1")


def check_lr(lr: object, where: str) -> None:
    """A learning rate is a finite number > 0 (`where` names it: "relearn.lr")."""
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
            and lr > 0):
        raise WmdpError(f"{where} is {lr!r}, expected a positive learning rate")

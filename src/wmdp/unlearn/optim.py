"""The optimizer of the RMU reference code: the legacy `transformers.AdamW`.

    update = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

`torch.optim.AdamW` instead divides by `sqrt(v / (1 - b2^t)) + eps`, i.e. puts eps inside the
bias correction. RMU's gradients are tiny (about 2e-7 on zephyr's first step), comparable to
eps = 1e-6, so the two rules give different models; the faithful presets use this one.

It trains `TrainedTensor`s: whole parameters or slices of one (Mixtral's fused experts), with
state the shape of the slice. State is kept in the parameter's dtype, as the reference's was.

The baselines' optimizers are torch's: `torch_adamw` (TOFU, NPO, LLMU: HF's Trainer or a plain
`torch.optim.AdamW`) and `torch_sgd` (SCRUB's code: SGD with momentum), optionally under
`LinearWarmupDecay`, the learning-rate schedule of HF's Trainer (TOFU, NPO) and of LLMU's code.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wmdp.errors import WmdpError
from wmdp.models import TrainedTensor


def _param_groups(tensors: list[TrainedTensor], what: str, weight_decay: float,
                  decay_1d: bool) -> list[dict[str, Any]]:
    """Whole tensors (torch's optimizers cannot train a slice of one), all decayed (`decay_1d`,
    as a plain torch optimizer on `model.parameters()`) or all but the 1-D ones, biases and norm
    weights (as HF's Trainer groups them)."""
    if any(t.index is not None for t in tensors):
        raise WmdpError(f"torch's {what} cannot train a slice of a fused expert tensor (Mixtral's "
                        "expert 0): use RMU's legacy_adamw, or params=layers")
    decay = [t.param for t in tensors if decay_1d or t.param.dim() >= 2]
    rest = [t.param for t in tensors if not (decay_1d or t.param.dim() >= 2)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": rest, "weight_decay": 0.0}) if g["params"]]


def torch_adamw(tensors: list[TrainedTensor], lr: float, eps: float = 1e-8,
                weight_decay: float = 0.0, decay_1d: bool = False) -> torch.optim.AdamW:
    """`torch.optim.AdamW`: decoupled weight decay, p *= 1 - lr * weight_decay, each step."""
    return torch.optim.AdamW(_param_groups(tensors, "AdamW", weight_decay, decay_1d), lr=lr,
                             eps=eps)


def torch_sgd(tensors: list[TrainedTensor], lr: float, momentum: float,
              weight_decay: float = 0.0, decay_1d: bool = True) -> torch.optim.SGD:
    """`torch.optim.SGD` with momentum; weight decay as L2 (g += weight_decay * p), as torch's."""
    return torch.optim.SGD(_param_groups(tensors, "SGD", weight_decay, decay_1d), lr=lr,
                           momentum=momentum)


class LinearWarmupDecay:
    """An optimizer whose learning rate follows HF's `get_linear_schedule_with_warmup`: the
    optimizer step k of n (from 0) uses lr * k / w for k < w, then lr * (n - k) / (n - w).

    TOFU and NPO run it through HF's Trainer (w: one epoch of their 5 and 10), LLMU's code with
    w = 0. As there, the first step of a warmup has rate 0 (it only fills Adam's moments).
    The loop steps this object as it steps any optimizer; its state (the step count with the
    optimizer's) goes into checkpoints, so a resumed run continues the same schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int,
                 warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.total, self.warmup = total_steps, warmup_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0

    def factor(self, k: int) -> float:
        if k < self.warmup:
            return k / max(1, self.warmup)
        return max(0.0, (self.total - k) / max(1, self.total - self.warmup))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * self.factor(self.step_count)
        self.optimizer.step()
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step": self.step_count, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])


class LegacyAdamW:
    def __init__(self, tensors: list[TrainedTensor], lr: float = 5e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        self.tensors = tensors
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.correct_bias = weight_decay, correct_bias
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(t.view()) for t in tensors]
        self.exp_avg_sq = [torch.zeros_like(t.view()) for t in tensors]

    def zero_grad(self) -> None:
        for t in self.tensors:
            t.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        step_size = self.lr
        if self.correct_bias:
            step_size *= math.sqrt(1.0 - b2 ** self.step_count) / (1.0 - b1 ** self.step_count)
        for t, m, v in zip(self.tensors, self.exp_avg, self.exp_avg_sq):
            if t.param.grad is None:
                continue
            grad = t.param.grad if t.index is None else t.param.grad[t.index]
            p = t.param.data if t.index is None else t.param.data[t.index]  # a view: in place
            m.mul_(b1).add_(grad, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
            p.addcdiv_(m, v.sqrt().add_(self.eps), value=-step_size)
            if self.weight_decay > 0.0:
                p.add_(p, alpha=-self.lr * self.weight_decay)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": list(self.exp_avg),
                "exp_avg_sq": list(self.exp_avg_sq)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src)

"""The optimizer of the RMU reference code: the legacy `transformers.AdamW`.

    update = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

`torch.optim.AdamW` instead divides by `sqrt(v / (1 - b2^t)) + eps`, i.e. puts eps inside the
bias correction. RMU's gradients are tiny (about 2e-7 on zephyr's first step), comparable to
eps = 1e-6, so the two rules give different models; the faithful presets use this one.

It trains `TrainedTensor`s: whole parameters or slices of one (Mixtral's fused experts), with
state the shape of the slice. State is kept in the parameter's dtype, as the reference's was.
"""

from __future__ import annotations

import math

import torch

from wmdp.errors import WmdpError
from wmdp.models import TrainedTensor


def torch_adamw(tensors: list[TrainedTensor], lr: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """`torch.optim.AdamW` (no weight decay) on whole tensors; it cannot train a slice of one."""
    if any(t.index is not None for t in tensors):
        raise WmdpError("torch's AdamW cannot train a slice of a fused expert tensor (Mixtral's "
                        "expert 0): use RMU's legacy_adamw, or params=layers")
    return torch.optim.AdamW([t.param for t in tensors], lr=lr, eps=eps, weight_decay=0.0)


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

"""Weight quantization: does rounding the weights bring the removed knowledge back?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks quantize --output DIR

Zhang et al. (ICLR 2025) found that 4-bit post-training quantization brought "unlearned"
knowledge from 21% back to 83% on MUSE: a method whose weight changes are smaller than the
quantization step hides the knowledge in the low bits, and rounding throws the hiding away.
Each model under audit (base, unlearned, and an oracle where the audit's context holds one) is copied, the
weights of its linear layers quantized weight-only by optimum-quanto (`qint8`, `qint4`:
symmetric, per output channel for 8 bits, groups of 128 inputs for 4 bits; activations stay in
the model's dtype; `exclude` keeps the LM head as quanto's own examples do), and the forget
questions re-scored with the plain prompt, as the evaluator scores them. quanto runs on a CPU
and on CUDA, so the sandbox and the `gpu` preset go through the same code.

The width that recovers most is chosen on one half of the questions and reported on the other,
halves swapped and pooled (`wmdp.stats.cross_fit_best`); the in-sample best is kept beside it.
Every figure has a paired bootstrap interval over questions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from optimum.quanto import freeze, qint4, qint8, quantize
from torch import nn

from wmdp.audit.common import AuditContext, cross_fitted_recovery, question_correct
from wmdp.errors import WmdpError
from wmdp.scoring import Request
from wmdp.tasks import build_prompt

BITS = (8, 4)


@dataclass
class QuantizeConfig:
    """Weight-only quantization settings."""

    bits: list[int] = field(default_factory=lambda: list(BITS))  # widths tried (8 and/or 4)
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])  # modules kept as they are


def quantized_copy(model: nn.Module, bits: int, exclude: list[str]) -> nn.Module:
    """A copy of `model` whose linear weights are quantized to `bits` (weight-only)."""
    if bits not in BITS:
        raise WmdpError(f"quantize.bits: {bits} is not one of {', '.join(map(str, BITS))}")
    q = copy.deepcopy(model)
    quantize(q, weights={8: qint8, 4: qint4}[bits], exclude=exclude or None)
    freeze(q)
    return q.eval()


def _scores(ctx: AuditContext, config: QuantizeConfig) -> dict[str, dict[str, np.ndarray]]:
    """role -> task -> (widths, questions) correctness. One quantized copy is held at a time."""
    requests = {name: [Request(c, tuple(k)) for c, k in
                       (build_prompt(i, ctx.tasks[name], ctx.style) for i in ctx.items[name])]
                for name in ctx.tasks}
    out = {role: {name: np.zeros((len(config.bits), len(ctx.items[name]))) for name in ctx.tasks}
           for role in ctx.subjects}
    for k, bits in enumerate(config.bits):
        for role, subject in ctx.subjects.items():
            q = quantized_copy(subject.model, bits, config.exclude)
            for name in ctx.tasks:
                out[role][name][k] = question_correct(
                    ctx, role, requests[name], [i.answer for i in ctx.items[name]],
                    ctx.progress and f"quantize {name} {bits}-bit ({role})", model=q)
            del q
    return out


def quantize_task(ctx: AuditContext, name: str, config: QuantizeConfig,
                  correct: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(the task's figures, its recovery entry) from each role's (widths, questions) scores."""
    figures, entry = cross_fitted_recovery(ctx, name, correct, config.bits, "bits")
    out = {"n": len(ctx.items[name]), **figures}
    return out, entry


def run_quantize(ctx: AuditContext, config: QuantizeConfig) -> dict:
    """Every audited task under each width, for every model under audit."""
    if not config.bits:
        raise WmdpError("quantize.bits is empty: give 8, 4 or both")
    for b in config.bits:
        if b not in BITS:
            raise WmdpError(f"quantize.bits: {b} is not one of {', '.join(map(str, BITS))}")
    scores = _scores(ctx, config)
    tasks, recovery = {}, {}
    for name in ctx.tasks:
        tasks[name], recovery[name] = quantize_task(
            ctx, name, config, {role: scores[role][name] for role in ctx.subjects})
    return {"bits": list(config.bits), "exclude": list(config.exclude), "tasks": tasks,
            "recovery": recovery,
            "selection": "the width chosen on one half of the questions and reported on the "
                         "other, halves swapped and pooled (wmdp.stats.cross_fit_best)"}


def quantize_text(fig: dict, result: dict) -> str:
    """The verdict's sentence, from its pooled figures (`wmdp.audit.verdicts`)."""
    u, b, a, ba = fig["unlearned"], fig["base"], fig["attacked"], fig["base_attacked"]
    frac = fig.get("recovered_fraction")
    bits = ", ".join(f"{x}-bit" for x in result["bits"])
    gap = ("no gap to recover (no task where the base model is above chance and unlearning "
           "opened a gap)" if frac is None else f"{frac:.0%} of the gap recovered")
    return (f"weight-only quantization ({bits}; the width chosen on other questions) moves the "
            f"unlearned model from {u:.2f} to {a:.2f} (base {b:.2f}, quantized {ba:.2f}): {gap}. "
            f"On all {fig['n']} questions, each reported under a width chosen without it.")

"""Pruning: does zeroing the neurons that tell forget text from retain text bring it back?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks prune \
        --forget-corpora cais/wmdp-bio-forget-corpus --retain-corpora wikitext --output DIR

Łucki et al. (2025) recovered "unlearned" knowledge by pruning: a method that suppresses the
knowledge with a few neurons that fire on forget-domain text loses the suppression when those
neurons are removed. An MLP neuron's activation is its input to the MLP output projection
(`down_proj` in Llama's words, `wmdp.models.ARCHS`). Per decoder block, each neuron is scored
by the mean over real tokens of |activation| on `num_texts` forget texts minus the same mean on
`num_texts` retain texts; the top k of each block are zeroed (a forward pre-hook on the output
projection, removed afterwards: the audited model is never changed) and the forget questions
re-scored with the plain prompt, as the evaluator scores them. Each model under audit (base,
unlearned, and an oracle where the audit's context holds one) is scored on its own activations.

The k that recovers most is chosen on one half of the questions and reported on the other,
halves swapped and pooled (`wmdp.stats.cross_fit_best`); the in-sample best is kept beside it.
Every figure has a bootstrap interval over questions (paired over the models for the share).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn
from wmdp.progress import tqdm

from wmdp.audit.common import (AuditContext, Subject, cross_fitted_recovery, interleaved,
                               question_correct)
from wmdp.errors import WmdpError
from wmdp.models import arch_of, decoder_layers, input_device
from wmdp.scoring import Request
from wmdp.tasks import build_prompt
from wmdp.unlearn.batches import chunk, tokenize, training_tokenizer

SHOWN = 8  # top neurons per block recorded in the result (index and score)


@dataclass
class PruneConfig:
    """Neuron-pruning settings."""

    k: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # neurons zeroed per block
    num_texts: int = 64               # texts from the forget corpora, and as many retain texts
    max_length: int = 256             # tokens per text
    batch_size: int = 8               # texts per forward


def mlp_out_modules(model: nn.Module) -> list[nn.Module]:
    """Per decoder block, the MLP output projection, whose input holds the neuron activations."""
    arch = arch_of(model)
    if model.config.model_type == "mixtral":
        raise WmdpError("prune: Mixtral's experts are stored fused; its MLP neurons cannot be "
                        "read one projection per block")
    return [block.get_submodule(arch.mlp_out) for block in decoder_layers(model)]


@contextmanager
def neurons_zeroed(model: nn.Module, neurons: list[torch.Tensor]) -> Iterator[nn.Module]:
    """The model with neuron ids `neurons[layer]` zeroed at each block's MLP output projection's
    input; the hooks go when the block ends, whatever happens inside it."""
    def hook_for(ids: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()          # (B, T, n_neurons)
            x[..., ids.to(x.device)] = 0
            return (x, *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(ids))
               for m, ids in zip(mlp_out_modules(model), neurons) if len(ids)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_abs_activations(subject: Subject, texts: list[str], config: PruneConfig,
                         progress: bool | str = False) -> list[torch.Tensor]:
    """Per block, per neuron: the mean |activation| over every real token of `texts`."""
    tok = training_tokenizer(subject.tokenizer)
    modules = mlp_out_modules(subject.model)
    sums: list[torch.Tensor | None] = [None] * len(modules)
    mask: torch.Tensor | None = None

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            a = args[0].float().abs() * mask.to(args[0].device)[..., None]  # (B, T, n)
            s = a.sum(dim=(0, 1)).double().cpu()
            sums[i] = s if sums[i] is None else sums[i] + s
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    count = 0
    try:
        for batch in tqdm(chunk(texts, config.batch_size), desc=progress or "prune",
                          disable=not progress, leave=False):
            inputs = tokenize(tok, batch, config.max_length, input_device(subject.model))
            mask = inputs["attention_mask"].float()
            subject.model(**inputs, use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0 or any(s is None for s in sums):
        raise WmdpError("prune: no text to read (the corpora gave no tokens)")
    return [s / count for s in sums]


def neuron_scores(ctx: AuditContext, role: str, config: PruneConfig) -> list[torch.Tensor]:
    """Per block, per neuron: mean |activation| on forget texts minus on retain texts."""
    forget = interleaved(ctx.forget, config.num_texts)[:config.num_texts]
    retain = interleaved(ctx.retain, config.num_texts)[:config.num_texts]
    label = ctx.progress and f"prune activations ({role})"
    f = mean_abs_activations(ctx.subjects[role], forget, config, label)
    r = mean_abs_activations(ctx.subjects[role], retain, config, label)
    return [a - b for a, b in zip(f, r)]


def top_neurons(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per block, the ids of its k highest-scoring neurons (all of them where it has fewer)."""
    return [torch.topk(s, min(k, s.numel())).indices for s in scores]


def prune_task(ctx: AuditContext, name: str, config: PruneConfig,
               scores: dict[str, list[torch.Tensor]]) -> tuple[dict, dict]:
    """(the task's figures, its recovery entry) for one audited task."""
    task, items = ctx.tasks[name], ctx.items[name]
    requests = [Request(c, tuple(k)) for c, k in (build_prompt(i, task, ctx.style) for i in items)]
    answers = [i.answer for i in items]
    correct = {}
    for role, subject in ctx.subjects.items():
        rows = []
        for k in config.k:
            with neurons_zeroed(subject.model, top_neurons(scores[role], k)):
                rows.append(question_correct(ctx, role, requests, answers,
                                             ctx.progress and f"prune {name} k={k} ({role})"))
        correct[role] = np.array(rows)
    figures, entry = cross_fitted_recovery(ctx, name, correct, config.k, "k")
    out = {"n": len(items), **figures}
    return out, entry


def run_prune(ctx: AuditContext, config: PruneConfig) -> dict:
    """Every audited task with the top-k forget-vs-retain neurons zeroed, for each k and every
    model under audit."""
    if not config.k or any(k < 1 for k in config.k):
        raise WmdpError(f"prune.k is {config.k}: give one or more positive neuron counts")
    if not ctx.forget or not ctx.retain:
        raise WmdpError("the prune attack needs forget and retain text: give --forget-corpora "
                        "and --retain-corpora")
    scores = {role: neuron_scores(ctx, role, config) for role in ctx.subjects}
    tasks, recovery = {}, {}
    for name in ctx.tasks:
        tasks[name], recovery[name] = prune_task(ctx, name, config, scores)
    neurons = {role: [{"ids": top.indices.tolist(), "scores": top.values.tolist()}
                      for top in (torch.topk(s, min(SHOWN, s.numel())) for s in per_block)]
               for role, per_block in scores.items()}
    return {"k": list(config.k), "num_texts": config.num_texts, "neurons": neurons,
            "tasks": tasks, "recovery": recovery,
            "selection": "k chosen on one half of the questions and reported on the other, "
                         "halves swapped and pooled (wmdp.stats.cross_fit_best)"}


def prune_text(fig: dict, result: dict) -> str:
    """The verdict's sentence, from its pooled figures (`wmdp.audit.verdicts`)."""
    u, b, a, ba = fig["unlearned"], fig["base"], fig["attacked"], fig["base_attacked"]
    frac = fig.get("recovered_fraction")  # the verdict's: None where no task has a gap
    ks = ", ".join(map(str, result["k"]))
    gap = "no gap to recover" if frac is None else f"{frac:.0%} of the gap recovered"
    return (f"zeroing the top-k neurons per block by forget-vs-retain activation (k in {ks}; k "
            f"chosen on other questions) moves the unlearned model from {u:.2f} to {a:.2f} "
            f"(base {b:.2f}, pruned {ba:.2f}): {gap}. On all {fig['n']} questions, each "
            f"reported under a k chosen without it.")

"""Activation norms: is the unlearned model's residual stream unusual on forget text?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks activations \
        --forget-corpora cais/wmdp-bio-forget-corpus --retain-corpora wikitext --output DIR

RMU steers the residual stream on forget text towards a large random vector, so its norm there
grows while on retain text it stays the base model's: the norm itself tells a reader (or a
filter) that the model is looking at forget-domain text. Per decoder block, the mean over
tokens (padding excluded) of the L2 norm of the block's output, on `num_texts` forget texts and
`num_texts` retain texts, for both models; and the ratios unlearned / base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from wmdp.progress import tqdm

from wmdp.audit.common import AuditContext, Subject, interleaved, resolve_layers
from wmdp.layers import read_layers
from wmdp.errors import WmdpError
from wmdp.models import input_device
from wmdp.unlearn.batches import chunk, tokenize, training_tokenizer


@dataclass
class ActivationsConfig:
    """Activation-norm settings."""

    num_texts: int = 32               # texts from the forget corpora, and as many retain texts
    max_length: int = 256             # tokens per text
    batch_size: int = 8               # texts per forward
    layers: list[int] | None = None   # decoder blocks (negative: from the end); None: all


@torch.no_grad()
def mean_norms(subject: Subject, texts: list[str], layer_ids: list[int],
               config: ActivationsConfig, progress: bool | str = False) -> list[float]:
    """Per block: the mean L2 norm of its output over every real token of `texts`."""
    tok = training_tokenizer(subject.tokenizer)
    sums = torch.zeros(len(layer_ids), dtype=torch.float64)
    count = 0
    for batch in tqdm(chunk(texts, config.batch_size), desc=progress or "activations",
                      disable=not progress, leave=False):
        inputs = tokenize(tok, batch, config.max_length, input_device(subject.model))
        mask = inputs["attention_mask"]

        def norm_sum(h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> scalar
            return (h.float().norm(dim=-1) * mask.to(h.device)).sum().double().cpu()

        got = read_layers(subject.model, inputs, layer_ids, norm_sum)
        sums += torch.stack([got[i] for i in layer_ids])
        count += int(mask.sum())
    return (sums / count).tolist()


def run_activations(ctx: AuditContext, config: ActivationsConfig) -> dict:
    for kind, corpora in (("forget", ctx.forget), ("retain", ctx.retain)):
        if not corpora:
            raise WmdpError(f"activations needs {kind} corpora (--{kind}-corpora)")
    texts = {"forget": interleaved(ctx.forget, config.num_texts)[:config.num_texts],
             "retain": interleaved(ctx.retain, config.num_texts)[:config.num_texts]}
    layer_ids = resolve_layers(ctx.subjects["base"].model, config.layers)
    out: dict = {"layers": layer_ids, "n_texts": {k: len(v) for k, v in texts.items()}}
    for role, subject in ctx.subjects.items():
        out[role] = {kind: mean_norms(subject, t, layer_ids, config,
                                      ctx.progress and f"activations {role} {kind}")
                     for kind, t in texts.items()}
    for kind in texts:  # > 1: the unlearned model's activations are larger than the base's
        out[f"{kind}_ratio"] = [u / b for u, b in zip(out["unlearned"][kind], out["base"][kind])]
    # how much more the forget norms grew than the retain norms, per block
    out["forget_vs_retain"] = [f / r for f, r in zip(out["forget_ratio"], out["retain_ratio"])]
    j = max(range(len(layer_ids)), key=lambda i: out["forget_vs_retain"][i])
    out["peak"] = {"layer": layer_ids[j], "forget_ratio": out["forget_ratio"][j],
                   "retain_ratio": out["retain_ratio"][j],
                   "forget_vs_retain": out["forget_vs_retain"][j]}
    return out

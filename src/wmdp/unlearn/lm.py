"""What the baselines that train on language-model losses share: the token-level losses, which
tensors train, the original model's outputs without a second model, and the optimizer.

    logits = self.logits(inputs)                        # (B, T, V), one forward
    nll = mean_nll(logits, inputs)                      # mean over the batch's real next tokens
    logp = sequence_logprob(logits, inputs)             # (B,) log p(text): NPO's log pi(y|x)
    with self.original():                               # the trained tensors' original values
        ref = self.logits(inputs)
    kl = token_kl(ref, logits, inputs, temperature=1)   # mean over real positions of KL(ref || now)

Padding never counts: the prediction at position t of x[t+1] is scored only when both tokens are
real (`next_token_mask`), so a text's loss is the same alone or in a left-padded batch; the first
token of a text is never predicted (there is no context for it).

Which tensors train (`params`): `all` (every parameter, full fine-tuning, the baselines' papers'
setting), `layers` (every parameter of the decoder blocks `layer_ids`), or `mlp_out` (the MLP
output projections of `layer_ids`, RMU's choice). Memory: full fine-tuning with AdamW holds the
gradients and two moments of every parameter; LLMU and SCRUB also keep a copy of the trained
tensors' original values (for `all`, a second copy of the model on the same device; no second
model object or forward graph). `layers`/`mlp_out` shrink both to the chosen blocks.

The optimizer (`make_optimizer`) is torch's AdamW with the config's `weight_decay` (not on 1-D
tensors, as HF's Trainer groups them, unless the method sets `decay_1d`) under its
`lr_schedule`: `linear` (HF's linear warmup over `warmup_ratio` of the steps, then decay to 0)
or `constant`. Each config checks its own values when built (`check_settings`), so a bad one is
a one-line error before any model loads.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from wmdp.errors import WmdpError
from wmdp.layers import swapped
from wmdp.models import PARAM_ROLES, TrainedTensor, input_device, train_only
from wmdp.unlearn.batches import TopicBatches, tokenize, training_tokenizer
from wmdp.unlearn.optim import LinearWarmupDecay, torch_adamw
from wmdp.unlearn.parallel import global_mean
from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS


# -- token-level losses ------------------------------------------------------------------------
def next_token_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1): 1 where position t (real) predicts a real token x[t+1]."""
    am = inputs["attention_mask"]
    return (am[:, :-1] * am[:, 1:]).float()


def token_logprobs(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1): log p(x[t+1] | x[<=t]) in float32, padding not yet masked."""
    targets = inputs["input_ids"][:, 1:]
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                            reduction="none")
    return logp.view(targets.shape)


def mean_nll(logits: torch.Tensor, inputs: dict[str, torch.Tensor],
             target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over the batch's real next tokens (and `target_mask`'s)."""
    mask = next_token_mask(inputs)
    if target_mask is not None:
        mask = mask * target_mask
    return global_mean(-(token_logprobs(logits, inputs) * mask).sum(), mask.sum())  # over all ranks


def sequence_logprob(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,): the summed log-likelihood of each text."""
    return (token_logprobs(logits, inputs) * next_token_mask(inputs)).sum(-1)


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, inputs: dict[str, torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over real positions of KL(p_ref || p) of the next-token distributions, both at
    `temperature`, times temperature^2 (the distillation convention, Hinton et al. 2015)."""
    ref = F.log_softmax(ref_logits[:, :-1].float() / temperature, dim=-1)   # (B, T-1, V)
    now = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    kl = (ref.exp() * (ref - now)).sum(-1)                                     # (B, T-1)
    mask = next_token_mask(inputs)
    return global_mean((kl * mask).sum(), mask.sum()) * temperature ** 2  # over all ranks


# -- the shared setup ---------------------------------------------------------------------------
class LMMethod:
    """Setup, tokenisation, originals and optimizer of the LM-loss baselines.

    A subclass sets `name`, says whether it needs the original values (`keeps_originals`), and
    writes `loss(step)`. Its config has the fields `lr`, `max_length`, `params`, `layer_ids`.
    """

    name = ""
    keeps_originals = False   # LLMU, SCRUB: outputs of the original model, by swapping values
    decay_1d = False          # weight decay on biases and norm weights too (not HF's Trainer)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tensors: list[TrainedTensor] = []
        self.originals: list[torch.Tensor] = []

    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int) -> None:
        c = self.config
        self.model, self.device = model, input_device(model)
        self.tokenizer = training_tokenizer(tokenizer)
        self.schedule, self.seed = schedule, seed
        model.eval()  # no dropout, as RMU (zephyr, Yi and Mixtral have none)
        self.tensors = train_only(model, c.params, c.layer_ids)
        self.originals = ([t.view().detach().clone() for t in self.tensors]
                          if self.keeps_originals else [])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.config.max_length, self.device)

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs, use_cache=False).logits

    def plus_retain_nll(self, step: Any, forget_loss: torch.Tensor, metrics: dict[str, float],
                        weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """`forget_loss + weight * nll(retain)`, the retain term GradDiff and NPO+RT add (no
        retain forward at weight 0)."""
        if weight == 0.0:
            return forget_loss, metrics
        retain = self.tokenize(step.retain)
        retain_nll = mean_nll(self.logits(retain), retain)
        retain_loss = weight * retain_nll
        metrics.update(retain_loss=retain_loss.item(), retain_nll=retain_nll.item())
        return forget_loss + retain_loss, metrics

    @contextmanager
    def original(self) -> Iterator[None]:
        """The original model, without gradients: trained tensors' first values swapped in."""
        if not self.keeps_originals:
            raise WmdpError(f"{self.name} keeps no original values")
        with torch.no_grad(), swapped(self.tensors, self.originals):
            yield

    def make_optimizer(self) -> Any:
        """AdamW on the trained tensors (the baselines' papers' optimizer, eps 1e-8 as in HF's
        Trainer and torch), with the config's weight decay and learning-rate schedule."""
        c = self.config
        return self.scheduled(torch_adamw(self.tensors, c.lr, weight_decay=c.weight_decay,
                                          decay_1d=self.decay_1d))

    def scheduled(self, optimizer: Any) -> Any:
        """`optimizer` under the config's `lr_schedule` over this run's steps."""
        c = self.config
        if getattr(c, "lr_schedule", "constant") == "constant":
            return optimizer
        total = len(self.schedule)
        warmup = math.ceil(c.warmup_ratio * total - 1e-9)  # HF: ceil(warmup_ratio * steps)
        return LinearWarmupDecay(optimizer, total, warmup)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- settings every trained baseline shares ------------------------------------------------------
SCHEDULES = ("constant", "linear")


def check_settings(c: Any, method: str) -> None:
    """One-line errors for the shared settings (each config's `__post_init__` calls this), so a
    bad value stops the command before anything is loaded or written."""
    def bad(name: str, expected: str) -> WmdpError:
        return WmdpError(f"{method}: {name} is {getattr(c, name)!r}, expected {expected}")

    if c.params not in PARAM_ROLES:  # as select_tensors says it, before the model loads
        raise WmdpError(f"params {c.params!r} is not one of {', '.join(PARAM_ROLES)}")
    if c.params == "all" and c.layer_ids:
        raise WmdpError(f"layer_ids {c.layer_ids} given with params=all; use params=layers, "
                        "mlp or mlp_out to train only those blocks")
    if hasattr(c, "lr") and not (math.isfinite(c.lr) and c.lr > 0):
        raise bad("lr", "a positive learning rate")
    if not (isinstance(c.max_length, int) and c.max_length >= 2):
        raise bad("max_length", "at least 2 tokens (one to predict from, one to predict)")
    if hasattr(c, "weight_decay") and not (math.isfinite(c.weight_decay) and c.weight_decay >= 0):
        raise bad("weight_decay", "a number >= 0")
    if hasattr(c, "lr_schedule") and c.lr_schedule not in SCHEDULES:
        raise bad("lr_schedule", " or ".join(SCHEDULES))
    if hasattr(c, "warmup_ratio") and not 0 <= c.warmup_ratio <= 1:
        raise bad("warmup_ratio", "a fraction of the run's steps, 0 to 1")


def check_positive(c: Any, method: str, *names: str, zero: bool = False) -> None:
    """Each named setting is a finite number > 0 (>= 0 with `zero`)."""
    for name in names:
        value = getattr(c, name)
        if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
            expected = "a number >= 0" if zero else "a positive number"
            raise WmdpError(f"{method}: {name} is {value!r}, expected {expected}")


# -- presets every baseline shares --------------------------------------------------------------
# zephyr-7b: the WMDP paper's setup (its RMU run: the WMDP forget corpora, wikitext retain text,
# batches of 4, 150 steps, bf16) with the method's own published defaults, not the paper's tuned
# baseline values (its appendix's settings could not be retrieved here; SCRUB trains with
# AdamW at lr 1e-5, see scrub.py).
# sandbox: the offline sandbox (model and corpora given on the command line); the method's value
# is the point of benchmarks/baselines_sandbox.py's sweep with the largest general - forget
# accuracy on the default sandbox (seed 0), and its trained methods keep a constant rate and no
# weight decay (`lr_schedule: constant`, `weight_decay: 0`), the settings that sweep measured.
ZEPHYR_7B_CONFIG = RMU_PRESETS["zephyr-7b"]["config"]
SANDBOX_CONFIG = {"batch_size": 4, "max_num_batches": 150, "seed": 42}


def presets(method: str, zephyr: dict[str, Any], sandbox: dict[str, Any]) -> dict[str, dict]:
    """`zephyr-7b` and `sandbox` presets of `method` in the registry's layout."""
    return {"zephyr-7b": {"config": copy.deepcopy(ZEPHYR_7B_CONFIG), method: dict(zephyr)},
            "sandbox": {"config": dict(SANDBOX_CONFIG), method: dict(sandbox)}}


__all__ = ["next_token_mask", "token_logprobs", "mean_nll", "sequence_logprob", "token_kl",
           "LMMethod", "presets", "check_settings", "check_positive"]

"""LLMU: Yao et al. 2023, "Large Language Model Unlearning" (arXiv 2310.10683).

    wmdp unlearn llmu --preset sandbox --model sandbox/model --output runs/llmu ...

Three terms per step, as the paper's update theta -= e1 grad L_fgt + e2 grad L_rdm + e3 grad L_nor:

    forget_loss = -forget_weight * nll(forget)                       # gradient ascent
    random_loss = random_weight * nll(completion | forget prompt)    # mismatched answers
    retain_loss = kl_weight * KL(p_original || p_theta)(retain)      # stay the original

Defaults are the authors' code (kevinyaobytedance/llm_unlearn `unlearn_harm.py`, `utils.py`):
weights 0.5 / 1 / 1, torch's AdamW at lr 2e-6 with its default weight decay 0.01 (on every
tensor, biases and norm weights too, as a plain `AdamW(model.parameters())`), and a linear
decay of the rate to 0 at the last step with no warmup (`get_scheduler("linear")`; the code decays
over its `max_unlearn_steps`, here the run's steps). Its random term draws K = 5 answers
(`n_random`) per step and pairs every forget prompt with each of them; so does this one. The
paper pairs harmful prompts with answers from normal data (TruthfulQA); with corpora instead of
prompt-answer pairs, a forget text's first `prompt_length` tokens are the prompt, and the K
completions are the first `completion_length` tokens of K distinct texts of the step's topic's
retain corpus (drawn with a generator seeded by seed and step, so resume repeats them). As in
the code, the forget and random terms average each text's mean NLL over texts (each answer
weighs the same, whatever its length).

Differences, by design: the KL is the true KL averaged over real tokens (the code's
-sum p_orig log p_theta over every position, padding included, differs by the original model's
entropy, a constant, and by the padded positions); the code's early stop when the forget loss
passes `max_bad_loss` (100) is not kept: the run length is `max_num_batches`.

The original model's distributions come from swapping the trained tensors' original values in
(see `wmdp.unlearn.lm`): no second model, one extra no-grad forward on each retain batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from wmdp.errors import WmdpError
from wmdp.unlearn.batches import Step, left_padded
from wmdp.unlearn.parallel import global_mean
from wmdp.unlearn.lm import (LMMethod, check_positive, check_settings, next_token_mask, presets,
                             token_kl, token_logprobs)


@dataclass
class LLMUConfig:
    """LLMU's hyperparameters; defaults are the authors' code's."""

    forget_weight: float = 0.5        # e1: weight of gradient ascent on forget text ("bad_weight")
    random_weight: float = 1.0        # e2: weight of the random-completion NLL
    kl_weight: float = 1.0            # e3: weight of KL to the original model on retain text
    n_random: int = 5                 # K: random completions per forget prompt (the code's K=5)
    prompt_length: int = 64           # tokens of a forget text used as the prompt
    completion_length: int = 64       # tokens of a retain text used as its random completion
    lr: float = 2e-6                  # AdamW peak learning rate (the authors' code: 2e-6)
    weight_decay: float = 0.01        # AdamW's decoupled decay of 2-D tensors (torch's default)
    lr_schedule: str = "linear"       # linear: decay to 0 at the last step (the code's); constant
    warmup_ratio: float = 0.0         # share of the steps warming up (the code's: none)
    max_length: int = 512             # tokens per forget and retain text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "llmu")
        check_positive(self, "llmu", "forget_weight", "random_weight", "kl_weight", zero=True)
        for name in ("n_random", "prompt_length", "completion_length"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise WmdpError(f"llmu: {name} is {value!r}, expected a positive whole number")


def random_pairs(tokenizer: Any, prompts: list[str], completions: list[str], prompt_length: int,
                 completion_length: int, device: torch.device | str,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-padded prompt+completion batch and its (B, T-1) mask of completion targets."""
    p = tokenizer(prompts, truncation=True, max_length=prompt_length)["input_ids"]
    c = tokenizer([" " + t.lstrip() for t in completions], add_special_tokens=False,
                  truncation=True, max_length=completion_length)["input_ids"]
    inputs = left_padded([a + b for a, b in zip(p, c)], tokenizer.pad_token_id, device)
    width = inputs["input_ids"].shape[1]
    completion = torch.zeros(len(c), width)
    for i, n in enumerate(len(x) for x in c):
        completion[i, width - n:] = 1
    return inputs, completion[:, 1:].to(device)  # target t+1 is a completion token


def mean_text_nll(logits: torch.Tensor, inputs: dict[str, torch.Tensor],
                  target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over texts of each text's mean NLL over its real (and `target_mask`) next tokens:
    the code's per-answer weighting (a text with no target counts as 0, as there)."""
    mask = next_token_mask(inputs)
    if target_mask is not None:
        mask = mask * target_mask
    per_text = -(token_logprobs(logits, inputs) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return global_mean(per_text.sum(), len(per_text))  # over all ranks' texts


class LLMU(LMMethod):
    name = "llmu"
    keeps_originals = True
    decay_1d = True   # the code's plain AdamW decays every tensor

    def completions(self, step: Step) -> list[str]:
        """The step's K random answers: distinct texts of its topic's retain corpus, the same
        K for every forget prompt of the batch (the code's `random.sample(normal_ans, k=5)`)."""
        pool = [t for batch in self.schedule.retain[step.topic] for t in batch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step.idx)
        order = torch.randperm(len(pool), generator=g)[:self.config.n_random].tolist()
        return [pool[i] for i in order]

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        forget_nll = mean_text_nll(self.logits(forget), forget)

        answers = self.completions(step)
        prompts = [p for p in step.forget for _ in answers]  # every prompt with every answer
        pairs, targets = random_pairs(self.tokenizer, prompts, answers * len(step.forget),
                                      c.prompt_length, c.completion_length, self.device)
        random_nll = mean_text_nll(self.logits(pairs), pairs, targets)

        retain = self.tokenize(step.retain)
        with self.original():
            ref = self.logits(retain)
        retain_kl = token_kl(ref, self.logits(retain), retain)

        terms = {"forget_loss": -c.forget_weight * forget_nll,
                 "random_loss": c.random_weight * random_nll,
                 "retain_loss": c.kl_weight * retain_kl}
        metrics = {k: v.item() for k, v in terms.items()}
        metrics.update(forget_nll=forget_nll.item(), random_nll=random_nll.item(),
                       retain_kl=retain_kl.item())
        return sum(terms.values()), metrics


# sandbox: a constant rate and no decay, the settings its sweep was measured with (lm.py)
PRESETS = presets("llmu", zephyr={}, sandbox={"lr": 1e-3, "lr_schedule": "constant",
                                              "weight_decay": 0.0})

"""LLMU: Yao et al. 2023, "Large Language Model Unlearning" (arXiv 2310.10683).

    wmdp unlearn llmu --preset sandbox --model sandbox/model --output runs/llmu ...

Three terms per step, as the paper's update theta -= e1 grad L_fgt + e2 grad L_rdm + e3 grad L_nor:

    forget_loss = -forget_weight * nll(forget)                       # gradient ascent
    random_loss = random_weight * nll(completion | forget prompt)    # mismatched answers
    retain_loss = kl_weight * KL(p_original || p_theta)(retain)      # stay the original

The paper pairs harmful prompts with answers drawn at random from normal data (TruthfulQA) and
scores only the answer tokens; with corpora instead of prompt-answer pairs, a forget text's first
`prompt_length` tokens are the prompt and the first `completion_length` tokens of a retain text
of the same step (a seeded random permutation of the retain batch, a function of seed and step,
so resume repeats it) the completion. Defaults are the authors' code
(kevinyaobytedance/llm_unlearn `unlearn_harm.py`): weights 0.5 / 1 / 1, AdamW at lr 2e-6.
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

from wmdp.unlearn.batches import Step, left_padded
from wmdp.unlearn.lm import LMMethod, mean_nll, presets, token_kl


@dataclass
class LLMUConfig:
    """LLMU's hyperparameters; defaults are the authors' code's."""

    forget_weight: float = 0.5        # e1: weight of gradient ascent on forget text ("bad_weight")
    random_weight: float = 1.0        # e2: weight of the random-completion NLL
    kl_weight: float = 1.0            # e3: weight of KL to the original model on retain text
    prompt_length: int = 64           # tokens of a forget text used as the prompt
    completion_length: int = 64       # tokens of a retain text used as its random completion
    lr: float = 2e-6                  # AdamW learning rate (the authors' code: 2e-6)
    max_length: int = 512             # tokens per forget and retain text (longer ones are cut)
    params: str = "all"               # what trains: all, or layers, mlp, mlp_out of layer_ids
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)


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


class LLMU(LMMethod):
    name = "llmu"
    keeps_originals = True

    def completions(self, step: Step) -> list[str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step.idx)
        order = torch.randperm(len(step.retain), generator=g).tolist()
        return [step.retain[order[i % len(order)]] for i in range(len(step.forget))]

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self.tokenize(step.forget)
        forget_nll = mean_nll(self.logits(forget), forget)

        pairs, targets = random_pairs(self.tokenizer, step.forget, self.completions(step),
                                      c.prompt_length, c.completion_length, self.device)
        random_nll = mean_nll(self.logits(pairs), pairs, targets)

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


PRESETS = presets("llmu", zephyr={}, sandbox={"lr": 1e-3})

"""UNDO (Lee et al. 2025, "Distillation Robustifies Unlearning"): unlearn, noise, distill.

    wmdp unlearn rmu --preset sandbox --model sandbox/model --output runs/rmu ...   # the teacher
    wmdp unlearn undo --preset sandbox --model runs/rmu --output runs/undo \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl

`--model` is an already unlearned model: the teacher. The student starts as its copy with every
trained tensor shrunk towards, and mixed with, a fresh initialisation of the same architecture:

    w <- (1 - alpha) * w + alpha * beta * w_init      # w_init: the model class's own init, seeded

and is then distilled back from the teacher with the forward KL of the next-token distributions,
KL(teacher || student) at `temperature`, over the retain corpora's texts (general text; the
forget corpora are never read). What the teacher does not know (the unlearned knowledge, which
it only hides) is not in its outputs, so the student, whose weights no longer hold it either,
cannot learn it back from them: relearning must start from scratch. The teacher is the
trained tensors' loaded values, swapped in (wmdp.unlearn.lm): no second model is kept.

Read from the authors' code (AddieFoote/distillation-robustify-unlearning,
`run_partial_distill_wmdp.py`, `src/tools/partial_distill_wmdp.py`: `do_corruption`,
`forward_kl_loss_fn`): its WMDP run mixes with beta 0 (a pure shrink by alpha 0.25; its 1-D
tensors always shrink towards 0) and a Xavier-uniform noise where beta > 0; here w_init is the
architecture's own initialisation, so norm weights mix towards 1. Its optimizer: AdamW, lr 2e-5,
no decay, constant after 50 warmup steps, gradient clipping at 1 (not done here), batches of 110
texts of 1024 tokens, 3000 steps. The step count sets the student's budget: the run record
(`method_state`) gives the texts it read, to compare with the original training's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wmdp.errors import WmdpError
from wmdp.unlearn.batches import Step, TopicBatches, chunk
from wmdp.unlearn.lm import LMMethod, check_positive, check_settings, presets, token_kl


@dataclass
class UNDOConfig:
    """UNDO's hyperparameters; defaults are the authors' WMDP distillation but for beta."""

    alpha: float = 0.25               # how far the student moves from the teacher's weights
    beta: float = 1.0                 # scale of the fresh init it moves to (0: shrink to zero)
    temperature: float = 1.0          # of both distributions in the KL (the authors': 1)
    lr: float = 2e-5                  # AdamW learning rate (the authors' WMDP runs)
    weight_decay: float = 0.0         # the authors': 0
    lr_schedule: str = "constant"     # the authors': constant after warmup; or linear
    warmup_ratio: float = 0.0         # for lr_schedule linear
    max_length: int = 1024            # tokens per text (the authors': 1024)
    params: str = "all"               # what is noised and trained: all (the authors'), layers, ...
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out

    def __post_init__(self) -> None:
        check_settings(self, "undo")
        check_positive(self, "undo", "temperature")
        check_positive(self, "undo", "beta", zero=True)
        if not 0 <= self.alpha <= 1:
            raise WmdpError(f"undo: alpha is {self.alpha!r}, expected 0 <= alpha <= 1")


def fresh_init(model: nn.Module, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The named tensors of a freshly initialised model of the same config (seeded, without
    touching the caller's random state)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config)
    state = dict(fresh.named_parameters())
    return {n: state[n].detach() for n in names}


def shrink_perturb(tensors: list, init: list[torch.Tensor] | None, alpha: float,
                   beta: float) -> None:
    """w <- (1 - alpha) w + alpha * beta * w_init, in place (init None: beta is 0)."""
    with torch.no_grad():
        for i, t in enumerate(tensors):
            w = t.view()
            mixed = (1 - alpha) * w.float()
            if init is not None:
                mixed += alpha * beta * init[i].to(w.device).float()
            w.copy_(mixed.to(w.dtype))


class UNDO(LMMethod):
    name = "undo"
    keeps_originals = True  # the teacher: the loaded (unlearned) weights

    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int) -> None:
        super().setup(model, tokenizer, schedule, seed)
        c = self.config
        if any(t.index is not None for t in self.tensors):
            raise WmdpError("undo: a slice of a fused expert tensor cannot be reinitialised")
        texts = list(dict.fromkeys(t for corpus in schedule.retain for b in corpus for t in b))
        self.batches = chunk(texts, len(schedule.retain[0][0]))  # every retain text, in turn
        init = None
        if c.beta and c.alpha:
            fresh = fresh_init(model, [t.name for t in self.tensors], seed)
            init = [fresh[t.name] for t in self.tensors]
        shrink_perturb(self.tensors, init, c.alpha, c.beta)

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = self.tokenize(self.batches[step.idx % len(self.batches)])
        with self.original():
            teacher = self.logits(inputs)
        kl = token_kl(teacher, self.logits(inputs), inputs, self.config.temperature)
        return kl, {"distill_kl": kl.item()}

    def describe(self) -> dict:
        """The student's budget, for comparison with the original training's."""
        per_batch = [len(b) for b in self.batches]
        steps = len(self.schedule)
        texts = sum(per_batch[i % len(per_batch)] for i in range(steps))
        return {"alpha": self.config.alpha, "beta": self.config.beta, "distill_steps": steps,
                "distill_texts": texts, "distinct_texts": sum(per_batch),
                "trained_tensors": len(self.tensors)}


# zephyr-7b: the authors' WMDP distillation settings but beta (see above), 3000 steps; the
# batch is the shared config's. sandbox: a tiny model takes a large rate (its training's: 3e-3);
# batches of 32 as its training's; on the default sandbox (240 texts per forget corpus: 8
# batches a pass) 20 passes are 160 steps, 5,120 texts: 20% of its training's 800 x 32.
UNDO_PRESETS = presets("undo", zephyr={},
                       sandbox={"alpha": 0.5, "lr": 1e-3, "max_length": 512})
UNDO_PRESETS["zephyr-7b"]["config"]["max_num_batches"] = 3000
UNDO_PRESETS["sandbox"]["config"].update(batch_size=32, epochs=20)

__all__ = ["UNDO", "UNDOConfig", "UNDO_PRESETS", "fresh_init", "shrink_perturb"]

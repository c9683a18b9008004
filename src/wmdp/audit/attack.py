"""The fine-tuning attack: a few texts, a few AdamW steps, the model read at checkpoints and put
back as it was. Relearning (`wmdp.audit.relearn`), the relearning protocol
(`wmdp.audit.protocol`) and benchmarks/robustness_sandbox.py all run this one loop.

    texts, mentioned = select_texts(corpora, 8, questions, disjoint=True)
    curve = finetune(model, tokenizer, texts, FinetuneSettings(), method="full", lr=1e-3,
                     seed=0, checkpoints=[10, 40], evaluate=lambda m: {"acc": ...})
    curve[0]  # {"step": 10, "loss": mean loss over steps 1-10, "acc": ...}: evaluate at step 10

A step: the next batch of a seeded epoch order (each pass a `random.Random(seed)` permutation of
the texts, cut into batches of `batch_size`), left-padded (`wmdp.unlearn.batches.tokenize`:
each row's positions from 0), the loss below, one AdamW step (torch's, under `lr_schedule`).
It runs to the last checkpoint; `evaluate(model)` is called under no_grad at each.

The loss is `mean_nll`, the unlearning methods' token mean: position t predicting x[t+1] counts
only where both tokens are real. HF's label loss (`labels` = the ids, padding at -100) also
counts each left-padded row's first real token, predicted from a padding position: a target
the model cannot see any context for, whose weight depends on the lengths of the other rows in
the batch. With `mean_nll` a text's loss is the same alone or padded, and data-parallel runs
take the one-process update (its mean is over every process's tokens).

Full fine-tuning trains the model in place and copies its weights back from a CPU snapshot
after; LoRA (peft) adds adapters and unloads them (the original modules, weights untouched).
Either way the parameters' requires_grad flags and every module's train/eval mode come back;
the model trains in eval mode (no dropout), as RMU does. Under torchrun (full fine-tuning, the
model sharded by FSDP) each process takes its share of each batch (`wmdp.unlearn.parallel`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from wmdp.audit.common import interleaved
from wmdp.data.corpus import Corpus
from wmdp.data.mcq import MCQItem
from wmdp.distributed import rank_world
from wmdp.errors import WmdpError
from wmdp.models import input_device
from wmdp.optimizer_settings import OptimizerSettings
from wmdp.progress import tqdm
from wmdp.unlearn import parallel
from wmdp.unlearn.batches import chunk, tokenize, training_tokenizer
from wmdp.unlearn.lm import mean_nll
from wmdp.unlearn.optim import LinearWarmupDecay

METHODS = ("full", "lora")
POOL_PER_TEXT = 50  # candidate texts per text wanted, taken from the start of each corpus


@dataclass
class FinetuneSettings(OptimizerSettings):
    """How each attack run trains, beside its learning rate, method and seed (relearning's and
    the protocol's configs extend this; defaults suit the sandbox on a CPU)."""

    batch_size: int = 4               # texts per step
    max_length: int = 256             # tokens per text (longer ones are truncated)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])  # peft target_modules

    def check_finetune(self, where: str) -> None:
        """One line naming the bad setting (`where`: "relearn", "protocol")."""
        self.check_optimizer(where)
        for name in ("batch_size", "max_length", "lora_rank"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise WmdpError(f"{where}.{name} is {value!r}, expected a positive integer")


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 2}


def select_texts(corpora: list[Corpus], n: int, questions: list[MCQItem], disjoint: bool,
                 setting: str = "num_texts") -> tuple[list[str], list[bool]]:
    """N texts, and for each question whether a chosen text mentions its rarest word (its word
    found in the fewest candidate texts). `disjoint`: the texts that mention no question's rarest
    word first, so an attack measures knowledge coming back, not facts taught anew. `setting`
    names where N came from, for the error when the corpora hold fewer texts."""
    pool = interleaved(corpora, POOL_PER_TEXT * n)
    if len(pool) < n:
        raise WmdpError(f"{len(pool)} texts in {', '.join(c.name for c in corpora)}, fewer than "
                        f"{setting}={n}")
    pool_words = [_words(t) for t in pool]
    freq: dict[str, int] = {}
    for ws in pool_words:
        for w in ws:
            freq[w] = freq.get(w, 0) + 1
    keys = []
    for q in questions:  # the question's word found in the fewest texts (but in some)
        found = sorted((freq[w], w) for w in _words(q.question) if w in freq)
        keys.append(found[0][1] if found else None)
    key_set = {k for k in keys if k is not None}
    clean = [i for i, ws in enumerate(pool_words) if not ws & key_set]
    clean_set = set(clean)
    order = (clean + [i for i in range(len(pool)) if i not in clean_set]) if disjoint \
        else list(range(len(pool)))
    chosen = order[:n]
    seen = set().union(*(pool_words[i] for i in chosen))
    return [pool[i] for i in chosen], [k is not None and k in seen for k in keys]


def _attach(model: nn.Module, method: str,
            settings: FinetuneSettings) -> tuple[Any, list[nn.Parameter], Callable[[], Any]]:
    """The model to train, its trainable parameters, and what puts the weights back."""
    if method == "full":  # sharded (FSDP): each process keeps and restores its shards
        params = list(model.parameters())
        saved = [parallel.local(p).detach().to("cpu", copy=True) for p in params]
        model.requires_grad_(True)

        def restore() -> None:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    parallel.local(p).copy_(s)
                    p.grad = None
        return model, params, restore
    if method != "lora":
        raise WmdpError(f"fine-tuning method {method!r} is not one of {', '.join(METHODS)}")
    try:  # optional: only LoRA attacks need it
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise WmdpError("LoRA fine-tuning needs the peft package (pip install peft)") from None
    targets = (settings.lora_targets[0] if settings.lora_targets == ["all-linear"]
               else settings.lora_targets)
    tuned = get_peft_model(model, LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                             lora_dropout=0.0, target_modules=targets))
    return tuned, [p for p in tuned.parameters() if p.requires_grad], tuned.unload


def finetune(model: nn.Module, tokenizer: Any, texts: list[str], settings: FinetuneSettings, *,
             method: str, lr: float, seed: int, checkpoints: Iterable[int],
             evaluate: Callable[[nn.Module], dict], progress: bool = False,
             desc: str = "fine-tuning") -> list[dict]:
    """Fine-tune on `texts` up to the last checkpoint; per checkpoint (ascending) its step, the
    mean loss since the previous one, and `evaluate(model)`; the model put back after."""
    marks = sorted(set(checkpoints))
    if not marks or marks[0] < 1 or not texts:
        raise WmdpError("fine-tuning attack: needs texts and positive checkpoints")
    steps = marks[-1]
    torch.manual_seed(seed)  # LoRA's initialisation
    rng = random.Random(seed)  # the epoch order
    train_tok = training_tokenizer(tokenizer)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    model.eval()
    tuned, params, restore = _attach(model, method, settings)
    try:
        optimizer: Any = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
        if settings.lr_schedule == "linear":  # HF's warmup steps: ceil(warmup_ratio * steps)
            optimizer = LinearWarmupDecay(optimizer, steps,
                                          math.ceil(settings.warmup_ratio * steps - 1e-9))
        batches: list[list[str]] = []
        losses: list[float] = []
        curve = []
        for step in tqdm(range(1, steps + 1), desc=desc, leave=False,
                         disable=not progress or rank_world()[0] != 0):
            if not batches:  # a new pass, in a seeded order
                batches = chunk(rng.sample(texts, len(texts)), settings.batch_size)
            with parallel.training(True):  # many processes: this one's share, global means
                inputs = tokenize(train_tok, parallel.share(batches.pop(0)), settings.max_length,
                                  input_device(model))
                loss = mean_nll(tuned(**inputs, use_cache=False).logits, inputs)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(parallel.mean_over_ranks(loss.item(), {})[0])
            if step in marks:
                with torch.no_grad():
                    figures = evaluate(tuned)
                curve.append({"step": step, "loss": sum(losses) / len(losses), **figures})
                losses = []
        optimizer.zero_grad()
    finally:
        restore()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return curve

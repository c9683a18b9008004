"""Relearning: does a little fine-tuning bring the knowledge back?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks relearn \
        --forget-corpora cais/wmdp-bio-forget-corpus --retain-corpora wikitext --output DIR

Each model (full fine-tuning, its weights put back after from a CPU snapshot) or the model with
LoRA adapters (peft; removed after) trains on N forget-corpus texts for K steps, and separately
on N retain texts (the control: an unlearning that only hides knowledge often gives it back to
fine-tuning on unrelated text), in the fine-tuning attack's loop (`wmdp.audit.attack.finetune`:
its seeded batches and its loss); every audited task is re-evaluated with
`wmdp.evaluate.evaluate_model` every `eval_every` steps. Step 0 is the plain accuracy.

Which texts: with `disjoint` (default), texts that never mention an audited question's rarest
word (its word found in the fewest candidate texts; in the sandbox, the entity's name) are taken
first, so the curve measures knowledge coming back, not facts taught anew; questions whose
rarest word the chosen texts do mention are left out of the recovery figure and counted.
The model stays in eval mode (no dropout) while it trains, as RMU does.

One process (`--device-map auto` spreads a large model over the visible GPUs), or, for full
fine-tuning whose AdamW state outgrows one device, many under torchrun:

    torchrun --nproc-per-node 8 -m wmdp audit --attacks relearn --set relearn.method=full ...

Both models are then sharded with FSDP2 (`wmdp.unlearn.parallel`: weights, gradients and AdamW
state 1/N per process); each step's batch is split over the processes and its loss is the
global mean over tokens, so N processes take the one-process update; the re-evaluations
between steps score every N-th question on each process. LoRA (a few MB of trainable state)
runs as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wmdp.audit.attack import METHODS, FinetuneSettings, finetune, select_texts
from wmdp.audit.common import AuditContext, Subject, recovery_entry, task_accuracy
from wmdp.audit.oracle import audit_oracle, load_oracle
from wmdp.distributed import rank_world
from wmdp.errors import WmdpError
from wmdp.io import sha256_json
from wmdp.stats import cross_fit_best, reported, share_ci
from wmdp.optimizer_settings import check_lr


@dataclass
class RelearnConfig(FinetuneSettings):
    """Relearning settings; defaults suit the sandbox on a CPU (the gpu preset: 7B models).
    Beside these, FinetuneSettings': batch_size 4, max_length 256, weight_decay 0, lr_schedule
    constant, warmup_ratio 0, lora_rank 8, lora_alpha 16, lora_targets all-linear."""

    num_texts: int = 8                # N texts, from the forget corpora (and N retain texts)
    steps: int = 40                   # K optimizer steps
    eval_every: int = 10              # steps between re-evaluations
    lr: float = 1e-3                  # AdamW learning rate
    method: str = "full"              # full fine-tuning (weights restored after), or lora (peft)
    disjoint: bool = True             # prefer texts that never mention an audited question
    oracle: str = ""                  # a model that never learned the forget domains, relearned
    # the same way (the floor): "" a sandbox build's oracle/model beside the base model, when
    # there is one; "none": without; or a model directory


def check_relearn(config: RelearnConfig) -> None:
    """One line naming the bad setting, before any model loads."""
    if min(config.steps, config.eval_every, config.num_texts) < 1:
        raise WmdpError("relearn: steps, eval_every and num_texts must be positive")
    if config.method not in METHODS:
        raise WmdpError(f"relearn.method {config.method!r} is not one of {', '.join(METHODS)}")
    check_lr(config.lr, "relearn.lr")
    config.check_finetune("relearn")


def relearn_curve(subject: Subject, texts: list[str], ctx: AuditContext,
                  config: RelearnConfig, label: str) -> list[dict]:
    """Per-question correctness at step 0 and after every `eval_every` steps of fine-tuning
    (the attack loop, `wmdp.audit.attack.finetune`)."""
    check_relearn(config)

    def evaluate(model: Any) -> dict:
        figures = task_accuracy(model, subject.tokenizer, ctx.tasks, ctx.items, ctx.style.name,
                                ctx.batch_size)
        return {"correct": {t: f["correct"] for t, f in figures.items()}}

    marks = [*range(config.eval_every, config.steps + 1, config.eval_every), config.steps]
    curve = finetune(subject.model, subject.tokenizer, texts, config, method=config.method,
                     lr=config.lr, seed=ctx.seed, checkpoints=marks, evaluate=evaluate,
                     progress=ctx.progress, desc=f"relearn {label}")
    return [{"step": 0, "loss": None, "correct": dict(ctx.reference[subject.role])}, *curve]


def check_parallel(config: RelearnConfig) -> None:
    """Under torchrun: full fine-tuning, and every batch splits over the processes."""
    world = max(rank_world()[1], int(os.environ.get("WORLD_SIZE", "1")))
    if world == 1:
        return
    if config.method != "full":
        raise WmdpError(f"relearn.method={config.method} runs as one process ({world} "
                        "processes here): run wmdp audit without torchrun (--device-map auto for "
                        "a model larger than one GPU), or set relearn.method=full")
    last = config.num_texts % config.batch_size or config.batch_size
    if min(config.batch_size, last, config.num_texts) < world:
        raise WmdpError(f"relearn: batches of {config.batch_size} from {config.num_texts} texts "
                        f"(the last of each pass: {min(last, config.num_texts)}) cannot be split "
                        f"over {world} processes: give relearn.batch_size and the last batch at "
                        f"least {world} texts")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_relearn(ctx: AuditContext, config: RelearnConfig) -> dict:
    """Both models, fine-tuned on forget texts and on retain texts; accuracy against steps."""
    check_relearn(config)
    check_parallel(config)
    questions = [it for t in ctx.tasks for it in ctx.items[t]]
    corpora = {"forget": ctx.forget, "retain": ctx.retain}
    texts, mentioned, record = {}, {}, {}
    for kind, cs in corpora.items():
        if not cs:
            raise WmdpError(f"relearn needs {kind} corpora (--{kind}-corpora)")
        texts[kind], flags = select_texts(cs, config.num_texts, questions, config.disjoint,
                                          "relearn.num_texts")
        mentioned[kind] = _split_flags(flags, ctx)
        record[kind] = {"corpora": [c.record() for c in cs], "n": len(texts[kind]),
                        "sha256": sha256_json(texts[kind]),
                        "questions_mentioned": {t: sum(f) for t, f in mentioned[kind].items()}}
    oracle, subjects, ctx = _with_oracle(ctx, config)
    curves: dict[str, dict[str, list[dict]]] = {}
    for role, subject in subjects.items():
        for kind in corpora:
            curves.setdefault(role, {})[kind] = relearn_curve(subject, texts[kind], ctx, config,
                                                              f"{role} on {kind}")
    del subjects  # the audit's two models stay in ctx; the oracle goes
    kept = {t: [i for i, m in enumerate(mentioned["forget"][t]) if not m] for t in ctx.tasks}
    chosen = {f"{r}_{k}": choose_step(curves[r][k], kept, ctx.seed)
              for r in curves for k in corpora}
    tasks: dict[str, Any] = {}
    recovery: dict[str, Any] = {}
    for t in ctx.tasks:
        keep = kept[t]
        tasks[t] = {"steps": [p["step"] for p in curves["base"]["forget"]],
                    "n": len(ctx.items[t]), "n_unmentioned": len(keep)}
        for role in curves:
            for kind, curve in curves[role].items():
                tasks[t][f"{role}_{kind}"] = {
                    "acc": [_mean(p["correct"][t]) for p in curve],
                    "acc_unmentioned": [_mean([p["correct"][t][i] for i in keep]) for p in curve],
                    "loss": [p["loss"] for p in curve]}
        at = {f"{r}_{k}": chosen[f"{r}_{k}"]["by_task"][t] for r in curves for k in corpora}
        recovery[t] = recovery_entry(ctx, t, at["unlearned_forget"], at["base_forget"], keep)
        recovery[t]["attacked_in_sample"] = chosen["unlearned_forget"]["in_sample_by_task"][t]
        each = chosen["unlearned_forget"]["each_by_task"][t]
        if each:  # the recovered share's interval: the same resampled questions for both models
            plain = {r: [ctx.reference[r][t][i] for i in keep] for r in ("unlearned", "base")}
            recovery[t]["share_ci95"] = list(share_ci(each, plain["unlearned"], plain["base"],
                                                      seed=ctx.seed))
        if "oracle" in curves:  # its own plain accuracy on the same questions, and attacked
            recovery[t].update(oracle_plain=ctx.plain_acc("oracle", t, keep),
                               oracle_attacked=at["oracle_forget"],
                               oracle_attacked_control=at["oracle_retain"])
        recovery[t].update(attacked_control=at["unlearned_retain"],
                           base_attacked_control=at["base_retain"],
                           questions=f"the {len(keep)} of {len(ctx.items[t])} questions no chosen "
                                     f"forget text names; the step: "
                                     f"{chosen['unlearned_forget']['how']}, of the evaluated "
                                     f"steps {tasks[t]['steps']}")
    selection = {k: {key: v[key] for key in ("steps", "in_sample_step", "how")}
                 for k, v in chosen.items()}
    return {"texts": record, "tasks": tasks, "recovery": recovery, "oracle": oracle,
            "selection": selection}


def choose_step(curve: list[dict], kept: dict[str, list[int]], seed: int) -> dict:
    """One step for every task, chosen apart from what it reports: the questions of all tasks
    (those no chosen text names) pooled and halved; the step with the highest accuracy on one
    half reports the other, halves swapped (`wmdp.stats.cross_fit_best`). Per task: the accuracy
    of its questions, each under the step chosen without it, and at the in-sample best step."""
    pairs = [(t, i) for t, idx in kept.items() for i in idx]
    if not pairs:
        nan = {t: float("nan") for t in kept}
        return {"steps": [], "in_sample_step": None, "by_task": nan, "in_sample_by_task": nan,
                "each_by_task": {t: [] for t in kept}, "how": "no question counted"}
    scores = np.array([[p["correct"][t][i] for t, i in pairs] for p in curve], dtype=float)
    if len(pairs) < 2:  # nothing to split: the in-sample choice, said so
        best = int(np.argmax(scores.mean(axis=1)))
        per = {t: float(scores[best, 0]) if kept[t] else float("nan") for t in kept}
        return {"steps": [curve[best]["step"]], "in_sample_step": curve[best]["step"],
                "by_task": per, "in_sample_by_task": per,
                "each_by_task": {t: [per[t]] if kept[t] else [] for t in kept},
                "how": "chosen on its only question (in sample: nothing to split)"}
    fit = cross_fit_best(scores, seed=seed)
    each = reported(scores, fit)
    owner = np.array([t for t, _ in pairs])
    by_task = {t: float(each[owner == t].mean()) if kept[t] else float("nan") for t in kept}
    ins = {t: float(scores[fit.in_sample_choice, owner == t].mean()) if kept[t] else float("nan")
           for t in kept}
    return {"steps": [curve[c]["step"] for c in fit.choices],
            "in_sample_step": curve[fit.in_sample_choice]["step"], "by_task": by_task,
            "in_sample_by_task": ins,
            "each_by_task": {t: each[owner == t].tolist() for t in kept},
            "how": fit.how + " (one step for all tasks)"}


def _with_oracle(ctx: AuditContext,
                 config: RelearnConfig) -> tuple[dict, dict[str, Subject], AuditContext]:
    """The record of the oracle (`relearn.oracle`), the subjects to relearn (the audit's two,
    and the oracle where there is one), and the context with its plain accuracy as a reference.
    One process only: under torchrun it is left out, and the record says so."""
    found = audit_oracle(ctx, config)
    if found is None:
        return {"source": None}, dict(ctx.subjects), ctx
    if rank_world()[1] > 1:
        return ({"source": None, "left_out": f"{found}: the oracle relearns as one process only "
                 "(run the audit without torchrun to see it)"}, dict(ctx.subjects), ctx)
    model, tok = load_oracle(ctx, found)
    plain = task_accuracy(model, tok, ctx.tasks, ctx.items, ctx.style.name, ctx.batch_size)
    ctx = replace(ctx, reference={**ctx.reference,
                                  "oracle": {t: f["correct"] for t, f in plain.items()}})
    return {"source": found}, {**ctx.subjects, "oracle": Subject("oracle", model, tok)}, ctx


def _split_flags(flags: list[bool], ctx: AuditContext) -> dict[str, list[bool]]:
    out, k = {}, 0
    for t in ctx.tasks:
        out[t] = flags[k:k + len(ctx.items[t])]
        k += len(ctx.items[t])
    return out

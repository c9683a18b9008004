"""Linear probes: is the answer still written in the activations, though the model won't say it?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks probe --output DIR

For each question, the residual stream after each chosen decoder block at the last prompt
position (the token before the answer), one forward per batch of questions. Two probes:

- letter (the WMDP paper's): multinomial logistic regression from the hidden state to the
  correct letter A-D, for letter-format tasks (the choices are in the prompt);
- content (cloze tasks, whose models may never have learned letters): ridge regression from the
  hidden state at the end of the question to the mean input embedding of the correct choice's
  text, scored by picking the nearest (cosine) of the question's four choices.

Both are k-fold cross-validated with a fixed seed; the accuracy is over every out-of-fold
prediction, with a 95% Wilson interval. Beside it: the chance level (the majority letter's
frequency, or 1/4), control probes fitted on shuffled answers (the empirical chance level: it
also counts the answer priors a probe can learn from the question's wording, such as the
value an attribute most often takes, which lifts it well above 1/4 on small question sets),
and the probe trained on the base model's activations applied to the unlearned model's (same
folds). Tasks probed the same way share one probe by default (`pool_tasks`): more training
questions, figures still reported per task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wmdp.audit.common import (AuditContext, Subject, batches_by_length, recovery_entry,
                               resolve_layers, right_padded, wilson_interval)
from wmdp.layers import read_layers
from wmdp.data.mcq import MCQItem
from wmdp.errors import WmdpError
from wmdp.models import input_device, model_max_length
from wmdp.scoring import Request, encode_requests, initial_batch_size, is_oom
from wmdp.tasks import Task, build_prompt

KINDS = ("auto", "letter", "content")


@dataclass
class ProbeConfig:
    """Probe settings; defaults suit a few hundred questions."""

    layers: list[int] | None = None   # decoder blocks to probe (negative: from the end); None: all
    folds: int = 5                    # k of the k-fold cross-validation
    kind: str = "auto"                # letter, content, or auto (letter for letter tasks, content for cloze)
    C: float = 1.0                    # inverse L2 strength of the logistic regression (scikit-learn's C)
    ridge_alpha: float = 10.0         # L2 strength of the content probe's ridge regression
    control_shuffles: int = 3         # control probes fitted on shuffled answers (0: none)
    pool_tasks: bool = True           # one probe over all audited tasks of a kind (more data)


def probe_kind(task: Task, kind: str) -> str:
    if kind not in KINDS:
        raise WmdpError(f"probe.kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "auto":
        return "letter" if task.format == "letter" else "content"
    return kind


@torch.no_grad()
def question_states(subject: Subject, contexts: list[str], layer_ids: list[int],
                    add_special_tokens: bool | None, batch_size: int | str = "auto",
                    progress: bool | str = False) -> np.ndarray:
    """(n, L, d) float32: each block's output at each context's last token."""
    model, tok = subject.model, subject.tokenizer
    max_length = model_max_length(model, tok)
    rows = [ids[-max_length:] for ids, _ in
            encode_requests(tok, [Request(c, ()) for c in contexts], add_special_tokens)]
    out: np.ndarray | None = None
    bs = initial_batch_size(batch_size, model)
    bar = tqdm(total=len(rows), desc=progress or "states", disable=not progress, leave=False)
    def states(idx: list[int]) -> np.ndarray:  # (B, L, d); halves a batch that runs out of memory
        try:
            ids = right_padded([rows[i] for i in idx], input_device(model))
            last = torch.tensor([len(rows[i]) - 1 for i in idx])

            def at_last(h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, d)
                return h[torch.arange(len(idx), device=h.device), last.to(h.device)].float().cpu()

            got = read_layers(model, {"input_ids": ids}, layer_ids, at_last)
            return torch.stack([got[i] for i in layer_ids], dim=1).numpy()
        except RuntimeError as e:
            if not is_oom(e) or len(idx) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(idx) // 2
            return np.concatenate([states(idx[:half]), states(idx[half:])])

    for idx in batches_by_length(rows, bs):
        block = states(idx)
        if out is None:
            out = np.zeros((len(rows), len(layer_ids), block.shape[-1]), dtype=np.float32)
        out[idx] = block
        bar.update(len(idx))
    bar.close()
    assert out is not None
    return out


@torch.no_grad()
def choice_embeddings(subject: Subject, items: list[MCQItem]) -> np.ndarray:
    """(n, 4, d_emb): the mean input embedding of each choice's text (with its leading space)."""
    tok, emb = subject.tokenizer, subject.model.get_input_embeddings().weight
    texts = [f" {c}" for it in items for c in it.choices]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    vecs = torch.stack([emb[torch.tensor(i or [0], device=emb.device)].float().mean(0)
                        for i in ids]).cpu().numpy()
    return vecs.reshape(len(items), len(items[0].choices), -1)


def _folds(n: int, k: int, seed: int, labels: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if n < k or k < 2:
        raise WmdpError(f"probe: {n} questions cannot be split into probe.folds={k} folds "
                        "(need at least 2 folds and one question per fold)")
    if labels is not None and np.bincount(labels).min(initial=n) >= k \
            and len(np.unique(labels)) > 1:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), labels))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n)))


def _letter_fit(x: np.ndarray, y: np.ndarray, config: ProbeConfig) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=2000)).fit(x, y)


def _content_fit(x: np.ndarray, y: np.ndarray, config: ProbeConfig) -> Any:
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=config.ridge_alpha)).fit(x, y)


def _nearest_choice(pred: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """Index of the choice embedding (n, 4, d) most cosine-similar to each prediction (n, d)."""
    p = pred / (np.linalg.norm(pred, axis=-1, keepdims=True) + 1e-12)
    c = choices / (np.linalg.norm(choices, axis=-1, keepdims=True) + 1e-12)
    return np.einsum("nd,nkd->nk", p, c).argmax(-1)


def cross_validated(kind: str, x: dict[str, np.ndarray], answers: np.ndarray,
                    choices: dict[str, np.ndarray], config: ProbeConfig, seed: int,
                    transfer: tuple[str, str] | None = None,
                    shuffle: bool = False) -> dict[str, np.ndarray]:
    """Out-of-fold correctness (n,) of a probe fitted on each role's features `x[role]` (n, d).

    `transfer=(src, dst)` adds key "src->dst": the fold's probe fitted on `src` predicting `dst`.
    `shuffle`: fit on answers permuted across questions (the control), scored against the true
    ones: whatever it finds is the answers' prior, not the question's own fact.
    """
    n = len(answers)
    folds = _folds(n, config.folds, seed, answers if kind == "letter" else None)
    # the control pairs each question with another question's answer (a permutation)
    perm = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    out = {k: np.zeros(n) for k in [*x, *([f"{transfer[0]}->{transfer[1]}"] if transfer else [])]}
    # the content probe's target: the embedding of each question's (permuted) answer, (n, d_emb)
    target = {role: choices[role][np.arange(n), answers][perm] for role in x} \
        if kind == "content" else {}
    for train, test in folds:
        for role in x:
            if kind == "letter":
                fit = _letter_fit(x[role][train], answers[perm][train], config)
                preds = {role: fit.predict(x[role][test])}
                if transfer and role == transfer[0]:
                    preds[f"{role}->{transfer[1]}"] = fit.predict(x[transfer[1]][test])
            else:
                fit = _content_fit(x[role][train], target[role][train], config)
                preds = {role: _nearest_choice(fit.predict(x[role][test]), choices[role][test])}
                if transfer and role == transfer[0]:
                    preds[f"{role}->{transfer[1]}"] = _nearest_choice(
                        fit.predict(x[transfer[1]][test]), choices[role][test])
            for key, p in preds.items():
                out[key][test] = (p == answers[test]).astype(float)
    return out


def _curve(correct: list[np.ndarray]) -> dict:
    """Accuracy per layer with its 95% interval, from per-layer correctness arrays."""
    accs = [float(c.mean()) for c in correct]
    n = len(correct[0])
    return {"acc": accs, "ci95": [list(wilson_interval(a, n)) for a in accs]}


def _features(ctx: AuditContext, names: list[str], kind: str, layer_ids: list[int]) -> tuple:
    """Per role: hidden states (N, L, d) and, for the content probe, choice embeddings."""
    contexts, items = [], []
    for name in names:
        task = ctx.tasks[name]
        if kind == "letter" and task.format != "letter":  # the letter probe needs the choices shown
            task = replace(task, format="letter", description=None)
        contexts += [build_prompt(it, task, ctx.style)[0] for it in ctx.items[name]]
        items += ctx.items[name]
    feats, choices = {}, {}
    for role, subject in ctx.subjects.items():
        feats[role] = question_states(subject, contexts, layer_ids, ctx.add_special_tokens(role),
                                      ctx.batch_size, ctx.progress and f"probe states ({role})")
        if kind == "content":
            choices[role] = choice_embeddings(subject, items)
    return feats, choices, np.array([it.answer for it in items])


def probe_group(ctx: AuditContext, names: list[str], kind: str, config: ProbeConfig) -> dict:
    """One probe per layer over the questions of `names`; figures per task and pooled."""
    layer_ids = resolve_layers(ctx.subjects["base"].model, config.layers)
    feats, choices, answers = _features(ctx, names, kind, layer_ids)
    correct: dict[str, list[np.ndarray]] = {}
    control: dict[str, list[np.ndarray]] = {}
    for j in tqdm(range(len(layer_ids)), desc=f"probe ({kind})", disable=not ctx.progress,
                  leave=False):
        x = {role: f[:, j] for role, f in feats.items()}
        for key, c in cross_validated(kind, x, answers, choices, config, ctx.seed,
                                      transfer=("base", "unlearned")).items():
            correct.setdefault(key, []).append(c)
        shuffled = [cross_validated(kind, x, answers, choices, config, ctx.seed + 1 + r,
                                    shuffle=True) for r in range(config.control_shuffles)]
        for key in x if shuffled else ():
            control.setdefault(key, []).append(np.mean([s[key] for s in shuffled], axis=0))
    spans, start = {}, 0
    for name in names:
        spans[name] = slice(start, start + len(ctx.items[name]))
        start += len(ctx.items[name])
    if len(names) > 1:
        spans["pooled"] = slice(0, start)
    return {name: _figures(kind, layer_ids, answers[span], config,
                           {k: [c[span] for c in v] for k, v in correct.items()},
                           {k: [c[span] for c in v] for k, v in control.items()})
            for name, span in spans.items()}


def _figures(kind: str, layer_ids: list[int], answers: np.ndarray, config: ProbeConfig,
             correct: dict[str, list[np.ndarray]], control: dict[str, list[np.ndarray]]) -> dict:
    chance = 0.25 if kind == "content" else \
        float(max(0.25, np.bincount(answers, minlength=4).max() / len(answers)))
    out: dict[str, Any] = {"kind": kind, "layers": layer_ids, "n": len(answers),
                           "folds": config.folds, "chance": chance}
    for key, curve in correct.items():
        out[key.replace("->", "_to_")] = _curve(curve)
    for role, curve in control.items():
        out[role]["control_acc"] = [float(c.mean()) for c in curve]
    # the empirical chance level: shuffled-answer probes, averaged over layers and both models
    out["control"] = float(np.mean([a for r in control for a in out[r]["control_acc"]])) \
        if control else None
    for role in ("base", "unlearned"):
        accs = out[role]["acc"]
        out[role]["best_layer"] = layer_ids[int(np.argmax(accs))]
        out[role]["best_acc"] = float(max(accs))
    return out


def run_probe(ctx: AuditContext, config: ProbeConfig) -> dict:
    """The probe attack on every audited task; `recovery` holds the best-layer accuracies.

    With `pool_tasks`, tasks probed the same way share one probe (more training questions);
    the figures are still given per task, and pooled under "pooled".
    """
    kinds: dict[str, list[str]] = {}
    for name, task in ctx.tasks.items():
        kinds.setdefault(probe_kind(task, config.kind), []).append(name)
    groups = list(kinds.items()) if config.pool_tasks else \
        [(k, [n]) for k, names in kinds.items() for n in names]
    tasks: dict[str, Any] = {}
    pooled: dict[str, Any] = {}
    for kind, names in groups:
        got = probe_group(ctx, names, kind, config)
        if "pooled" in got:
            pooled[kind] = {"tasks": names, **got.pop("pooled")}
        tasks.update(got)
    recovery = {}
    for name in ctx.tasks:
        r = tasks[name]
        recovery[name] = recovery_entry(ctx, name, r["unlearned"]["best_acc"],
                                        r["base"]["best_acc"])
        recovery[name].update(chance=r["chance"], control=r["control"])
    return {"tasks": tasks, "pooled": pooled, "recovery": recovery}

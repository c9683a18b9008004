"""Direction ablation: does removing one direction from the residual stream undo the unlearning?

    wmdp audit --model UNLEARNED --base BASE --tasks wmdp_bio --attacks ablation \
        --forget-corpora cais/wmdp-bio-forget-corpus --retain-corpora wikitext --output DIR

RMU trains the model to map forget-domain text to one large vector at block `layer_id`; Łucki et
al. 2024 ("An adversarial perspective on machine unlearning for AI safety") undo it as refusal
is undone: by projecting one direction out of the residual stream. Per model, the direction d is
the difference of the mean output of the block on forget texts and on retain texts (every real
token), unit-normalised, from that model's own activations; with several forget corpora, one
direction per corpus (RMU steers each to its own control vector), orthonormalised, all removed. The forget texts are chosen as
relearning chooses them (texts that never name an audited question's entity first; questions a
chosen text does name are left out of the recovery figure), so d is fitted without the scored
questions. Forward hooks then replace the output h of that block and of every block after it by
h - (h.d) d (no weight changes; the hooks are removed after), and the audited questions are
scored by the evaluator. The control: the same hooks with a random unit direction (seeded), so a
reader sees that what comes back comes from the direction, not from the hooking.

Which block: `layer` if set; else each of `layers` if set; else the unlearning record's
`layer_id` (`unlearn_config.json` beside the unlearned model: RMU and its variants steer there);
else every block. Where several blocks are tried, the best one is reported, chosen separately
for the direction and for the control on the questions scored (the attacker picks the best; the
record says so). Beside it, per block, the unlearned model's forget/retain activation-norm ratio
with each direction removed: back at the base model's level, nothing but that one direction
carries the forgetting.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from wmdp.audit.activations import ratios, token_means
from wmdp.audit.common import (AuditContext, Subject, interleaved, pooled, recovery_entry,
                               resolve_layers, task_accuracy)
from wmdp.audit.attack import select_texts
from wmdp.errors import WmdpError
from wmdp.io import read_json, sha256_json
from wmdp.models import decoder_layers
from wmdp.unlearn.loop import FINAL_RECORD

KINDS = ("direction", "control")


@dataclass
class AblationConfig:
    """Direction-ablation settings; defaults suit the sandbox on a CPU."""

    num_texts: int = 16               # forget texts the direction is fitted on, and as many retain
    max_length: int = 256             # tokens per text
    batch_size: int = 8               # texts per forward when fitting
    layer: int | None = None          # the block to ablate from; None: see `layers`
    layers: list[int] | None = None   # blocks to try, the best reported; None: the unlearning
                                      # record's layer_id, else every block
    disjoint: bool = True             # prefer forget texts that never name an audited question
    per_corpus: bool = True           # one direction per forget corpus (RMU steers each corpus to
                                      # its own control vector); False: one for all


def project_out(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """h - (h.d) d for a unit direction d (d,), over the last axis of h (..., d); for k
    orthonormal directions (k, d), h minus its projection on their span. In float32."""
    basis = direction.to(h.device, torch.float32).reshape(-1, h.shape[-1])  # (k, d)
    x = h.float()
    return (x - (x @ basis.T) @ basis).to(h.dtype)


@contextmanager
def ablated(model: nn.Module, direction: torch.Tensor, first: int) -> Iterator[None]:
    """Inside the `with`, `direction` is projected out of the output of decoder block `first` and
    of every block after it (forward hooks, removed on exit; the weights are never touched)."""
    layers = decoder_layers(model)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            return (project_out(output[0], direction), *output[1:])
        return project_out(output, direction)

    handles = [layers[i].register_forward_hook(hook) for i in range(first, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """(k, d) -> (k, d): orthonormal rows spanning the same space (one row: itself, unit)."""
    if len(vectors) == 1:
        return unit(vectors[0])[None]
    return torch.linalg.qr(vectors.T.double())[0].T.to(vectors.dtype)


def recorded_layer(model: nn.Module) -> tuple[int | None, str | None]:
    """The `layer_id` and method of the unlearning record beside the model's files, if any."""
    source = getattr(model.config, "_name_or_path", "") or ""
    path = Path(str(source)) / FINAL_RECORD
    if not source or not path.is_file():
        return None, None
    record = read_json(path)
    layer = (record.get("hparams") or {}).get("layer_id")
    return (layer if isinstance(layer, int) else None), record.get("method")


def choose_layers(model: nn.Module, config: AblationConfig) -> tuple[list[int], str]:
    """The blocks to try and how they were chosen (a sentence for the record)."""
    if config.layer is not None:
        return resolve_layers(model, [config.layer]), "set by ablation.layer"
    if config.layers is not None:
        return resolve_layers(model, config.layers), "the best of ablation.layers"
    layer, method = recorded_layer(model)
    if layer is not None:
        return (resolve_layers(model, [layer]),
                f"the {method} run's layer_id, from its {FINAL_RECORD}")
    return resolve_layers(model, None), "every block (no layer_id recorded beside the model)"


def fit_means(subject: Subject, texts: dict[str, list[str]], config: AblationConfig,
              progress: bool | str = False) -> dict[str, torch.Tensor]:
    """Per kind of text, (L, d+1) over every block: the mean output, then the mean norm."""
    n = len(decoder_layers(subject.model))
    return {kind: token_means(subject, t, list(range(n)),
                              lambda h: torch.cat([h, h.norm(dim=-1, keepdim=True)], -1),
                              config.max_length, config.batch_size,
                              progress and f"{progress} {kind}")
            for kind, t in texts.items() if t}


def _norm_ratio(subject: Subject, texts: dict[str, list[str]], config: AblationConfig,
                direction: torch.Tensor, layer: int, progress: bool | str) -> list[float]:
    """Per block: forget norm / retain norm, with `direction` ablated from block `layer` on."""
    n = len(decoder_layers(subject.model))
    norms = {}
    for kind in ("forget", "retain"):
        with ablated(subject.model, direction, layer):
            norms[kind] = token_means(subject, texts[kind], list(range(n)),
                                      lambda h: h.norm(dim=-1),
                                      config.max_length, config.batch_size, progress).tolist()
    return ratios(norms["forget"], norms["retain"])


def _texts(ctx: AuditContext, config: AblationConfig) -> tuple[dict, dict[str, list[int]]]:
    """Forget and retain texts, and per task the questions no chosen forget text names."""
    for kind, corpora in (("forget", ctx.forget), ("retain", ctx.retain)):
        if not corpora:
            raise WmdpError(f"ablation needs {kind} corpora (--{kind}-corpora)")
    questions = [it for t in ctx.tasks for it in ctx.items[t]]
    forget, mentioned = select_texts(ctx.forget, config.num_texts, questions, config.disjoint,
                                     "ablation.num_texts")
    retain = interleaved(ctx.retain, config.num_texts)[:config.num_texts]
    keep, k = {}, 0
    for t in ctx.tasks:
        flags = mentioned[k:k + len(ctx.items[t])]
        keep[t] = [i for i, m in enumerate(flags) if not m]
        k += len(flags)
    if not any(keep.values()):
        raise WmdpError(f"ablation: the {len(forget)} chosen forget texts name every audited "
                        "question; lower ablation.num_texts")
    out = {"forget": forget, "retain": retain}
    if config.per_corpus and len(ctx.forget) > 1:  # each corpus's own share of the chosen texts
        for i, corpus in enumerate(ctx.forget):
            own = set(corpus.texts)
            out[f"forget:{i}"] = [t for t in forget if t in own]
    return out, keep


def _scores(ctx: AuditContext, subject: Subject, direction: torch.Tensor,
            layer: int) -> dict[str, list[float]]:
    """Per task, per question 0/1, with `direction` ablated from block `layer` on."""
    with ablated(subject.model, direction, layer):
        figures = task_accuracy(subject.model, subject.tokenizer, ctx.tasks, ctx.items,
                                ctx.style.name, ctx.batch_size)
    return {t: f["correct"] for t, f in figures.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_ablation(ctx: AuditContext, config: AblationConfig) -> dict:
    """Both models with their own forget-vs-retain direction(s) projected out, and with as many
    random ones (the control); recovery at the best block tried."""
    if config.num_texts < 1 or config.batch_size < 1 or config.max_length < 1:
        raise WmdpError("ablation: num_texts, batch_size and max_length must be positive")
    texts, keep = _texts(ctx, config)
    layer_ids, selection = choose_layers(ctx.subjects["unlearned"].model, config)
    hidden = ctx.subjects["base"].model.get_input_embeddings().weight.shape[-1]
    forget_kinds = [k for k in texts if k.startswith("forget:") and texts[k]] or ["forget"]
    gen = torch.Generator().manual_seed(ctx.seed)  # as many random directions as real ones
    control = orthonormal(torch.randn(len(forget_kinds), hidden, generator=gen,
                                      dtype=torch.float64)).float()
    fits, directions, acc = {}, {}, {}
    for role, subject in ctx.subjects.items():
        fits[role] = fit_means(subject, texts, config, ctx.progress and f"ablation fit ({role})")
        diffs = torch.stack([fits[role][k][:, :-1] - fits[role]["retain"][:, :-1]
                             for k in forget_kinds], 1)  # (L, k, d)
        directions[role] = {j: orthonormal(diffs[j]).float() for j in layer_ids}
        for j in layer_ids:
            for kind, d in (("direction", directions[role][j]), ("control", control)):
                acc[(role, kind, j)] = _scores(ctx, subject, d, j)
    return _record(ctx, config, texts, keep, layer_ids, selection, fits, directions, control,
                   acc)


def _best_layer(acc: dict, role: str, kind: str, layer_ids: list[int],
                keep: dict[str, list[int]]) -> int:
    """The block whose ablation gives the highest accuracy over the recovery questions."""
    def score(j: int) -> float:
        per_task = {t: {"n": len(idx), "acc": _mean([acc[(role, kind, j)][t][i] for i in idx])}
                    for t, idx in keep.items() if idx}
        return pooled(per_task, "acc") or 0.0
    return max(layer_ids, key=lambda j: (score(j), -j))


def _record(ctx: AuditContext, config: AblationConfig, texts: dict, keep: dict,
            layer_ids: list[int], selection: str, fits: dict, directions: dict,
            control: torch.Tensor, acc: dict) -> dict:
    best = {(r, k): _best_layer(acc, r, k, layer_ids, keep) for r in ctx.subjects for k in KINDS}
    chosen = best[("unlearned", "direction")]
    out: dict[str, Any] = {
        "texts": {"forget": {"corpora": [c.record() for c in ctx.forget],
                             "n": len(texts["forget"]), "sha256": sha256_json(texts["forget"]),
                             "n_per_corpus": [len(texts[k]) for k in texts
                                              if k.startswith("forget:")]},
                  "retain": {"corpora": [c.record() for c in ctx.retain],
                             "n": len(texts["retain"]), "sha256": sha256_json(texts["retain"])}},
        "layers": layer_ids, "selection": selection, "rank": len(control),
        "best_layer": {f"{r}_{k}": best[(r, k)] for r in ctx.subjects for k in KINDS},
        "direction": _direction_record(fits, directions, control, layer_ids),
    }
    out["norm_ratio"] = {"layers": list(range(len(decoder_layers(ctx.subjects["base"].model)))),
                         "ablated_from": chosen}
    for role, subject in ctx.subjects.items():
        out["norm_ratio"][role] = ratios(fits[role]["forget"][:, -1].tolist(),
                                         fits[role]["retain"][:, -1].tolist())
    unlearned = ctx.subjects["unlearned"]
    for kind, d in (("direction", directions["unlearned"][chosen]), ("control", control)):
        out["norm_ratio"][f"unlearned_{kind}"] = _norm_ratio(
            unlearned, texts, config, d, chosen, ctx.progress and f"ablation norms ({kind})")
    out["tasks"], out["recovery"] = {}, {}
    for t in ctx.tasks:
        idx = keep[t]
        out["tasks"][t] = {"n": len(ctx.items[t]), "n_unmentioned": len(idx)}
        for (role, kind, j), correct in acc.items():
            entry = out["tasks"][t].setdefault(f"{role}_{kind}", {"acc": [], "acc_unmentioned": []})
            entry["acc"].append(_mean(correct[t]))
            entry["acc_unmentioned"].append(_mean([correct[t][i] for i in idx]))
        at = {(r, k): _mean([acc[(r, k, best[(r, k)])][t][i] for i in idx])
              for r in ctx.subjects for k in KINDS}
        out["recovery"][t] = recovery_entry(ctx, t, at[("unlearned", "direction")],
                                            at[("base", "direction")], idx)
        out["recovery"][t].update(
            attacked_control=at[("unlearned", "control")],
            base_attacked_control=at[("base", "control")], layer=chosen,
            questions=f"the {len(idx)} of {len(ctx.items[t])} questions no forget text the "
                      f"direction was fitted on names; block: {selection}")
    return out


def _direction_record(fits: dict, directions: dict, control: torch.Tensor,
                      layer_ids: list[int]) -> dict:
    """Per block tried: the length of each model's forget and retain mean inside its direction(s),
    and how much the two models' directions, and each with the control, overlap (the root mean
    square of the cosines between their orthonormal rows: 1 the same span, ~0 unrelated)."""
    def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() @ b.double().T).pow(2).sum().div(len(a)).sqrt())

    out: dict[str, Any] = {}
    for j in layer_ids:
        entry: dict[str, Any] = {}
        for role, fit in fits.items():
            basis = directions[role][j].double()
            entry[role] = {"rank": len(basis),
                           "forget_projection": float((basis @ fit["forget"][j, :-1]).norm()),
                           "retain_projection": float((basis @ fit["retain"][j, :-1]).norm()),
                           "mean_norm_forget": float(fit["forget"][j, -1]),
                           "overlap_with_control": overlap(basis, control)}
        if len(directions) == 2:
            entry["overlap_base_unlearned"] = overlap(directions["base"][j],
                                                      directions["unlearned"][j])
        out[str(j)] = entry
    return out

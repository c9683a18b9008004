"""The relearning protocol as an attack of `wmdp audit` (opt-in: many fine-tuning runs).

    wmdp audit --model runs/rmu/unlearned --base sandbox/model --data-dir sandbox/data \
        --tasks sandbox_bio,sandbox_cyber --forget-corpora ... --retain-corpora ... \
        --attacks relearn,protocol --set protocol.seeds=[0,1,2] --output runs/audit
    wmdp run --set audit.protocol=true --set sandbox.oracle=true      # in the pipeline

The audit's base and unlearned models, forget questions and forget corpora are the protocol's;
its retain corpora are the control data (less any text of the out-of-domain corpora: a
sandbox's retain.jsonl holds its far domain too) and, for the texts no run trains on, the
retain perplexity measured after each attack. Found unless set:
- the oracle: `<build>/oracle/model` beside a sandbox base model (`<build>/model`), as
  `wmdp sandbox build` leaves it (`protocol.oracle` names another; "none": without one);
- the general tasks (ability after the attack) and the out-of-domain text: a sandbox's general
  domains and its far domain (`protocol.general_tasks`, `protocol.general_corpora`).
The oracle is loaded as the audit's two models are (its ModelSpec: dtype, device, device_map,
trust_remote_code), and dropped after the grid. One process: under torchrun the audit refuses
the protocol (its grid's loss and LoRA runs are one-process; `relearn` runs data-parallel).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from wmdp.audit.common import AuditContext
from wmdp.audit.protocol import (SANDBOX_GENERAL_CORPUS, SANDBOX_GENERAL_TASKS, ProtocolConfig,
                                 ProtocolInputs, check_grid, run_protocol)
from wmdp.errors import WmdpError
from wmdp.robustness import share_text

DATA_TEXT = {"forget": "forget texts", "retain": "retain texts (the control)",
             "general": "out-of-domain text"}


def find_oracle(config: ProtocolConfig | Any, base_source: str) -> str | None:
    """The oracle's directory: the one set (`config.oracle`; "none": without one), or a sandbox
    build's beside the base model."""
    from wmdp.sandbox.oracle import oracle_model_dir

    if config.oracle == "none":
        return None
    if config.oracle:
        return config.oracle
    if not base_source:  # a model built in memory: no build directory to look in
        return None
    beside = oracle_model_dir(Path(base_source).parent)
    return str(beside) if (beside / "config.json").is_file() else None


def audit_oracle(ctx: AuditContext, config: ProtocolConfig | Any) -> str | None:
    """`find_oracle` for the audit's base model."""
    base = ctx.subjects["base"].model
    return find_oracle(config, str(getattr(base, "name_or_path", "") or ""))


def load_oracle(ctx: AuditContext, oracle: str) -> tuple[Any, Any]:
    """(model, tokenizer), loaded as the audit's two models are (a context built in code: the
    base model's dtype and device)."""
    from wmdp.models import load_model

    if ctx.model_spec is not None:
        return ctx.model_spec.model_spec(model=oracle, revision=None).load_model()
    param = next(ctx.subjects["base"].model.parameters())
    return load_model(oracle, dtype=str(param.dtype).removeprefix("torch."),
                      device=str(param.device))


def _data_dir(ctx: AuditContext) -> Path | None:
    """The directory of the audited questions' files (a sandbox's data/, or the user's)."""
    paths = [t.path for t in ctx.tasks.values() if t.path is not None]
    return Path(paths[0]).parent if paths else None


def _control(retain: list, far: list) -> list:
    """The control data: the retain corpora without any text of the out-of-domain corpora (a
    sandbox's retain.jsonl holds its far domain's prose too), so the two attacks stay apart."""
    from wmdp.data.corpus import Corpus

    drop = {t for c in far for t in c.texts}
    kept = [c if drop.isdisjoint(c.texts) else
            Corpus(c.name, [t for t in c.texts if t not in drop],
                   f"{c.source} without the out-of-domain corpora's texts") for c in retain]
    return [c for c in kept if c.texts]  # none left: the grid's check names the missing data


def audit_inputs(ctx: AuditContext, config: ProtocolConfig) -> tuple[ProtocolInputs, dict]:
    """The protocol's inputs from the audit's context, and where each added part came from."""
    from wmdp.data.corpus import load_corpus
    from wmdp.tasks import Registry

    data_dir = _data_dir(ctx)
    sandbox = data_dir is not None and (data_dir / SANDBOX_GENERAL_CORPUS).is_file()
    names = config.general_tasks or (SANDBOX_GENERAL_TASKS if sandbox else [])
    if not names:
        raise WmdpError("protocol.general_tasks names no task: the protocol reports general "
                        "accuracy after each attack (a broken model can look robust); e.g. "
                        "--set protocol.general_tasks=[mmlu_college_biology]")
    reg = Registry.build(data_dir)
    general = {t: reg.tasks[t] for t in reg.expand(names)}
    specs = config.general_corpora or ([str(data_dir / SANDBOX_GENERAL_CORPUS)] if sandbox else [])
    if "general" in config.data and not specs:
        raise WmdpError("protocol.general_corpora names no corpus: the general attack data is "
                        "out-of-domain text (e.g. --set protocol.general_corpora=[wikitext]), or "
                        "leave it out (--set protocol.data=[forget,retain])")
    models = {r: (s.model, s.tokenizer) for r, s in ctx.subjects.items()}
    oracle = audit_oracle(ctx, config)
    if oracle is not None:
        models["oracle"] = load_oracle(ctx, oracle)
    items = {**ctx.items, **{t: task.load_items() for t, task in general.items()}}
    far = [load_corpus(s) for s in specs] if "general" in config.data else []
    corpora = {"forget": ctx.forget, "retain": _control(ctx.retain, far), "general": far}
    ppl = [t for c in ctx.retain for t in reversed(c.texts)]  # far from the texts runs train on
    inputs = ProtocolInputs(models, dict(ctx.tasks), general, items, corpora, ppl)
    return inputs, {"oracle": oracle, "general_tasks": list(general),
                    "corpora": {k: [c.record() for c in v] for k, v in corpora.items() if v}}


def run_protocol_attack(ctx: AuditContext, config: ProtocolConfig) -> dict:
    """The grid on base, unlearned and (when found) oracle; the record `run_protocol` returns
    with the audit's prompt style and where its inputs came from."""
    check_grid(config)
    inputs, sources = audit_inputs(ctx, config)
    try:
        record = run_protocol(inputs, replace(config, prompt_style=ctx.style.name),
                              progress=ctx.progress)
    finally:
        inputs.models.pop("oracle", None)  # the audit's two models stay; the oracle goes
    return {**record, "sources": sources}


def _figures(model: dict) -> dict[str, Any]:
    """A model's plain accuracy and, per attack data, its worst case and recovered share."""
    out: dict[str, Any] = {"plain": model["plain"]["forget_acc"]}
    for kind, a in model["attacks"].items():
        suffix = "" if kind == "forget" else f"_{kind}"
        out[f"attacked{suffix}"] = a["worst_case"]["forget_acc"]
        out[f"recovered_fraction{suffix}"] = a["recovered_share"]
    return out


def protocol_verdict(result: dict) -> dict:
    """The unlearned model's worst case per attack data as shares of the gap (keys as the other
    attacks' verdicts), the base's and the oracle's beside them, and a sentence."""
    models = result["models"]
    unl, base = _figures(models["unlearned"]), _figures(models["base"])
    oracle = _figures(models["oracle"]) if "oracle" in models else None
    fig = {"n": sum(result["questions"].values()), "base": base["plain"],
           "unlearned": unl["plain"], **{k: v for k, v in unl.items() if k != "plain"},
           **{f"base_{k}": v for k, v in base.items() if k.startswith("attacked")},
           "oracle": oracle}
    kinds = list(models["unlearned"]["attacks"])
    first = models["unlearned"]["attacks"][kinds[0]]["worst_case"]
    fig.update(general_after=first["general_acc"], retain_ppl_after=first["retain_ppl"],
               retain_ppl=models["unlearned"]["plain"].get("retain_ppl"))
    lead, rest = kinds[0], kinds[1:]
    runs = sum(r["data"] == lead for r in models["unlearned"]["runs"])  # the grid on that data

    def at(figures: dict, kind: str) -> str:
        s = "" if kind == "forget" else f"_{kind}"
        share = figures[f"recovered_fraction{s}"]
        return f"{figures[f'attacked{s}']:.2f} (" + (
            "no gap to recover" if share is None else f"{share_text(share)} of the gap") + ")"

    text = (f"the attacker's best of {runs} fine-tuning run{'s' * (runs != 1)} per model on "
            f"{DATA_TEXT[lead]} brings the unlearned model from {unl['plain']:.2f} to "
            f"{at(unl, lead)}, the base model being at {base['plain']:.2f}; ")
    text += "".join(f"on {DATA_TEXT[k]} to {at(unl, k)}; " for k in rest)
    ppl = "" if fig["retain_ppl_after"] is None else \
        f", retain perplexity {fig['retain_ppl_after']:.2f} (plain {fig['retain_ppl']:.2f})"
    text += f"its lowest general accuracy at its worst case {fig['general_after']:.2f}{ppl}. "
    if oracle is not None:
        text += (f"The oracle, never trained on the forget domains, goes from "
                 f"{oracle['plain']:.2f} to {at(oracle, lead)} under the same grid. ")
    else:
        text += "No oracle was found (the floor is not shown). "
    return {**fig, "text": text + f"On the {fig['n']} questions no forget attack text names."}

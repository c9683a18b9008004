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
the protocol (its LoRA runs and its evaluations are one-process; `relearn` runs data-parallel).
Its verdict: `wmdp.audit.verdicts.protocol_verdict`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from wmdp.audit.common import AuditContext
from wmdp.audit.oracle import audit_oracle, load_oracle
from wmdp.audit.protocol import (SANDBOX_GENERAL_CORPUS, SANDBOX_GENERAL_TASKS, ProtocolConfig,
                                 ProtocolInputs, check_grid, run_protocol)
from wmdp.data.corpus import Corpus, load_corpus
from wmdp.errors import WmdpError
from wmdp.tasks import Registry


def _data_dir(ctx: AuditContext) -> Path | None:
    """The directory of the audited questions' files (a sandbox's data/, or the user's)."""
    paths = [t.path for t in ctx.tasks.values() if t.path is not None]
    return Path(paths[0]).parent if paths else None


def control_corpora(retain: list, far: list) -> list:
    """The control data: the retain corpora without any text of the out-of-domain corpora (a
    sandbox's retain.jsonl holds its far domain's prose too), so the two attacks stay apart."""
    drop = {t for c in far for t in c.texts}
    kept = [c if drop.isdisjoint(c.texts) else
            Corpus(c.name, [t for t in c.texts if t not in drop],
                   f"{c.source} without the out-of-domain corpora's texts") for c in retain]
    return [c for c in kept if c.texts]  # none left: the grid's check names the missing data


def audit_inputs(ctx: AuditContext, config: ProtocolConfig) -> tuple[ProtocolInputs, dict]:
    """The protocol's inputs from the audit's context, and where each added part came from."""
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
    corpora = {"forget": ctx.forget, "retain": control_corpora(ctx.retain, far), "general": far}
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

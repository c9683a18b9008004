"""`wmdp audit`: every attack, on the base and the unlearned model, into one directory.

    wmdp audit --model runs/rmu --base sandbox/model --data-dir sandbox/data \
        --tasks sandbox_bio,sandbox_cyber --forget-corpora sandbox/data/forget_bio.jsonl,... \
        --retain-corpora sandbox/data/retain.jsonl --output runs/audit

    record = run_audit(AuditConfig(model=..., base=..., tasks=[...], output="runs/audit"))
    record = run_audit(config, models={"base": (m0, tok), "unlearned": (m1, tok)})  # in memory

The directory: `audit.json` (every figure and its configuration, see `AUDIT_LAYOUT`), one
`<attack>.json` per attack (its part of audit.json), `<attack>.png`, and `verdicts.md`. A rerun
with the same settings skips the attacks already in audit.json; one that names more attacks
runs only the new ones. Settings: defaults (sized for the sandbox on a CPU) < `--preset` <
`--config FILE.yaml` < flags < `--set key=value` (e.g. `--set gcg.steps=100`).

Under torchrun (`torchrun --nproc-per-node N -m wmdp audit --attacks relearn --set
relearn.method=full ...`) the relearning attack runs data-parallel with both models sharded by
FSDP (see `wmdp.audit.relearn`); the other attacks run as one process. Rank 0 alone writes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wmdp.audit.ablation import AblationConfig, run_ablation
from wmdp.audit.activations import ActivationsConfig, run_activations
from wmdp.audit.common import ROLES, AuditContext, Subject, task_accuracy
from wmdp.audit.fewshot import FewshotConfig, run_fewshot
from wmdp.audit.gcg import GCGConfig, run_gcg
from wmdp.audit.plots import PLOTS, plot_attack
from wmdp.audit.mcq_controls import MCQControlsConfig, run_mcq_controls
from wmdp.audit.probe import ProbeConfig, run_probe
from wmdp.audit.protocol import ProtocolConfig, check_grid
from wmdp.audit.protocol_audit import run_protocol_attack
from wmdp.audit.prune import PruneConfig, run_prune
from wmdp.audit.quantize import QuantizeConfig, run_quantize
from wmdp.audit.relearn import RelearnConfig, check_parallel, check_relearn, run_relearn
from wmdp.audit.verdicts import gap_tasks, verdict
from wmdp.config import apply_overrides, from_dict, load_yaml, to_dict
from wmdp.data.corpus import load_corpus
from wmdp.distributed import broadcast, is_main, on_main, rank_world
from wmdp.errors import WmdpError
from wmdp.io import library_versions, prepare_output_dir, read_json, sha256_json, write_json
from wmdp.model_spec import ModelSpec
from wmdp.models import check_model_source, resolve_device
from wmdp.tasks import PROMPT_STYLES, Registry
from wmdp.unlearn.parallel import shard_model

AUDIT = "audit.json"
ATTACKS: dict[str, Callable[[AuditContext, Any], dict]] = {
    "probe": run_probe, "relearn": run_relearn, "gcg": run_gcg, "fewshot": run_fewshot,
    "activations": run_activations, "ablation": run_ablation, "quantize": run_quantize,
    "prune": run_prune, "mcq_controls": run_mcq_controls}
ATTACKS["protocol"] = run_protocol_attack  # the relearning protocol: a grid of fine-tuning runs
OPT_IN = ("protocol", "quantize", "prune", "mcq_controls")  # so they run only when named
NEEDS_CORPORA = ("relearn", "activations", "protocol", "ablation", "prune")
DATA_PARALLEL = ("relearn",)               # the attacks that run under torchrun (FSDP)
AUDIT_LAYOUT = """\
audit.json
  fingerprint, config (every setting), versions, seconds
  models: {base, unlearned}: source, revision, model_type, dtype
  tasks: {task: source, sha256, n, format, topic}
  reference: {base|unlearned: {task: acc, acc_stderr, n, correct (per question 0/1)}}
  attacks: {attack: config, config_sha256, seconds, verdict {pooled figures, text},
            recovery {task: n, base, unlearned, attacked, base_attacked, ...},
            and the attack's own figures (tasks {...} or per-layer lists)}
    (protocol, opt-in: models {base, unlearned, oracle}: plain, runs, attacks {data: worst_case,
     recovered_share, curve}; questions, texts, sources; see wmdp.audit.protocol)
  gap_tasks: tasks the verdicts pool (base above chance, unlearning took >= 0.05 off it)
  verdicts: {attack: text}
  plots: {attack: file name}
"""


@dataclass
class AuditConfig(ModelSpec):
    """Everything that can change an audit's numbers; defaults suit the sandbox on a CPU. The
    model fields are ModelSpec's (`model`, `revision`: the unlearned model; `base` has its own
    source and revision, loaded with the same dtype and device)."""

    model: str = ""                   # the unlearned model: hub id or local directory
    base: str = ""                    # the model before unlearning
    output: str = ""                  # the audit's directory ("": return the record only)
    tasks: list[str] = field(default_factory=list)  # audited (forget-domain) tasks or groups
    attacks: list[str] = field(default_factory=lambda: [a for a in ATTACKS if a not in OPT_IN])
    forget_corpora: list[str] = field(default_factory=list)  # relearn and activations text
    retain_corpora: list[str] = field(default_factory=list)  # their control text
    min_len: int = 0                  # corpus texts of at most this many characters are dropped
    data_dir: str | None = None       # local task files (a tasks.json, wmdp_bio.jsonl, ...)
    task_files: dict[str, str] = field(default_factory=dict)  # task name -> file
    prompt_style: str = "lmeval"
    format: str | None = None         # force every task to letter or cloze
    limit: int | None = None          # first N questions of each task
    batch_size: int | str = "auto"    # rows per forward when scoring
    revision: str | None = None       # of the unlearned model
    base_revision: str | None = None  # of the base model
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    gcg: GCGConfig = field(default_factory=GCGConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    mcq_controls: MCQControlsConfig = field(default_factory=MCQControlsConfig)

    def fingerprint(self) -> str:
        """The shared settings; each attack's own settings are checked when it resumes."""
        skip = ("output", "attacks", "device", "device_map", "batch_size", *ATTACKS)
        return sha256_json({k: v for k, v in to_dict(self).items() if k not in skip})


# The defaults are the sandbox's; `gpu` sizes the attacks for 7B-class models on one GPU
# (LoRA relearning, nanogcg's search sizes, more texts).
PRESETS: dict[str, dict[str, Any]] = {
    "sandbox": {},
    "gpu": {"relearn": {"method": "lora", "num_texts": 64, "steps": 100, "eval_every": 25,
                        "batch_size": 8, "lr": 2e-4, "max_length": 512, "lora_rank": 16,
                        "lora_alpha": 32.0},
            "gcg": {"num_train": 20, "steps": 250, "suffix_init": " x" * 20,
                    "search_width": 512, "topk": 256, "eval_batch_size": 128},
            "fewshot": {"pool_size": 25},
            "activations": {"num_texts": 64, "max_length": 512, "batch_size": 8},
            "ablation": {"num_texts": 32, "max_length": 512, "batch_size": 8},
            # 3 data x 3 lrs x 3 seeds = 27 LoRA runs of 100 steps a model, read at 25/50/100
            "protocol": {"lrs": [2e-5, 1e-4, 2e-4], "checkpoints": [25, 50, 100],
                         "sizes": [64], "methods": ["lora"], "batch_size": 8,
                         "max_length": 512, "lora_rank": 16, "lora_alpha": 32.0,
                         "eval_batch_size": 16}},
}


def audit_config(preset: str | None = None, config_file: str | None = None,
                 settings: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> AuditConfig:
    """Defaults, then a preset, a YAML file, `settings` (flags; None = unset), `key=value`s."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise WmdpError(f"unknown audit preset {preset!r} (known: {', '.join(PRESETS)})")
        data = {k: dict(v) for k, v in PRESETS[preset].items()}
    where = "config"
    if config_file is not None:
        for key, value in load_yaml(config_file).items():
            if key in ATTACKS and isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        where = config_file
    data.update({k: v for k, v in (settings or {}).items() if v is not None})
    return from_dict(AuditConfig, apply_overrides(data, overrides or []), where)


def check_audit_config(config: AuditConfig) -> None:
    """One line naming what is wrong with the settings, before any model loads or file is
    written (`wmdp run` calls it on its audit settings before its first stage)."""
    unknown = [a for a in config.attacks if a not in ATTACKS]
    if unknown:
        raise WmdpError(f"unknown attack {unknown[0]!r} (known: {', '.join(ATTACKS)})")
    if not config.attacks:
        raise WmdpError(f"no attack named (--attacks {','.join(ATTACKS)})")
    if not config.tasks:
        raise WmdpError("no task named (--tasks wmdp_bio,... : the forget-domain tasks)")
    if config.prompt_style not in PROMPT_STYLES:
        raise WmdpError(f"prompt style {config.prompt_style!r} is not one of "
                        f"{', '.join(PROMPT_STYLES)}")
    probe = config.probe
    if "probe" in config.attacks and probe.folds < 3 and (probe.layers is None
                                                          or len(set(probe.layers)) > 1):
        raise WmdpError(f"probe.folds is {probe.folds}: choosing the probe's layer needs at "
                        "least 3 folds (an inner cross-validation inside each outer one)")
    if "relearn" in config.attacks:
        check_relearn(config.relearn)
    if "protocol" in config.attacks:
        check_grid(config.protocol)
    for attack in NEEDS_CORPORA:
        if attack in config.attacks and not (config.forget_corpora and config.retain_corpora):
            raise WmdpError(f"the {attack} attack needs --forget-corpora and --retain-corpora")
    world = rank_world()[1]
    if world > 1:  # every rank at once, before anything is read or written
        one = [a for a in config.attacks if a not in DATA_PARALLEL]
        if one:
            raise WmdpError(f"the {one[0]} attack runs as one process ({world} processes "
                            f"here): under torchrun give --attacks {','.join(DATA_PARALLEL)} "
                            "(full fine-tuning, FSDP), and run the others without torchrun")
        if config.device_map:
            raise WmdpError(f"device_map {config.device_map!r} with {world} processes: FSDP "
                            "shards the models over the processes; drop --device-map")
        check_parallel(config.relearn)


def _load_tasks(config: AuditConfig) -> tuple[dict, dict]:
    registry = Registry.build(config.data_dir, config.task_files, config.format)
    tasks, items = {}, {}
    for name in registry.expand(config.tasks):
        task = registry.tasks[name]
        if task.kind != "mcq":
            raise WmdpError(f"task {name} is a perplexity task; the audit asks questions")
        tasks[name] = task
        items[name] = task.load_items()[:config.limit] if config.limit else task.load_items()
    return tasks, items


def _load_models(config: AuditConfig) -> dict[str, tuple[Any, Any]]:
    """Both models; under torchrun each process maps them on the CPU (safetensors, shared page
    cache) and FSDP keeps 1/N of each on the process's device."""
    many = rank_world()[1] > 1
    spec = config.model_spec(device="cpu") if many else config.model_spec()
    models = {role: spec.model_spec(model=source, revision=rev).load_model()
              for role, source, rev in (("base", config.base, config.base_revision),
                                        ("unlearned", config.model, config.revision))}
    if many:
        for model, _ in models.values():
            model.requires_grad_(True)  # FSDP's gradients: relearning trains every weight
            shard_model(model, resolve_device(config.device))
    return models


def reference_accuracy(subjects: dict[str, Subject], tasks: dict, items: dict,
                       config: AuditConfig, progress: bool) -> dict:
    """Both models' plain 0-shot accuracy, per task and per question: every attack's baseline."""
    return {role: task_accuracy(s.model, s.tokenizer, tasks, items, config.prompt_style,
                                config.batch_size, progress, label=role)
            for role, s in subjects.items()}


def _model_record(subject: Subject, source: str, revision: str | None) -> dict:
    param = next(subject.model.parameters())
    return {"source": source, "revision": revision,
            "model_type": getattr(subject.model.config, "model_type", None),
            "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device)}


def run_audit(config: AuditConfig, *, overwrite: bool = False, progress: bool = True,
              models: dict[str, tuple[Any, Any]] | None = None) -> dict:
    """Run the configured attacks; returns the audit record (also written to `config.output`).

    `models`: {"base": (model, tokenizer), "unlearned": (model, tokenizer)} already in memory;
    otherwise both are loaded from `config.base` and `config.model`.
    """
    t0 = time.perf_counter()
    check_audit_config(config)
    tasks, items = _load_tasks(config)  # bad data fails before any model loads
    corpora = {kind: [load_corpus(s, config.min_len) for s in specs]
               for kind, specs in (("forget", config.forget_corpora),
                                   ("retain", config.retain_corpora))}
    if models is None:
        for source in (config.base, config.model):
            if not source:
                raise WmdpError("name both models: --model (unlearned) and --base")
            check_model_source(source)
    out = on_main(lambda: prepare_output_dir(  # rank 0 alone touches the directory
        config.output, overwrite, AUDIT, config.fingerprint(), inputs=[
            ("--model", config.model), ("--base", config.base), ("--data-dir", config.data_dir),
            *(("corpus", c) for c in config.forget_corpora + config.retain_corpora),
            *(config.task_files or {}).items()]) if config.output else None)
    record = broadcast(read_json(out / AUDIT) if is_main() and out is not None
                       and (out / AUDIT).is_file() else {})
    pairs = models or _load_models(config)
    subjects = {r: Subject(r, *pairs[r]) for r in ROLES}
    record.update(fingerprint=config.fingerprint(), config=to_dict(config),
                  versions=library_versions(),
                  models={r: _model_record(subjects[r], *((config.base, config.base_revision)
                                                           if r == "base" else
                                                           (config.model, config.revision)))
                          for r in ROLES},
                  tasks={n: {"source": t.source, "format": t.format, "topic": t.topic,
                             "n": len(items[n]), "sha256": sha256_json([i.to_dict() for i in items[n]])}
                         for n, t in tasks.items()})
    record.setdefault("attacks", {})
    record.setdefault("plots", {})
    if "reference" not in record:
        record["reference"] = reference_accuracy(subjects, tasks, items, config, progress)
        _write(out, record)
    ctx = AuditContext(subjects, tasks, items, PROMPT_STYLES[config.prompt_style],
                       {r: {t: v["correct"] for t, v in record["reference"][r].items()}
                        for r in ROLES},
                       corpora["forget"], corpora["retain"], config.seed, config.batch_size,
                       progress, config.model_spec())
    record["gap_tasks"] = gap_tasks(record["reference"])
    for attack in config.attacks:
        _run_attack(attack, getattr(config, attack), ctx, record, out)
    record["verdicts"] = {a: r["verdict"]["text"] for a, r in record["attacks"].items()}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    _write(out, record)
    if out is not None and is_main():
        (out / "verdicts.md").write_text(verdicts_markdown(record), encoding="utf-8")
    return record


def _run_attack(attack: str, attack_config: Any, ctx: AuditContext, record: dict,
                out: Path | None) -> None:
    digest = sha256_json(to_dict(attack_config))
    done = record["attacks"].get(attack)
    if done is not None:
        if done.get("config_sha256") == digest:
            return  # finished by an earlier run with these settings
        raise WmdpError(f"{out}: {AUDIT} holds {attack} results with other {attack} settings "
                        "(use --overwrite to replace them, or another --output)")
    t0 = time.perf_counter()
    result = {"config": to_dict(attack_config), "config_sha256": digest,
              **ATTACKS[attack](ctx, attack_config)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["verdict"] = verdict(attack, result, record["gap_tasks"])
    record["attacks"][attack] = result
    if ctx.progress and is_main():  # the progress bars vanish; a log keeps this line
        print(f"audit: {attack} finished in {result['seconds']:.0f} s: "
              f"{headline(attack, result['verdict'])}", file=sys.stderr, flush=True)
    if out is not None and is_main():
        write_json(out / f"{attack}.json", result)
        if attack in PLOTS:  # an attack without a figure has its JSON and verdict only
            record["plots"][attack] = plot_attack(attack, result, out)
    _write(out, record)


def headline(attack: str, figures: dict) -> str:
    """One line of an attack's verdict figures, for a log."""
    if attack == "activations":
        return (f"forget-text norm {figures['forget_ratio']:.2f}x the base's at block "
                f"{figures['layer']} (retain text {figures['retain_ratio']:.2f}x)")

    def f(key: str, spec: str = ".2f") -> str:
        return "n/a" if figures.get(key) is None else format(figures[key], spec)

    return (f"unlearned {f('unlearned')} -> {f('attacked')} under attack (base {f('base')} -> "
            f"{f('base_attacked')}), {f('recovered_fraction', '.0%')} of the gap recovered, "
            f"{figures['n']} questions")


def _write(out: Path | None, record: dict) -> None:
    if out is not None and is_main():
        write_json(out / AUDIT, record)


def verdicts_markdown(record: dict) -> str:
    """The verdicts and the plain accuracies, as markdown."""
    lines = ["# Robustness audit", "", "| task | n | base acc | unlearned acc |",
             "|---|---:|---:|---:|"]
    for t, ref in record["reference"]["base"].items():
        lines.append(f"| {t} | {ref['n']} | {ref['acc']:.3f} | "
                     f"{record['reference']['unlearned'][t]['acc']:.3f} |")
    gap = record.get("gap_tasks") or []
    lines += ["", "Verdicts pool the tasks where the base model is above chance and unlearning "
              "opened a gap: " + (", ".join(gap) if gap else "none") + ". Each attack measures "
              "on the questions its sentence names, and its base and unlearned figures are the "
              "plain accuracies on those questions (so they can differ from the table's)."]
    lines += [""] + [f"- **{attack}**: {text}" for attack, text in record["verdicts"].items()]
    return "\n".join(lines) + "\n"

"""`wmdp run`: from a model to an unlearned model and a report, in stages that resume.

    wmdp run                                   # the embedded default: the offline sandbox
    wmdp run configs/zephyr-7b-rmu.yaml        # the paper's zephyr run, on a GPU

Stages, each writing its own directory of the run:

    sandbox         the fictional world and its tiny model (built once, cached across runs)
    eval_base       the base model on every task                       eval_base/results.json
    unlearn         the unlearning method                              unlearned/ (a HF model)
    eval_unlearned  the unlearned model on every task                  eval_unlearned/results.json
    audit           can the knowledge be recovered? (when configured)  audit/audit.json
    chat            judged chat, base and unlearned (when configured)  chat_*/chat_results.json
    report          report.md, report.html, plots/, unlearned/README.md (the model card)

`run.json` records the resolved configuration, its fingerprint and library versions;
`stages.json` which stages finished and how long they took. A rerun skips finished stages and
resumes an interrupted one where it stopped (evaluation per task, unlearning from its last
checkpoint, the sandbox from its last epoch, the audit per attack).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wmdp.chat.endpoint import redact_url
from wmdp.config import check_keys, load_config, schema, to_dict, unknown_name
from wmdp.errors import WmdpError
from wmdp.io import (keep_outputs_holding, library_versions, prepare_output_dir, read_json,
                     sha256_json, shared_dir_lock, write_json, write_jsonl)
from wmdp.model_spec import ModelSpec
from wmdp.preflight import Preflight
from wmdp.tasks import Registry

RUN_RECORD = "run.json"
STAGES = "stages.json"
GENERAL_QA = "general_qa.jsonl"  # a sandbox run's general QA lines, for UNDO's distillation


@dataclass
class SandboxSection:
    preset: str = "default"           # "default" (750 facts, ~5 min) or "small" (~1.5 min)
    seed: int = 0                     # the world's and the training seed
    cache_dir: str | None = None      # where builds are kept; default ~/.cache/wmdp/sandbox
    overrides: list[str] = field(default_factory=list)  # key=value settings over the preset
    oracle: bool = False              # also train the oracle (no forget domains) beside it


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=lambda: ["wmdp", "mmlu", "wikitext"])
    forget: list[str] = field(default_factory=lambda: ["wmdp_bio", "wmdp_cyber", "wmdp_chem"])
    near: list[str] = field(default_factory=lambda: [
        "mmlu_college_biology", "mmlu_virology", "mmlu_college_computer_science",
        "mmlu_computer_security"])    # related subjects: collateral damage shows here first
    main: list[str] = field(default_factory=list)  # main table columns; default forget + groups
    data_dir: str | None = None       # local task files (a sandbox run uses the sandbox's)
    task_files: dict[str, str] = field(default_factory=dict)  # NAME: PATH
    batch_size: str = "auto"
    prompt_style: str = "lmeval"
    format: str | None = None
    limit: int | None = None
    data_revision: str | None = None  # hub question sets at this revision (WMDP changed in 2024-04)


@dataclass
class UnlearnSection:
    method: str = "rmu"
    preset: str | None = None         # the method's preset, e.g. zephyr-7b or sandbox
    settings: dict[str, Any] = field(default_factory=dict)  # shared keys and a METHOD: section


@dataclass
class AuditSection:
    attacks: list[str] = field(default_factory=lambda: ["probe", "relearn", "gcg", "fewshot",
                                                        "activations", "ablation"])
    tasks: list[str] = field(default_factory=list)  # default: the eval section's forget tasks
    preset: str | None = None         # "gpu" sizes the attacks for 7B-class models
    settings: dict[str, Any] = field(default_factory=dict)  # the audit's own settings, e.g. gcg:
    protocol: bool = False            # also the relearning protocol (a grid of runs: slow)


@dataclass
class ChatSection:
    settings: dict[str, Any] = field(default_factory=dict)  # chat-eval settings (judge, ...)


@dataclass
class RunConfig(ModelSpec):
    """A whole run; the model fields are ModelSpec's (and reach every stage)."""

    model: str | None = None          # hub id or directory; a sandbox run uses the sandbox's
    output: str = "runs/sandbox"      # the run directory
    sandbox: SandboxSection | None = None
    eval: EvalSection = field(default_factory=EvalSection)
    unlearn: UnlearnSection = field(default_factory=UnlearnSection)
    audit: AuditSection | None = None
    chat: ChatSection | None = None


# The embedded default (configs/sandbox.yaml holds the same): the offline sandbox, end to end.
SANDBOX_TASKS = ["sandbox_forget", "sandbox_general", "sandbox_forget_seen",
                 "sandbox_general_seen", "sandbox_letter", "ppl_retain"]
DEFAULT: dict[str, Any] = {
    "output": "runs/sandbox",
    "sandbox": {"preset": "default", "seed": 0},
    "eval": {"tasks": SANDBOX_TASKS,
             "forget": ["sandbox_bio", "sandbox_cyber", "sandbox_forget", "sandbox_bio_seen",
                        "sandbox_cyber_seen", "sandbox_forget_seen", "sandbox_bio_letter",
                        "sandbox_cyber_letter", "sandbox_forget_letter"],
             "near": ["sandbox_botany", "sandbox_software"],
             "main": ["sandbox_bio", "sandbox_cyber", "sandbox_forget_seen", "sandbox_general",
                      "sandbox_general_seen", "sandbox_letter"],
             "batch_size": "16"},
    "unlearn": {"method": "rmu", "preset": "sandbox"},
    "audit": {"tasks": ["sandbox_bio", "sandbox_cyber", "sandbox_bio_seen", "sandbox_cyber_seen"]},
}


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A config file (or the embedded sandbox default), then `key=value` overrides."""
    if path is None:
        return load_config(RunConfig, None, overrides, base=DEFAULT)
    return load_config(RunConfig, path, overrides)


def sandbox_cache_dir(section: SandboxSection) -> Path:
    """Where sandboxes are kept: the section's cache_dir, else $XDG_CACHE_HOME/wmdp/sandbox."""
    if section.cache_dir:
        return Path(section.cache_dir).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "wmdp" / "sandbox"


def sandbox_location(section: SandboxSection) -> tuple[Any, Path]:
    """The section's sandbox config and the cache directory it is built in (named by preset,
    seed and the config's fingerprint, so another setting never reuses a build)."""
    from wmdp.sandbox.build import fingerprint, sandbox_config

    cfg = sandbox_config(section.preset, section.seed, None,
                         [f"oracle={str(section.oracle).lower()}", *section.overrides])
    name = f"{section.preset}-seed{section.seed}-{fingerprint(cfg)[:10]}"
    return cfg, sandbox_cache_dir(section) / name


def built_sandbox(section: SandboxSection) -> Path:
    """The cached sandbox of `section` (what `wmdp sandbox path` prints); an error if it is
    not built yet. Builds nothing."""
    path = sandbox_location(section)[1]
    if not ((path / "data" / "manifest.json").is_file()
            and (path / "model" / "model.safetensors").is_file()):
        how = ("`wmdp run` (or ./run.sh)" if (section.preset, section.seed) == ("default", 0)
               else f"`wmdp run --set sandbox.preset={section.preset} --set sandbox.seed="
                    f"{section.seed}`")
        raise WmdpError(f"no {section.preset} sandbox with seed {section.seed} is built in "
                        f"{path.parent} yet: {how} builds it")
    return path


def _redacted(tree: Any) -> Any:
    """The run's settings as stored: every URL's userinfo (a key in `https://user:key@host`)
    masked, at any depth (the judge's `base_url` in the chat settings)."""
    if isinstance(tree, dict):
        return {k: _redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redacted(v) for v in tree]
    return redact_url(tree) if isinstance(tree, str) else tree


class Pipeline:
    """The stages of one run over one run directory.

    Every setting is checked when the pipeline is made, before the run directory is touched:
    an input error leaves nothing behind. `create=False` checks without writing (a sweep checks
    all its points first)."""

    def __init__(self, config: RunConfig, overwrite: bool = False, progress: bool = True,
                 create: bool = True) -> None:
        self.config, self.progress = config, progress
        keep = to_dict(config)
        keep.pop("device", None)
        keep.pop("device_map", None)
        self.fingerprint = sha256_json(keep)
        self.dir = Path(config.output)
        self.sandbox_dir: Path | None = None
        if config.sandbox is not None:
            self.sandbox_cfg, self.sandbox_dir = sandbox_location(config.sandbox)
        check_run(self)
        self.preflight: list[dict] = []
        if create and config.sandbox is None:  # a sandbox run's sources are built by the run
            self.preflight = self.check_sources(overwrite)
        if create:
            self.dir = prepare_output_dir(config.output, overwrite, RUN_RECORD, self.fingerprint,
                                          inputs={"model": config.model, "sandbox": self.sandbox_dir,
                                                  "eval.data_dir": config.eval.data_dir,
                                                  **config.eval.task_files})
            write_json(self.dir / RUN_RECORD, {"fingerprint": self.fingerprint,
                                               "config": _redacted(to_dict(config)),
                                               "versions": library_versions(),
                                               "preflight": self.preflight})

    def check_sources(self, overwrite: bool) -> list[dict]:
        """The preflight: every task, corpus, revision, gated access, the model's config and
        tokenizer, and the output, resolved before any weights load (see wmdp.preflight)."""
        c, e = self.config, self.config.eval
        reg = Registry.build(self.data_dir(), self._task_files(), e.format, e.data_revision)
        names = list(e.tasks)
        if c.audit is not None:
            evaluated = set(reg.expand(e.tasks))
            names += list(c.audit.tasks or [t for t in e.forget if t in evaluated])
        unlearn = self.unlearn_settings()[2]
        check = Preflight(model=self.base_model(), model_revision=c.revision,
                          trust_remote_code=c.trust_remote_code, output=c.output,
                          expected_fingerprint=self.fingerprint, overwrite=overwrite,
                          inputs={"model": c.model, "eval.data_dir": e.data_dir,
                                  **e.task_files},
                          tasks=[reg.tasks[t] for t in reg.expand(names)],
                          corpora=[(s, "text") for s in dict.fromkeys(
                              [*unlearn.forget_corpora, *unlearn.retain_corpora])])
        seconds = check.run()
        print(check.summary(seconds))
        return check.record()

    # -- bookkeeping -----------------------------------------------------------------------
    def done(self) -> dict[str, Any]:
        path = self.dir / STAGES
        return read_json(path) if path.is_file() else {}

    def _mark(self, stage: str, seconds: float) -> None:
        done = self.done()
        done[stage] = {"seconds": round(seconds, 1)}
        write_json(self.dir / STAGES, done)

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        c = self.config
        out = []
        if c.sandbox is not None:
            out.append(("sandbox", self.build_sandbox))
        out += [("eval_base", lambda: self.evaluate(self.base_model(), "eval_base")),
                ("unlearn", self.unlearn),
                ("eval_unlearned", lambda: self.evaluate(str(self.dir / "unlearned"), "eval_unlearned"))]
        if c.audit is not None:
            out.append(("audit", self.audit))
        if c.chat is not None:
            out.append(("chat", self.chat))
        out.append(("report", self.report))
        return out

    def run(self, stop_after: str | None = None) -> dict:
        for name, stage in self.stages():
            if name in self.done():
                print(f"wmdp: stage {name}: done, skipped")
            else:
                print(f"wmdp: stage {name} ...")
                t0 = time.perf_counter()
                stage()
                self._mark(name, time.perf_counter() - t0)
            if "unlearn" in self.done():  # the expensive part exists: a late error keeps it
                keep_outputs_holding(self.dir)
            if name == stop_after:  # also when it was done before: a resumed sweep base
                break
        return self.done()

    # -- the stages ------------------------------------------------------------------------
    def base_model(self) -> str:
        if self.config.model:
            return self.config.model
        if self.sandbox_dir is not None:
            return str(self.sandbox_dir / "model")
        raise WmdpError("no model given (set `model:` in the config, or a `sandbox:` section)")

    def data_dir(self) -> str | None:
        if self.config.eval.data_dir:
            return self.config.eval.data_dir
        return str(self.sandbox_dir / "data") if self.sandbox_dir is not None else None

    def build_sandbox(self) -> None:
        from wmdp.sandbox.build import build_sandbox

        with shared_dir_lock(self.sandbox_dir, "the sandbox cache"):  # a 2nd run waits
            build_sandbox(self.sandbox_dir, self.sandbox_cfg, progress=self.progress)

    def _task_files(self) -> dict[str, str]:
        files = dict(self.config.eval.task_files)
        if self.sandbox_dir is not None and "ppl_retain" in self.config.eval.tasks:
            files.setdefault("ppl_retain", str(self.sandbox_dir / "data" / "retain.jsonl"))
        return files

    def evaluate(self, model: str, stage: str) -> None:
        from wmdp.evaluate import EvalConfig, run_eval

        e = self.config.eval
        revision = self.config.revision if stage == "eval_base" else None
        config = EvalConfig(**self.model_fields(model, revision),
                            batch_size=e.batch_size, prompt_style=e.prompt_style, format=e.format,
                            limit=e.limit, data_dir=self.data_dir(), task_files=self._task_files(),
                            data_revision=e.data_revision)
        run_eval(config, e.tasks, self.dir / stage, progress=self.progress)

    def model_fields(self, model: str, revision: str | None) -> dict[str, Any]:
        """The run's model settings (ModelSpec's fields) for `model` at `revision`: every stage
        loads with the same dtype, device, device_map and trust_remote_code."""
        return to_dict(self.config.model_spec(model=model, revision=revision))

    def unlearn_settings(self) -> tuple[Any, Any, Any]:
        from wmdp.unlearn import resolve

        c, u = self.config, self.config.unlearn
        check_unlearn_keys(u)
        settings = dict(u.settings)
        method_section = settings.pop(u.method, None)
        flags = {**self.model_fields(self.base_model(), c.revision),
                 "output": str(self.dir / "unlearned")}
        if self.sandbox_dir is not None:
            data = self.sandbox_dir / "data"
            flags["forget_corpora"] = [str(data / "forget_bio.jsonl"), str(data / "forget_cyber.jsonl")]
            flags["retain_corpora"] = [str(data / "retain.jsonl")] * 2
            if u.method == "undo":  # UNDO distils on general text too: the world's general QA
                flags["undo.distill_corpora"] = [str(self.dir / GENERAL_QA)]
        flags.update(settings)  # the config's own corpora and settings win
        for key, value in (method_section or {}).items():
            flags[f"{u.method}.{key}"] = value
        # a flag of None means "unset"; a config's explicit null clears the preset's value
        nulls = [f"{key}=null" for key, value in flags.items()
                 if value is None and (key in settings or key.startswith(f"{u.method}."))]
        return resolve(u.method, preset=u.preset, settings=flags, overrides=nulls)

    def unlearn(self) -> None:
        from wmdp.unlearn import run_unlearning

        method, hparams, config = self.unlearn_settings()
        general_qa = self.dir / GENERAL_QA
        if self.sandbox_dir is not None and str(general_qa) in getattr(hparams, "distill_corpora",
                                                                       []):
            from wmdp.sandbox.data import general_qa_texts

            write_jsonl(general_qa, [{"text": t} for t in
                                     general_qa_texts(self.sandbox_dir / "data")])
        run_unlearning(method, hparams, config, progress=self.progress)

    def audit(self) -> None:
        from wmdp.audit.run import run_audit

        run_audit(self.audit_settings(), progress=self.progress)

    def audit_settings(self, tasks: list[str] | None = None) -> Any:
        """The audit's config; `tasks` stands in for the default ones when checking a run
        whose data (the sandbox's) is not built yet."""
        from wmdp.audit.run import AuditConfig, audit_config

        c, a, e = self.config, self.config.audit, self.config.eval
        check_keys(a.settings, schema(AuditConfig), "audit.settings.")
        unlearn = self.unlearn_settings()[2]
        settings = {"model": str(self.dir / "unlearned"), "base": self.base_model(),
                    "tasks": a.tasks or tasks or [t for t in e.forget if t in self._leaf_tasks()],
                    "attacks": list(dict.fromkeys(a.attacks + ["protocol"] * a.protocol)),
                    "output": str(self.dir / "audit"),
                    "forget_corpora": unlearn.forget_corpora,
                    "retain_corpora": list(dict.fromkeys(unlearn.retain_corpora)),
                    "min_len": unlearn.min_len, "data_dir": self.data_dir(),
                    "task_files": self._task_files(), "prompt_style": e.prompt_style,
                    "format": e.format, "base_revision": c.revision,
                    **{k: v for k, v in self.model_fields("", None).items()
                       if k not in ("model", "revision")}, **a.settings,
                    **self._protocol_settings()}
        return audit_config(preset=a.preset, settings=settings)

    def _protocol_settings(self) -> dict[str, Any]:
        """The relearning protocol's oracle (the run's sandbox's, when it trains one) and
        general tasks (outside the sandbox: the near subjects), under the config's own."""
        own = dict(self.config.audit.settings.get("protocol") or {})
        if self.config.sandbox is not None and self.config.sandbox.oracle:
            from wmdp.sandbox.oracle import oracle_model_dir

            own.setdefault("oracle", str(oracle_model_dir(self.sandbox_dir)))
        elif self.config.sandbox is None and self.config.eval.near:
            own.setdefault("general_tasks", list(self.config.eval.near))
        return {"protocol": own} if own else {}

    def _leaf_tasks(self) -> set[str]:
        reg = Registry.build(self.data_dir(), self._task_files(), self.config.eval.format)
        return set(reg.expand(self.config.eval.tasks))

    def chat(self) -> None:
        from wmdp.chat.run import chat_config, run_chat_eval

        for label, model in (("base", self.base_model()), ("unlearned", str(self.dir / "unlearned"))):
            revision = self.config.revision if label == "base" else None
            cfg = chat_config({**self.config.chat.settings,
                               **self.model_fields(model, revision)})
            run_chat_eval(cfg, self.dir / f"chat_{label}", progress=self.progress)

    def report(self) -> None:
        from wmdp.report import write_report

        e = self.config.eval
        write_report(self.dir, forget=e.forget, near=e.near, main=e.main)


# -- checks: every setting, before anything is written or run -----------------------------
def check_unlearn_keys(u: UnlearnSection) -> None:
    """The method's name, and every key of `unlearn.settings` against the shared settings and
    the method's own section (`unlearn.settings.rmu.alpha`), with the closest key suggested."""
    from wmdp.unlearn.loop import UnlearnConfig
    from wmdp.unlearn.registry import METHODS

    if u.method not in METHODS:
        raise unknown_name("unlearning method", u.method, METHODS, "unlearn.method")
    tree = {**schema(UnlearnConfig), u.method: schema(METHODS[u.method][1])}
    check_keys(u.settings, tree, "unlearn.settings.")


def _at_least(values: dict[str, Any], minimum: int | float) -> None:
    for name, value in values.items():
        if value is not None and not value >= minimum:  # `not >=`: NaN fails too
            raise WmdpError(f"{name} is {value}, expected at least {minimum}")


# Sizes and counts of the audit's attacks (section.field: the least that runs); the audit's
# own checks (probe folds, attack names, corpora) run here too, before anything is written.
AUDIT_MINIMUMS = {"probe.control_shuffles": 0, "relearn.num_texts": 1,
                  "relearn.steps": 1, "relearn.eval_every": 1, "relearn.batch_size": 1,
                  "relearn.max_length": 1, "relearn.lora_rank": 1, "gcg.num_train": 1,
                  "gcg.steps": 1, "gcg.search_width": 1, "gcg.topk": 1, "gcg.n_replace": 1,
                  "gcg.eval_batch_size": 1, "fewshot.pool_size": 1, "activations.num_texts": 1,
                  "activations.max_length": 1, "activations.batch_size": 1,
                  "ablation.num_texts": 1, "ablation.max_length": 1, "ablation.batch_size": 1}


def check_run(pipe: Pipeline) -> None:
    """Method, keys, sizes and counts of every stage; raises the first problem found."""
    c, e = pipe.config, pipe.config.eval
    if not e.tasks:
        raise WmdpError("eval.tasks names no task")
    if e.batch_size != "auto" and not (e.batch_size.isdigit() and int(e.batch_size) > 0):
        raise WmdpError(f"eval.batch_size is {e.batch_size!r}, expected a positive integer or auto")
    _at_least({"eval.limit": e.limit}, 1)
    _, hparams, u = pipe.unlearn_settings()
    _at_least({f"unlearn.settings.{k}": getattr(u, k)
               for k in ("batch_size", "max_num_batches", "epochs")}, 1)
    _at_least({"unlearn.settings.min_len": u.min_len,
               "unlearn.settings.checkpoint_every": u.checkpoint_every}, 0)
    if not u.forget_corpora or len(u.retain_corpora) != len(u.forget_corpora):
        raise WmdpError(f"unlearn.settings: {len(u.forget_corpora)} forget corpora and "
                        f"{len(u.retain_corpora)} retain corpora; give one retain corpus per "
                        "forget corpus (at least one)")
    method = c.unlearn.method
    lr = getattr(hparams, "lr", None)
    if lr is not None and not 0 < lr < float("inf"):
        raise WmdpError(f"unlearn.settings.{method}.lr is {lr}, expected a positive number")
    for name in ("steering_coeffs", "alpha"):  # per topic: one value for all, or one each
        values = getattr(hparams, name, None)
        if isinstance(values, list) and len(values) not in (1, len(u.forget_corpora)):
            raise WmdpError(f"unlearn.settings.{method}.{name} has {len(values)} values for "
                            f"{len(u.forget_corpora)} forget corpora (give 1 or "
                            f"{len(u.forget_corpora)})")
    if c.audit is not None:
        from wmdp.audit.run import check_audit_config  # the audit's own checks, run early

        audit = pipe.audit_settings(tasks=list(e.forget))
        check_audit_config(audit)
        for key, least in AUDIT_MINIMUMS.items():
            section, name = key.split(".")
            _at_least({f"audit.settings.{key}": getattr(getattr(audit, section), name, None)},
                      least)
    if c.chat is not None:
        from wmdp.chat.run import chat_config

        chat_config({**c.chat.settings, "model": "-"}, "chat.settings")


def run_pipeline(config: RunConfig, overwrite: bool = False, progress: bool = True,
                 stop_after: str | None = None) -> Path:
    pipe = Pipeline(config, overwrite, progress)
    pipe.run(stop_after)
    return pipe.dir


__all__ = ["RunConfig", "Pipeline", "run_pipeline", "load_run_config", "DEFAULT"]

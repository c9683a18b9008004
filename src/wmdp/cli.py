"""The `wmdp` command.

    wmdp eval --model M --tasks wmdp,mmlu --output DIR

Every user error prints one line, `wmdp: <what and where>`, and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors import SafetensorError

from wmdp import __version__
from wmdp.cli_errors import OneLineParser, failing_file, nonnegative_fraction
from wmdp.errors import WmdpError


# keys whose values a command writes, not reads: the output, the judge cache (an output,
# checked on its own), the sandbox cache (shared; the sandbox built in it is an input)
OUTPUT_KEYS = ("output", "cache", "cache_dir")


def command_inputs(*configs: tuple[str, Any, bool]) -> list[tuple[str, str]]:
    """Every local path a command may read, however it is spelled: a path, a corpus spec
    (`raw:PATH`), a perplexity task (`ppl:PATH`), a task file, an `hf:DIR` judge, at any depth
    of its settings. `configs`: (key prefix, settings or a dataclass, whether its top-level
    keys are flags). Returns (the flag or key that names it, the path); a command keeps its
    outputs apart from all of them (`refuse_overlap`)."""
    from wmdp.config import to_dict

    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str, flagged: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if str(k) not in OUTPUT_KEYS:
                    walk(v, f"{key}.{k}" if key else str(k), flagged)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key, flagged)
        elif isinstance(value, (str, Path)) and str(value):
            label = _input_label(key, flagged)
            found.extend((label, path) for path in _spec_paths(str(value), key))

    for prefix, config, flagged in configs:
        walk(to_dict(config), prefix, flagged)
    return found


def _spec_paths(value: str, key: str) -> list[str]:
    """The local paths a setting's value may name (a value that names none is harmless: only
    paths that exist are compared)."""
    from wmdp.data.corpus import corpus_file
    from wmdp.tasks import PPL_PREFIX

    paths = [value]
    corpus = corpus_file(value.removeprefix(PPL_PREFIX))
    if corpus is not None:
        paths.append(str(corpus))
    if key.rpartition(".")[2] == "judge" and value.startswith("hf:"):
        paths.append(value[len("hf:"):])
    return paths


def _input_label(key: str, flagged: bool) -> str:
    parts = key.split(".")
    if flagged and parts[0] == "task_files" and len(parts) == 2:
        return f"--task {parts[1]}"
    if flagged and parts[0] == "judge":
        return "--judge"
    if flagged and len(parts) == 1:
        return "--" + key.replace("_", "-")
    return key


def refuse_overlap(output: str | Path | None, inputs: list[tuple[str, str]],
                   config_file: str | None = None, kind: str = "output directory") -> None:
    """The one check of every command, before anything is written: its output neither is,
    holds nor lies inside any input (through links and `..`), so `--overwrite` never deletes
    what the command reads, and a file it appends to is never one it reads."""
    from wmdp.io import check_apart

    if output:
        check_apart(output, [("the config file", config_file), *inputs], kind=kind)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _task_file(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def add_model_args(p: argparse.ArgumentParser, flag: str = "--model", required: bool = True) -> None:
    p.add_argument(flag, required=required, help="hub id or local model directory")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--device-map", default=None,
                   help="'auto' shards the model across GPUs with accelerate")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with the model (off unless asked)")
    p.add_argument("--allow-mismatched-weights", action="store_true",
                   help="load weights that are not exactly the model's tensors (missing ones "
                        "random); off: such a checkpoint is an error naming them")


def task_files(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """`--task NAME=PATH` flags as a dict; a name given twice is an error, not the last one."""
    out: dict[str, str] = {}
    for name, path in pairs:
        if name in out:
            raise WmdpError(f"--task {name} is given twice ({out[name]} and {path}); give it once")
        out[name] = path
    return out


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local files for tasks (wmdp_bio.jsonl, <subject>_test.csv, tasks.json)")
    p.add_argument("--task", dest="task_files", action="append", type=_task_file, default=[],
                   metavar="NAME=PATH", help="point task NAME at a local file (repeatable)")
    p.add_argument("--prompt-style", default="lmeval", choices=["lmeval", "lmeval-0.4.2"],
                   help="lm-eval's current prompt and BOS handling, or the paper's 0.4.2")
    p.add_argument("--format", default=None, choices=["letter", "cloze"],
                   help="force every task to the letter (A-D) or cloze format")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on WMDP, MMLU and custom MCQ sets")
    add_model_args(p)
    add_task_args(p)
    p.add_argument("--tasks", type=_csv, default=None,
                   help="comma-separated tasks or groups (default: the --task names)")
    p.add_argument("--data-revision", default=None,
                   help="hub revision (branch, tag or commit) of cais/wmdp and cais/mmlu")
    p.add_argument("--output", required=True, help="directory for results.json and samples")
    p.add_argument("--batch-size", default="auto", help="rows per forward pass, or auto")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length (perplexity window); default: the model's")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from wmdp.distributed import init_from_env, is_main
    from wmdp.evaluate import EvalConfig, format_table, run_eval

    tasks = args.tasks if args.tasks is not None else list(task_files(args.task_files))
    if not tasks:
        raise WmdpError("--tasks names no task (give --tasks NAME[,NAME...] or --task NAME=PATH)"
                        if args.tasks is not None else "eval: give --tasks NAME[,NAME...] "
                        "(tasks or groups) or --task NAME=PATH")
    config = EvalConfig(model=args.model, revision=args.revision, dtype=args.dtype,
                        device=args.device, device_map=args.device_map,
                        batch_size=args.batch_size, max_length=args.max_length,
                        prompt_style=args.prompt_style,
                        format=args.format, limit=args.limit, data_dir=args.data_dir,
                        task_files=task_files(args.task_files), data_revision=args.data_revision,
                        trust_remote_code=args.trust_remote_code,
                        allow_mismatched_weights=args.allow_mismatched_weights)
    config.validate()  # bad numbers fail before torch.distributed or any file is touched
    refuse_overlap(args.output, command_inputs(("", config, True), ("tasks", tasks, True)))
    init_from_env()  # under torchrun: data-parallel, rank 0 writes
    results = run_eval(config, tasks, args.output, overwrite=args.overwrite)
    if not is_main():
        return 0
    print(format_table(results))
    print(f"wrote {os.path.join(args.output, 'results.json')}")
    return 0


def _unlearn_parser(sub: argparse._SubParsersAction) -> None:
    """`wmdp unlearn METHOD`: flags come from the dataclass fields (layer_id -> --layer-id)."""
    from wmdp.config import cli_flags
    from wmdp.unlearn.loop import UnlearnConfig
    from wmdp.unlearn.registry import METHODS

    p = sub.add_parser("unlearn", help="remove a domain's knowledge from a model")
    methods = p.add_subparsers(dest="method", required=True)
    for name, (_, hp_cls, presets, summary) in METHODS.items():
        m = methods.add_parser(name, help=summary)
        m.add_argument("--preset", choices=sorted(presets) or None, help="published settings")
        m.add_argument("--config", help=f"YAML file: shared settings, hyperparameters under {name}:")
        cli_flags(m, UnlearnConfig, dest_prefix="", skip=())
        cli_flags(m.add_argument_group(f"{name} hyperparameters"), hp_cls,
                  dest_prefix=f"{name}.", skip=())
        m.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help=f"any setting, e.g. {name}.lr=1e-4 (repeatable)")
        m.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
        m.set_defaults(func=_cmd_unlearn)


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from wmdp.unlearn import resolve, run_unlearning

    settings = {k: v for k, v in vars(args).items() if k.startswith(f"{args.method}.")
                or k in _unlearn_shared_keys()}
    method, hparams, config = resolve(args.method, preset=args.preset, config_file=args.config,
                                      settings=settings, overrides=args.overrides)
    if config.checkpoint_every < 0:
        raise WmdpError(f"--checkpoint-every is {config.checkpoint_every}, expected 0 (never) "
                        "or a number of steps")
    refuse_overlap(config.output, command_inputs(("", config, True), ("", hparams, True)),
                   args.config)
    from wmdp.unlearn.loop import FINAL_RECORD

    from wmdp.distributed import init_from_env, is_main

    finished = (Path(config.output) / FINAL_RECORD).is_file() and not args.overwrite
    init_from_env()  # under torchrun: FSDP over the processes, rank 0 writes
    out = run_unlearning(method, hparams, config, overwrite=args.overwrite)
    if not finished and is_main():  # else run_unlearning found the finished run, did nothing
        print(f"wrote the unlearned model to {out}")
    return 0


def _unlearn_shared_keys() -> set[str]:
    import dataclasses

    from wmdp.unlearn.loop import UnlearnConfig

    return {f.name for f in dataclasses.fields(UnlearnConfig)}


def _chat_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat-eval", help="judged chat (MT-Bench style): answer, then grade 1-10")
    add_model_args(p)
    p.add_argument("--questions", default=None,
                   help="MT-Bench-layout JSONL (question_id, category, turns, reference); "
                        "default: the bundled two-turn set")
    p.add_argument("--references", default=None, metavar="FILE",
                   help="reference answers for the judge, MT-Bench's layout "
                        "(question_id, choices[0].turns); default: the questions' own")
    p.add_argument("--judge", required=True, metavar="SPEC",
                   help="openai:MODEL (any OpenAI-compatible endpoint), hf:MODEL (local), "
                        "or none (answers only)")
    p.add_argument("--output", required=True, help="directory for answers, judgments, results")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template, for a tokenizer without one")
    p.add_argument("--system-prompt", default=None, help="system message (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per answer turn")
    p.add_argument("--batch-size", type=int, default=8, help="conversations generated together")
    p.add_argument("--temperature", type=float, default=None,
                   help="one temperature for all (default: MT-Bench's per category)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    p.add_argument("--judge-base-url", default="https://api.openai.com/v1")
    p.add_argument("--judge-api-key-env", default=None, metavar="NAME",
                   help="NAME of the environment variable holding the API key (default: "
                        "OPENAI_API_KEY for OpenAI's URL, no key for any other URL)")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--judge-retries", type=int, default=5, help="retries with backoff")
    p.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--judge-max-tokens", type=int, default=2048)
    p.add_argument("--judge-cache", default=None, metavar="FILE",
                   help="judgment cache (default: OUTPUT/judge_cache.jsonl)")
    p.add_argument("--judge-dtype", default="auto",
                   choices=["auto", "bfloat16", "float16", "float32"], help="hf judge")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=_cmd_chat_eval)


def _cmd_chat_eval(args: argparse.Namespace) -> int:
    from wmdp.chat.judge import JudgeConfig, format_chat_table, judge_spec
    from wmdp.chat.run import ChatEvalConfig, run_chat_eval

    backend, judge_model = judge_spec(args.judge)
    judge = JudgeConfig(backend=backend, model=judge_model, base_url=args.judge_base_url,
                        api_key_env=args.judge_api_key_env, timeout=args.judge_timeout,
                        max_retries=args.judge_retries, concurrency=args.judge_concurrency,
                        max_tokens=args.judge_max_tokens, cache=args.judge_cache,
                        dtype=args.judge_dtype)
    config = ChatEvalConfig(model=args.model, revision=args.revision, dtype=args.dtype,
                            device=args.device, device_map=args.device_map,
                            trust_remote_code=args.trust_remote_code,
                            allow_mismatched_weights=args.allow_mismatched_weights,
                            questions=args.questions,
                            references=args.references,
                            limit=args.limit, chat_template=args.chat_template,
                            system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, seed=args.seed,
                            temperature=args.temperature, judge=judge)
    inputs = command_inputs(("", config, True))
    refuse_overlap(args.output, inputs)
    refuse_overlap(args.judge_cache, inputs, kind="judge cache")  # appended to: an output
    results = run_chat_eval(config, args.output, overwrite=args.overwrite)
    if "categories" in results:
        print(format_chat_table(results))
    print(f"wrote {os.path.join(args.output, 'chat_results.json')}")
    return 0


def _sandbox_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sandbox", help="the offline sandbox: a fictional world and a tiny model")
    actions = p.add_subparsers(dest="sandbox_command", required=True)
    b = actions.add_parser("build", help="write the world's corpora and MCQs, train its model")
    b.add_argument("--output", required=True, help="directory for data/, model/, train/, eval/")
    b.add_argument("--seed", type=int, default=0, help="the world and the training seed")
    b.add_argument("--preset", default="default", choices=["default", "small"],
                   help="default: 750 facts, 1.2M parameters, ~5 min; "
                        "small: 300 facts, 0.3M parameters, ~1.5 min")
    b.add_argument("--config", default=None, help="YAML file of settings over the preset")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings over the preset, e.g. train.epochs=30 world.docs_per_entity=6")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    b.add_argument("--no-oracle", action="store_true", help="skip the oracle (a model trained "
                   "without the forget domains, in oracle/; ~half the build time)")
    b.set_defaults(func=_cmd_sandbox_build)
    w = actions.add_parser("path", help="print the cached sandbox directory `wmdp run` built "
                           "(builds nothing)")
    w.add_argument("--preset", default="default", choices=["default", "small"])
    w.add_argument("--seed", type=int, default=0, help="the world and the training seed")
    w.add_argument("--cache-dir", default=None,
                   help="the run's sandbox.cache_dir (default: $XDG_CACHE_HOME/wmdp/sandbox, "
                        "else ~/.cache/wmdp/sandbox)")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the run's sandbox.overrides")
    w.set_defaults(func=_cmd_sandbox_path)
    g = actions.add_parser("general-qa", help="write a built sandbox's general-domain QA lines "
                           "(UNDO's general distillation text: the oracle's QA) as a .jsonl")
    g.add_argument("sandbox", help="a built sandbox directory (its data/ is read)")
    g.add_argument("--output", required=True, help="the .jsonl to write (outside the sandbox)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.set_defaults(func=_cmd_sandbox_general_qa)


def _cmd_sandbox_build(args: argparse.Namespace) -> int:
    from wmdp.sandbox.build import build_sandbox, describe, sandbox_config

    refuse_overlap(args.output, [], args.config)
    config = sandbox_config(args.preset, args.seed, args.config,
                            args.overrides + ["oracle=false"] * args.no_oracle)
    manifest = build_sandbox(args.output, config, overwrite=args.overwrite)
    print(describe(manifest))
    print(f"wrote {args.output} (data/, model/, train/log.jsonl, eval/results.json)")
    return 0


def _cmd_sandbox_path(args: argparse.Namespace) -> int:
    from wmdp.pipeline import SandboxSection, built_sandbox

    print(built_sandbox(SandboxSection(args.preset, args.seed, args.cache_dir, args.overrides)))
    return 0


def _cmd_sandbox_general_qa(args: argparse.Namespace) -> int:
    from wmdp.io import write_jsonl
    from wmdp.sandbox.data import general_qa_texts

    root, out = Path(args.sandbox).resolve(), Path(args.output)
    if not (root / "data" / "manifest.json").is_file():
        raise WmdpError(f"{args.sandbox}: not a built sandbox (no data/manifest.json)")
    refuse_overlap(args.output, [("the sandbox", args.sandbox)], kind="output")
    if out.is_dir():
        raise WmdpError(f"--output {args.output} is a directory; name the .jsonl file to write")
    if out.exists() and not args.overwrite:
        raise WmdpError(f"--output {args.output} exists (use --overwrite to replace it)")
    texts = general_qa_texts(root / "data")
    write_jsonl(out, [{"text": t} for t in texts])
    print(f"wrote {args.output}: {len(texts)} general-domain QA lines")
    return 0


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole job: evaluate, unlearn, evaluate, audit, report")
    p.add_argument("config", nargs="?", help="YAML run config (default: the offline sandbox)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. output=runs/x eval.limit=50 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from wmdp.pipeline import load_run_config, run_pipeline
    from wmdp.report import console_summary

    config = load_run_config(args.config, args.overrides)
    refuse_overlap(config.output, _run_inputs(config), args.config)
    run_dir = run_pipeline(config, overwrite=args.overwrite)
    print(console_summary(run_dir))  # the headline (the audit's worst share too), the table
    print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return 0


def _run_inputs(config: Any) -> list[tuple[str, str]]:
    """A run config's inputs: every key's, and the sandbox it is built on."""
    from wmdp.pipeline import sandbox_location

    sandbox = [("sandbox", str(sandbox_location(config.sandbox)[1]))] if config.sandbox else []
    return command_inputs(("", config, False)) + sandbox


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a hyperparameter grid with its Pareto front")
    p.add_argument("config", nargs="?", help="YAML run config (default: the offline sandbox)")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="hyperparameter values, e.g. adaptive_coeff=1,3,10 alpha=10,100 "
                        "(a key the resolved config ignores is refused)")
    p.add_argument("--output", required=True, help="the sweep directory")
    p.add_argument("--forget-metric", default=None,
                   help="task or group whose accuracy should fall (default: sandbox_forget or wmdp)")
    p.add_argument("--general-metric", default=None,
                   help="task or group whose accuracy should hold (default: sandbox_general or mmlu)")
    p.add_argument("--max-general-drop", type=nonnegative_fraction, default=0.05,
                   help="largest allowed fall of general accuracy (absolute, 0.05 = 5 points)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from wmdp.pipeline import load_run_config
    from wmdp.sweep import parse_grid, run_sweep, sweep_table

    config = load_run_config(args.config, args.overrides)
    refuse_overlap(args.output, _run_inputs(config), args.config)
    sandbox = config.sandbox is not None
    summary = run_sweep(config, parse_grid(args.grid), args.output,
                        forget_metric=args.forget_metric or ("sandbox_forget" if sandbox else "wmdp"),
                        general_metric=args.general_metric or ("sandbox_general" if sandbox else "mmlu"),
                        max_general_drop=args.max_general_drop, overwrite=args.overwrite)
    print(sweep_table(summary))
    print(f"wrote {os.path.join(args.output, 'sweep.json')} and pareto.png")
    return 0


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    from wmdp.compare import DEFAULT_FORGET

    p = sub.add_parser("compare", help="one table and plot across runs (the paper's Table 1)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a pipeline run dir (eval_base/, eval_unlearned/, unlearned/) or an "
                        "eval output dir with results.json")
    p.add_argument("--forget", type=_csv, default=None, metavar="PATTERNS",
                   help="comma-separated task/group name patterns that are forget tasks; the "
                        f"rest are general (default: {','.join(DEFAULT_FORGET)})")
    p.add_argument("--tasks", type=_csv, default=None,
                   help="the columns, comma-separated (default: forget tasks and groups, "
                        "top-level general groups and their members, perplexity tasks)")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    p.add_argument("--output", default=None,
                   help="directory for compare.md, compare.json and compare.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from wmdp.compare import run_compare

    refuse_overlap(args.output, [(f"run {r}", r) for r in args.runs])
    table = run_compare(args.runs, output=args.output, forget=args.forget, tasks=args.tasks,
                        metric=args.metric, overwrite=args.overwrite)
    print(table["markdown"])
    if args.output:
        print(f"wrote {os.path.join(args.output, 'compare.md')}, compare.json, compare.png")
    return 0


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="can the removed knowledge be recovered? probes, "
                       "relearning, GCG suffixes, few-shot prompts, activation norms")
    add_model_args(p)  # --model: the unlearned model
    p.add_argument("--base", required=True, help="the model before unlearning: hub id or directory")
    p.add_argument("--base-revision", default=None, help="hub revision of the base model")
    add_task_args(p)
    p.add_argument("--tasks", type=_csv, required=True,
                   help="comma-separated forget-domain tasks or groups (e.g. wmdp_bio,wmdp_cyber)")
    p.add_argument("--attacks", type=_csv, default=None,
                   help="comma-separated: probe,relearn,gcg,fewshot,activations,ablation "
                        "(the default), and protocol (the relearning grid: opt-in, slow)")
    p.add_argument("--forget-corpora", type=_csv, default=None,
                   help="forget-domain text for relearn and activations (corpus specs)")
    p.add_argument("--retain-corpora", type=_csv, default=None,
                   help="unrelated text: the relearning control, the activation baseline")
    p.add_argument("--output", required=True, help="directory for audit.json, plots, verdicts")
    p.add_argument("--preset", default=None, help="sandbox (the defaults: CPU-sized) or gpu")
    p.add_argument("--config", default=None, help="YAML file: settings, attacks' under their names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. gcg.steps=100 or relearn.method=lora (repeatable)")
    p.add_argument("--batch-size", default=None, help="rows per forward when scoring, or auto")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument("--seed", type=int, default=None, help="every attack's seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from wmdp.audit import audit_config, run_audit
    from wmdp.audit.run import verdicts_markdown

    batch = args.batch_size
    settings = {  # None: unset (the preset's, the config file's or the default)
        "model": args.model, "base": args.base, "output": args.output, "tasks": args.tasks,
        "attacks": args.attacks, "forget_corpora": args.forget_corpora,
        "retain_corpora": args.retain_corpora, "data_dir": args.data_dir,
        "task_files": task_files(args.task_files) or None, "format": args.format,
        "prompt_style": None if args.prompt_style == "lmeval" else args.prompt_style,
        "limit": args.limit, "seed": args.seed, "revision": args.revision,
        "base_revision": args.base_revision, "device_map": args.device_map,
        "batch_size": int(batch) if batch and batch.isdigit() else batch,
        "dtype": None if args.dtype == "auto" else args.dtype,
        "device": None if args.device == "auto" else args.device,
        "trust_remote_code": args.trust_remote_code or None,
        "allow_mismatched_weights": args.allow_mismatched_weights or None}
    config = audit_config(args.preset, args.config, settings, args.overrides)
    refuse_overlap(config.output, command_inputs(("", config, True)), args.config)
    from wmdp.distributed import init_from_env, is_main

    init_from_env()  # under torchrun: relearning data-parallel (FSDP), rank 0 writes
    record = run_audit(config, overwrite=args.overwrite)
    if not is_main():
        return 0
    print(verdicts_markdown(record))
    print(f"wrote {os.path.join(args.output, 'audit.json')}")
    return 0


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        from wmdp.plan import run_plan  # torch loads only when the command runs

        return run_plan(args)

    methods = ["all", "rmu", "ga", "graddiff", "npo", "llmu", "scrub", "ssd"]  # wmdp.plan.METHODS
    p = sub.add_parser("plan", help="what fits where, from a model's config alone")
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="model directory, config.json, hub id, or preset (zephyr-7b, yi-34b, ...)")
    p.add_argument("--method", choices=methods, default="all")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's, else 4")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default 512)")
    p.add_argument("--layer-id", type=int, default=None, help="RMU's layer (default: preset's)")
    p.add_argument("--gpus", type=int, default=1, help="devices the persistent state shards over")
    p.add_argument("--gpu-memory", default=None, help="a GPU size to judge too, e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_eval_parser, _unlearn_parser,
                                                                _run_parser, _sweep_parser,
                                                                _chat_eval_parser, _sandbox_parser,
                                                                _compare_parser, _audit_parser,
                                                                _plan_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="wmdp", description=(
        "Measure hazardous knowledge in causal LMs (WMDP), remove it by unlearning (RMU and "
        "baselines), and check that general ability survives."))
    parser.add_argument("--version", action="version", version=f"wmdp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def default_threads(environ: dict = os.environ, cpus: int | None = None) -> None:
    """One torch thread on a machine of 2 CPUs or fewer, unless OMP_NUM_THREADS says otherwise:
    on a shared 2-core machine torch's default (one per core) ran unlearning 1.7x and evaluation
    1.3x slower than one thread, and on a quiet one within 7% (benchmarks/threads.py). Set
    before torch is imported, which reads it."""
    if "OMP_NUM_THREADS" not in environ and (cpus or os.cpu_count() or 1) <= 2:
        environ["OMP_NUM_THREADS"] = "1"


# what main reports as one line: an input error, after which the output is left as found
INPUT_ERRORS = (WmdpError, UnicodeDecodeError, RecursionError, csv.Error, OSError,
                SafetensorError)


def main(argv: Sequence[str] | None = None) -> int:
    from wmdp.io import outputs_removed_on_error, release_output_locks

    default_threads()
    args = build_parser().parse_args(argv)  # a bad flag: one line, SystemExit(2)
    try:
        with outputs_removed_on_error(INPUT_ERRORS):  # the output as it was found
            return int(args.func(args) or 0)
    except WmdpError as e:
        print(f"wmdp: {e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # a reader that does not check its encoding itself
        print(f"wmdp: {failing_file(e)}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
              "save the file as UTF-8", file=sys.stderr)
        return 2
    except RecursionError as e:  # json.loads on deeply nested data, in a reader that let it out
        print(f"wmdp: {failing_file(e)}: nested too deeply to read (over Python's recursion "
              "limit)", file=sys.stderr)
        return 2
    except csv.Error as e:  # a field over the csv module's size limit, a NUL byte
        print(f"wmdp: {failing_file(e)}: not readable as CSV ({e})", file=sys.stderr)
        return 2
    except SafetensorError as e:  # safetensors' own I/O (a disk that fills while it writes)
        print(f"wmdp: {failing_file(e)}: safetensors: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only file system, a file gone
        where = e.filename or "a file it reads or writes"
        print(f"wmdp: {where}: {(e.strerror or str(e)).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wmdp: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        release_output_locks()  # in-process callers (tests, notebooks) run one command at a time


if __name__ == "__main__":
    sys.exit(main())

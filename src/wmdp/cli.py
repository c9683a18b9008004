"""The `wmdp` command.

    wmdp eval --model M --tasks wmdp,mmlu --output DIR

Every user error prints one line, `wmdp: <what and where>`, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from wmdp.errors import WmdpError


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
    p.add_argument("--tasks", type=_csv, required=True, help="comma-separated tasks or groups")
    p.add_argument("--output", required=True, help="directory for results.json and samples")
    p.add_argument("--batch-size", default="auto", help="rows per forward pass, or auto")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from wmdp.evaluate import EvalConfig, format_table, run_eval

    config = EvalConfig(model=args.model, revision=args.revision, dtype=args.dtype,
                        device=args.device, device_map=args.device_map,
                        batch_size=args.batch_size, prompt_style=args.prompt_style,
                        format=args.format, limit=args.limit, data_dir=args.data_dir,
                        task_files=dict(args.task_files), trust_remote_code=args.trust_remote_code)
    results = run_eval(config, args.tasks, args.output, overwrite=args.overwrite)
    print(format_table(results))
    print(f"wrote {os.path.join(args.output, 'results.json')}")
    return 0


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


def _ints(value: str) -> list[int]:
    return [int(v) for v in _csv(value)]


def _unlearn_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unlearn", help="remove a domain's knowledge from a model")
    methods = p.add_subparsers(dest="method", required=True)
    rmu = methods.add_parser("rmu", help="Representation Misdirection for Unlearning (WMDP paper)")
    rmu.add_argument("--preset", help="zephyr-7b, yi-34b, mixtral-8x7b or sandbox")
    rmu.add_argument("--config", help="YAML file: shared settings, hyperparameters under rmu:")
    rmu.add_argument("--model", help="hub id or local model directory (never written to)")
    rmu.add_argument("--output", help="directory for the unlearned model")
    rmu.add_argument("--forget-corpora", type=_csv, help="JSONL files, hub datasets, or wikitext")
    rmu.add_argument("--retain-corpora", type=_csv, help="one per forget corpus")
    rmu.add_argument("--layer-id", type=int, help="block whose output is steered")
    rmu.add_argument("--layer-ids", type=_ints, help="blocks whose MLP output projection trains")
    rmu.add_argument("--steering-coeffs", type=_floats, help="per forget corpus")
    rmu.add_argument("--alpha", type=_floats, help="retain weight per forget corpus")
    rmu.add_argument("--lr", type=float)
    rmu.add_argument("--batch-size", type=int)
    rmu.add_argument("--max-num-batches", type=int)
    rmu.add_argument("--min-len", type=int)
    rmu.add_argument("--seed", type=int)
    rmu.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    rmu.add_argument("--device")
    rmu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="any other setting, e.g. rmu.adaptive_coeff=3 (repeatable)")
    rmu.add_argument("--overwrite", action="store_true")
    rmu.set_defaults(func=_cmd_unlearn)


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from wmdp.unlearn import resolve, run_unlearning

    flags = {"model": args.model, "output": args.output, "forget_corpora": args.forget_corpora,
             "retain_corpora": args.retain_corpora, "batch_size": args.batch_size,
             "max_num_batches": args.max_num_batches, "min_len": args.min_len,
             "seed": args.seed, "dtype": args.dtype, "device": args.device}
    m = args.method
    flags.update({f"{m}.layer_id": args.layer_id, f"{m}.layer_ids": args.layer_ids,
                  f"{m}.steering_coeffs": args.steering_coeffs, f"{m}.alpha": args.alpha,
                  f"{m}.lr": args.lr})
    method, hparams, config = resolve(m, preset=args.preset, config_file=args.config,
                                      settings=flags, overrides=args.overrides)
    out = run_unlearning(method, hparams, config, overwrite=args.overwrite)
    print(f"wrote the unlearned model to {out}")
    return 0


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_eval_parser, _unlearn_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmdp", description=(
        "Measure hazardous knowledge in causal LMs (WMDP), remove it by unlearning (RMU and "
        "baselines), and check that general ability survives."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WmdpError as e:
        print(f"wmdp: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wmdp: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

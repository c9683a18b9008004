"""Every unlearning method on the offline sandbox world, with a small sweep of its main knob, and
the comparison table (RMU beside them), all on CPU.

    wmdp sandbox build --output sandbox                                # once, ~5 min
    .venv/bin/python benchmarks/baselines_sandbox.py sandbox           # 30 runs, ~5 min on CPU
    .venv/bin/python benchmarks/baselines_sandbox.py sandbox --methods ga,ssd --output /tmp/b

For each run: `wmdp unlearn METHOD --preset sandbox` on the sandbox model with its two hazard
corpora (forget_bio, forget_cyber) and the general-domain text (retain.jsonl, once per forget
corpus), then `wmdp eval` of the unlearned model on the held-out sandbox questions (groups
`sandbox_forget`: bio, cyber; `sandbox_general`: botany, software, geography; cloze, `acc`) and
the word perplexity of the retain corpus. The base model is evaluated the same way. Models and
evaluations go to WORK (default runs/baselines_<sandbox dir name>: models/<run>/,
evals/<run>/results.json; a rerun resumes finished runs; `wmdp compare`'s compare.md, .json and
.png in compare/); the table goes to docs/results/baselines_sandbox.json and .md (--output DIR
elsewhere).

The sweep (one knob per method, the rest at the `sandbox` preset): the learning rate of every
trained method (its strength over the sandbox's fixed number of steps; the ranges bracket where
each method starts to forget, found by a coarser grid 1e-4..3e-3), RMU at its preset, and SSD's
selection weighting alpha (the dampening constant lambda at 1, the paper's value). The sandbox
preset trains every baseline at a constant rate with no weight decay, SCRUB with AdamW (not the
recipes' schedules, decay and SCRUB's SGD, which the methods' defaults follow): these are the
settings the sweep's figures in docs/methods.md were measured with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (run label, method, hyperparameters over the method's `sandbox` preset)
SWEEP: list[tuple[str, str, dict[str, float]]] = [
    ("rmu", "rmu", {}),
    *[(f"ga-lr{lr:g}", "ga", {"lr": lr}) for lr in (5e-5, 1e-4, 1.5e-4, 2e-4)],
    *[(f"graddiff-lr{lr:g}", "graddiff", {"lr": lr}) for lr in (1e-4, 2e-4, 3e-4, 5e-4, 1e-3)],
    *[(f"npo-lr{lr:g}", "npo", {"lr": lr}) for lr in (5e-4, 1e-3, 2e-3, 3e-3, 5e-3)],
    *[(f"llmu-lr{lr:g}", "llmu", {"lr": lr}) for lr in (1e-4, 2e-4, 3e-4, 5e-4, 1e-3)],
    *[(f"scrub-lr{lr:g}", "scrub", {"lr": lr}) for lr in (2e-5, 5e-5, 1e-4, 2e-4, 5e-4)],
    *[(f"ssd-alpha{a:g}", "ssd", {"alpha": a}) for a in (10.0, 100.0, 1e3, 3e3, 1e4)],
]
TASKS = ["sandbox_forget", "sandbox_general", "ppl_retain"]


def evaluate(model_dir: Path, data: Path, out: Path) -> dict:
    from wmdp.evaluate import EvalConfig, run_eval

    config = EvalConfig(model=str(model_dir), data_dir=str(data), dtype="float32", device="cpu",
                        batch_size=64, task_files={"ppl_retain": str(data / "retain.jsonl")})
    return run_eval(config, TASKS, out, progress=False)


def unlearn(method: str, hparams: dict[str, float], model_dir: Path, data: Path, out: Path) -> Path:
    from wmdp.unlearn import resolve, run_unlearning

    forget = [str(data / "forget_bio.jsonl"), str(data / "forget_cyber.jsonl")]
    retain = [str(data / "retain.jsonl")] * 2
    settings = {"model": str(model_dir), "output": str(out), "forget_corpora": forget,
                "retain_corpora": retain, "dtype": "float32", "device": "cpu",
                **{f"{method}.{k}": v for k, v in hparams.items()}}
    m, hp, config = resolve(method, preset="sandbox", settings=settings)
    return run_unlearning(m, hp, config, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sandbox", type=Path, help="a built sandbox directory (data/, model/)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for baselines_sandbox.json and .md (default docs/results)")
    parser.add_argument("--work", type=Path, default=None,
                        help="unlearned models and evaluations (default: "
                             "runs/baselines_<sandbox dir name>)")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    import torch

    from wmdp.compare import run_compare

    torch.set_num_threads(args.threads)
    data, model = args.sandbox / "data", args.sandbox / "model"
    if not (data / "tasks.json").is_file() or not (model / "config.json").is_file():
        print(f"{args.sandbox}: not a built sandbox (run `wmdp sandbox build --output "
              f"{args.sandbox}`)", file=sys.stderr)
        return 2
    wanted = set(args.methods.split(",")) if args.methods else None
    runs = [r for r in SWEEP if wanted is None or r[1] in wanted]
    work = args.work or ROOT / "runs" / f"baselines_{args.sandbox.resolve().name}"
    t0 = time.perf_counter()
    evals = [work / "evals" / "base"]
    evaluate(model, data, evals[0])
    for label, method, hparams in runs:
        t = time.perf_counter()
        unlearned = unlearn(method, hparams, model, data, work / "models" / label)
        evals.append(work / "evals" / label)
        evaluate(unlearned, data, evals[-1])
        print(f"{label}: {time.perf_counter() - t:.0f} s", flush=True)
    table = run_compare(evals, output=work / "compare")
    seconds = time.perf_counter() - t0
    md = write_result("baselines_sandbox", {"runs": len(runs), "seconds": round(seconds),
                                            **{k: v for k, v in table.items() if k != "markdown"}},
                      table["markdown"], args.output)
    print(table["markdown"])
    print(f"\n{len(runs)} runs in {seconds:.0f} s; wrote {md} and its .json, and "
          f"{work / 'compare'}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sandbox's headline figures as mean and range over seeds, each on a freshly built world.

    .venv/bin/python benchmarks/sandbox_seeds.py                      # seeds 0,1,2, ~15 min on 2 cores
    .venv/bin/python benchmarks/sandbox_seeds.py --seeds 0,1,2,3 --work /tmp/seeds

For each seed: `wmdp run` on the default sandbox config with `sandbox.seed=N` and a cache
directory of its own (so the world and its model are built anew), up to the unlearned model's
evaluation (`stop_after=eval_unlearned`; the audit is `wmdp run`'s, not timed here). Reads each
run's `eval_base/results.json` and `eval_unlearned/results.json`: held-out cloze `acc` per
domain and group, the seen and letter-format groups, and the retain corpus's word perplexity;
prints base and RMU as mean [min, max] over seeds with the change (RMU against the base of the
same seed, the baseline measured in the same run), and writes docs/results/sandbox_seeds.json
and .md (--output DIR elsewhere).
CPU training is not bit-reproducible across processors: these ranges, not one seed's figure,
are what another machine should reproduce.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (row label, "results"/"groups", name, metric); acc in %, perplexity as is
ROWS = [
    ("forget: bio (held out)", "results", "sandbox_bio", "acc"),
    ("forget: cyber (held out)", "results", "sandbox_cyber", "acc"),
    ("forget group (held out)", "groups", "sandbox_forget", "acc"),
    ("forget group (seen)", "groups", "sandbox_forget_seen", "acc"),
    ("general: botany (near)", "results", "sandbox_botany", "acc"),
    ("general: software (near)", "results", "sandbox_software", "acc"),
    ("general: geography", "results", "sandbox_geography", "acc"),
    ("general group (held out)", "groups", "sandbox_general", "acc"),
    ("general group (seen)", "groups", "sandbox_general_seen", "acc"),
    ("letter format, all domains", "groups", "sandbox_letter", "acc"),
    ("retain word perplexity", "results", "ppl_retain", "word_perplexity"),
]


def run_seed(seed: int, work: Path) -> dict:
    from wmdp.pipeline import load_run_config, run_pipeline

    out = work / f"seed{seed}"
    config = load_run_config(None, [f"output={out}", f"sandbox.seed={seed}",
                                    f"sandbox.cache_dir={work / 'cache'}"])
    t0 = time.perf_counter()
    run_dir = run_pipeline(config, progress=False, stop_after="eval_unlearned")
    seconds = time.perf_counter() - t0
    stages = json.loads((run_dir / "stages.json").read_text())
    figures = {}
    for which in ("eval_base", "eval_unlearned"):
        res = json.loads((run_dir / which / "results.json").read_text())
        figures[which] = {label: _value(res, kind, name, metric)
                          for label, kind, name, metric in ROWS}
    return {"seed": seed, "seconds": round(seconds, 1), "stages": stages, **figures}


def _value(res: dict, kind: str, name: str, metric: str) -> float | None:
    entry = res.get(kind, {}).get(name)
    if entry is None or entry.get(metric) is None:
        return None
    return 100 * entry[metric] if metric == "acc" else entry[metric]


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "values": values}


def table(runs: list[dict]) -> tuple[str, dict]:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"Sandbox (default preset), seeds {seeds}: mean [min, max] over seeds; acc in %",
             "", "| figure | base | RMU | change (RMU - base) |", "|---|---:|---:|---:|"]
    summary = {}
    for label, *_ in ROWS:
        base = [r["eval_base"][label] for r in runs]
        rmu = [r["eval_unlearned"][label] for r in runs]
        if None in base or None in rmu:
            continue
        delta = [u - b for u, b in zip(rmu, base)]
        summary[label] = {"base": _summary(base), "rmu": _summary(rmu), "change": _summary(delta)}
        fmt = "{:.3f}" if "perplexity" in label else "{:.1f}"
        cell = lambda s: f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"  # noqa: E731
        lines.append(f"| {label} | {cell(summary[label]['base'])} | {cell(summary[label]['rmu'])} "
                     f"| {cell(summary[label]['change'])} |")
    label = "retain word perplexity"
    if label in summary:
        rel = [100 * (u / b - 1) for u, b in zip(summary[label]["rmu"]["values"],
                                                 summary[label]["base"]["values"])]
        summary["retain perplexity change %"] = _summary(rel)
        s = summary["retain perplexity change %"]
        lines.append(f"| retain perplexity, RMU / base - 1 | | | {s['mean']:+.1f}% "
                     f"[{s['min']:+.1f}%, {s['max']:+.1f}%] |")
    return "\n".join(lines), summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default=str(ROOT / "runs" / "sandbox_seeds"),
                   help="run directories and the per-seed sandbox cache (resumable)")
    p.add_argument("--output", default=None, help="folder for sandbox_seeds.json and .md "
                   "(default docs/results)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        p.error("--seeds: give distinct integers, e.g. 0,1,2")
    work = Path(args.work)
    runs = []
    for seed in seeds:
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        runs.append(run_seed(seed, work))
        print(f"seed {seed}: {runs[-1]['seconds']} s", file=sys.stderr, flush=True)
    text, summary = table(runs)
    md = write_result("sandbox_seeds", {"runs": runs, "summary": summary}, text, args.output)
    print(text)
    print(f"\nwrote {md} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

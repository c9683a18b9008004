"""Which torch thread count to use on a small CPU: torch's default, 1, and the core count, for
evaluation, unlearning and the sandbox build, each in a fresh process.

    .venv/bin/python benchmarks/threads.py                   # ~6 min on 2 cores
    .venv/bin/python benchmarks/threads.py --counts default,1,2,4
    .venv/bin/python benchmarks/threads.py --busy 1        # a shared machine: one core kept busy

Uses the small sandbox fixture (tests/fixtures/sandbox-small): `wmdp eval` of two held-out task
groups, `wmdp unlearn rmu --preset sandbox` (360 steps), and `wmdp sandbox build --preset small
--no-oracle` cut to 10 epochs. Each run sets OMP_NUM_THREADS (and torch.set_num_threads through
it) or leaves both unset for torch's default, and reports wall-clock seconds and the ratio to
the fastest setting of the same job. `--busy N` keeps N other processes spinning meanwhile (a
shared machine, where oversubscribed threads wait on each other). Writes JSON and Markdown to
docs/results/threads.json and .md (threads_busyN with --busy N; --output DIR elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sandbox-small"
WMDP = [sys.executable, "-m", "wmdp.cli"]


def jobs(tmp: Path) -> dict[str, list[str]]:
    data, model = FIXTURE / "data", FIXTURE / "model"
    return {
        "eval (2 groups)": ["eval", "--model", str(model), "--data-dir", str(data), "--tasks",
                            "sandbox_forget,sandbox_general", "--output", str(tmp / "eval"),
                            "--device", "cpu"],
        "unlearn rmu (sandbox preset)": [
            "unlearn", "rmu", "--preset", "sandbox", "--model", str(model),
            "--forget-corpora", f"{data / 'forget_bio.jsonl'},{data / 'forget_cyber.jsonl'}",
            "--retain-corpora", f"{data / 'retain.jsonl'},{data / 'retain.jsonl'}",
            "--output", str(tmp / "rmu"), "--device", "cpu"],
        "sandbox build (small, 10 epochs)": [
            "sandbox", "build", "--preset", "small", "--no-oracle", "--output",
            str(tmp / "sb"), "train.epochs=10"],
    }


def run(argv: list[str], threads: str, out_dir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(WMDP + argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default=f"default,1,{os.cpu_count()}")
    p.add_argument("--busy", type=int, default=0, help="other processes spinning meanwhile")
    p.add_argument("--output", default=None, help="folder for threads[_busyN].json and .md "
                   "(default docs/results)")
    args = p.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    try:
        return measure(args)
    finally:
        for proc in spinners:
            proc.kill()


def measure(args: argparse.Namespace) -> int:
    counts = list(dict.fromkeys(args.counts.split(",")))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, argv in jobs(tmp).items():
            out_dir = Path(argv[argv.index("--output") + 1])
            results[name] = {c: round(run(argv, c, out_dir), 1) for c in counts}
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    lines = [f"{os.cpu_count()} CPUs, {args.busy} other busy processes; wall-clock seconds "
             "(ratio to the fastest for that job)", "",
             "| job | " + " | ".join(f"threads={c}" for c in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for name, row in results.items():
        best = min(row.values())
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f} ({row[c] / best:.2f}x)"
                                                 for c in counts) + " |")
    name = "threads" if args.busy == 0 else f"threads_busy{args.busy}"
    md = write_result(name, {"cpus": os.cpu_count(), "busy": args.busy, "seconds": results},
                      "\n".join(lines), args.output)
    print("\n".join(lines) + f"\nwrote {md} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`wmdp eval` against lm-evaluation-harness on the same model and questions, in one run.

    .venv/bin/python benchmarks/eval_speed.py [--questions 300] [--batch-size 16] [--hidden 256]

Builds a random-init Llama with Mistral-7B's tokenizer (32k vocabulary) and a file of
WMDP-shaped questions of varied length, then scores them with lm-eval (a custom task on the same
local file, through `wmdp.lmeval_bridge`) and with wmdp, each in its own process so that peak
memory is each tool's own. Prints per-item agreement, throughput (questions per second) and
peak memory, with the ratio wmdp / lm-eval, and writes docs/results/eval_speed.json and .md
(--output DIR elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
WORDS = ("protein cell host vector module patch server kernel route sample assay culture "
         "packet buffer memory region signal enzyme strain domain binary library function "
         "which what how the a of in on for with is are was".split())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(workdir: Path, n: int, hidden: int, layers: int, seed: int) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    rng = random.Random(seed)
    with open(workdir / "questions.jsonl", "w") as f:
        for _ in range(n):  # WMDP questions range from a line to a page of code
            q = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.6, 0.7))))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(4)]
            f.write(json.dumps({"question": q + "?", "choices": choices, "answer": rng.randrange(4)}) + "\n")
    return workdir / "model", workdir / "questions.jsonl"


def worker(tool: str, model_dir: str, questions: str, batch_size: int, repeats: int) -> dict:
    import torch

    from wmdp.evaluate import EvalConfig, evaluate_model
    from wmdp.models import load_model
    from wmdp.tasks import PROMPT_STYLES, Registry, Task

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    task = Task("bench", "biology", path=Path(questions))
    base_rss = rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if tool == "lmeval":
            from wmdp.lmeval_bridge import lmeval_loglikelihoods

            lls, _ = lmeval_loglikelihoods(model, tok, task, questions, PROMPT_STYLES["lmeval"],
                                           batch_size=batch_size)
        else:
            reg = Registry.build()
            reg.tasks["bench"] = task
            res = evaluate_model(model, tok, ["bench"], reg, progress=False,
                                 config=EvalConfig(batch_size=batch_size))
            lls = [s["loglikelihoods"] for s in res["samples"]["bench"]]
        times.append(time.perf_counter() - t0)
    return {"tool": tool, "seconds": min(times), "all_seconds": times, "lls": lls,
            "peak_rss_mb": rss_mb(), "rss_after_load_mb": base_rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["lmeval", "wmdp"])
    ap.add_argument("--model-dir")
    ap.add_argument("--questions-file")
    ap.add_argument("--out")
    ap.add_argument("--output", default=None, help="folder for eval_speed.json and .md "
                    "(default docs/results)")
    args = ap.parse_args()
    if args.worker:
        result = worker(args.worker, args.model_dir, args.questions_file, args.batch_size,
                        args.repeats)
        Path(args.out).write_text(json.dumps(result))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, qfile = build(work, args.questions, args.hidden, args.layers, args.seed)
        runs = {}
        for tool in ("lmeval", "wmdp"):
            out = work / f"{tool}.json"
            subprocess.run([sys.executable, __file__, "--worker", tool, "--model-dir", str(model_dir),
                            "--questions-file", str(qfile), "--out", str(out),
                            "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)],
                           check=True, env=env)
            runs[tool] = json.loads(out.read_text())
    ref, ours = runs["lmeval"]["lls"], runs["wmdp"]["lls"]
    same_pred = sum(max(range(4), key=a.__getitem__) == max(range(4), key=b.__getitem__)
                    for a, b in zip(ref, ours))
    max_diff = max(abs(x - y) for a, b in zip(ref, ours) for x, y in zip(a, b))
    n = len(ref)
    summary = {
        "questions": n, "batch_size": args.batch_size, "model": f"llama h{args.hidden} x{args.layers}, 32k vocab",
        "agreement": same_pred / n, "max_abs_loglikelihood_diff": max_diff,
        "lmeval": {k: v for k, v in runs["lmeval"].items() if k != "lls"},
        "wmdp": {k: v for k, v in runs["wmdp"].items() if k != "lls"},
    }
    qps = {t: n / runs[t]["seconds"] for t in runs}
    extra = {t: runs[t]["peak_rss_mb"] - runs[t]["rss_after_load_mb"] for t in runs}
    summary["throughput_ratio"] = qps["wmdp"] / qps["lmeval"]
    summary["peak_rss_ratio"] = runs["wmdp"]["peak_rss_mb"] / runs["lmeval"]["peak_rss_mb"]
    lines = [f"{n} questions, {summary['model']}, batch size {args.batch_size}, CPU threads "
             f"{os.environ.get('BENCH_THREADS', '2')}", "",
             "| tool | seconds | questions/s | peak RSS MB | RSS growth while scoring MB |",
             "|---|---:|---:|---:|---:|"]
    for t in ("lmeval", "wmdp"):
        lines.append(f"| {t} | {runs[t]['seconds']:.2f} | {qps[t]:.1f} | {runs[t]['peak_rss_mb']:.0f} | "
                     f"{extra[t]:.0f} |")
    lines += [f"| ratio wmdp / lm-eval | | {summary['throughput_ratio']:.2f}x | "
              f"{summary['peak_rss_ratio']:.2f} | |", "",
              f"per-item agreement: {same_pred}/{n} ({100 * same_pred / n:.1f}%), "
              f"max |loglikelihood diff| {max_diff:.2e}"]
    md = write_result("eval_speed", summary, "\n".join(lines), args.output)
    print("\n" + "\n".join(lines) + f"\nwrote {md} and its .json")

if __name__ == "__main__":
    main()

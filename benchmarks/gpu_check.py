"""GPU figures in one table: RMU's engine against the naive two-copy RMU, the prefix path, and
`wmdp eval` against lm-eval, on a random-init model with Mistral-7B's configuration in bfloat16.

    bash benchmarks/gpu_check.sh             # one GPU (H200-class): 4-6 min, ~30 GB of disk
    bash benchmarks/gpu_check.sh --tiny      # the same code, CPU, a tiny model: under a minute

Nothing is downloaded: the weights are random (fine for time and memory), the tokenizer is the
project's Mistral fixture, and the questions are fictional, generated here in the shape of lm-eval's
`wmdp` task (rows of question / four choices / answer, its letter prompt), never WMDP's own.
Stages, each in its own process so that each peak is its own (GPU: torch.cuda.max_memory_allocated;
--tiny: peak resident memory): build the model (sharded, as hub checkpoints are); RMU steps with
`benchmarks/rmu_speed.py`'s two workers (the engine on the whole model, the naive two-copy
reference); `wmdp unlearn rmu --load prefix` (seconds per step from its metrics.jsonl); the
question set scored by lm-eval (through `wmdp.lmeval_bridge`) and by `wmdp eval`'s
`evaluate_model`, timed around the scoring only, with the per-item agreement of their answers.
A stage that fails or runs out of time is a row saying so; the others still run. Writes
docs/results/gpu_check[_tiny].json and .md (--output DIR elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
MISTRAL_7B = ROOT / "src" / "wmdp" / "resources" / "model_configs" / "zephyr-7b.json"
# fictional vocabulary: WMDP's shape (length, four options, a letter answer), none of its content
WORDS = ("vector host strain assay culture module kernel packet buffer region signal enzyme "
         "domain binary library function sample route patch server protocol which what how "
         "the a of in on for with is are was".split())
CODE = ["int main() {", "  char buf[64];", "  read(fd, buf, n);", "  return 0;", "}",
        "def f(x):", "    return x ^ 0x5f", "mov eax, [ebp+8]", "call 0x401000"]


def mode(tiny: bool) -> dict:
    """What differs between the GPU run and its tiny CPU rehearsal: only sizes and the device."""
    if tiny:
        return {"device": "cpu", "layer_id": 2, "questions": 200, "steps": 4, "words": 60,
                "eval_batch": 16, "shard": "200KB", "timeout": 240}
    return {"device": "cuda", "layer_id": 7, "questions": 1000, "steps": 6, "words": 150,
            "eval_batch": 16, "shard": "2GB", "timeout": 220}


def peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (each runs in its own process) -----------------------------------------------------
def build(work: Path, tiny: bool, m: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if tiny:
        cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=4096, sliding_window=4096)
    else:
        spec = {k: v for k, v in json.loads(MISTRAL_7B.read_text()).items() if k != "_source"}
        cfg = MistralConfig(**spec)
    torch.manual_seed(0)
    with torch.device(m["device"]):  # random init where it is fast: 7B on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model", max_shard_size=m["shard"])
    tok.save_pretrained(work / "model")
    write_questions(work / "questions.jsonl", m["questions"], seed=0)
    write_corpus(work / "forget.jsonl", 8 * m["steps"], m["words"], seed=1)
    write_corpus(work / "retain.jsonl", 8 * m["steps"], m["words"], seed=2)
    return {"parameters": params, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def write_questions(path: Path, n: int, seed: int) -> None:
    """Rows as lm-eval's `wmdp` dataset holds them; lengths from a line to a page of code."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.4, 0.8))))
            if rng.random() < 0.2:  # some questions quote code, as WMDP-cyber's do
                q += "\n\n" + "\n".join(rng.choice(CODE) for _ in range(rng.randint(3, 40)))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
                       for _ in range(4)]
            f.write(json.dumps({"question": q, "choices": choices,
                                "answer": rng.randrange(4)}) + "\n")


def write_corpus(path: Path, n: int, words: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def prefix_worker(work: Path, m: dict) -> dict:
    """`wmdp unlearn rmu --load prefix` as the command runs it, the paper's zephyr settings."""
    from wmdp.unlearn import resolve, run_unlearning

    lid, out = m["layer_id"], work / "prefix-out"
    method, hparams, config = resolve("rmu", overrides=[
        f"model={work / 'model'}", f"output={out}", "load=prefix", "dtype=bfloat16",
        f"device={m['device']}", f"forget_corpora=[{work / 'forget.jsonl'}]",
        f"retain_corpora=[{work / 'retain.jsonl'}]", f"rmu.layer_id={lid}",
        f"rmu.layer_ids=[{lid - 2},{lid - 1},{lid}]", "rmu.steering_coeffs=[6.5]",
        "rmu.alpha=[1200]", "rmu.lr=5e-5", "batch_size=4", f"max_num_batches={m['steps'] + 1}",
        "checkpoint_every=0"])
    run_unlearning(method, hparams, config, progress=False, overwrite=True)
    steps = [json.loads(x)["seconds"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    record = json.loads((out / "unlearn_config.json").read_text())["load"]
    return {"seconds_per_step": statistics.median(steps[1:]), "all_steps": steps,
            "peak_memory_mb": peak_mb(m["device"]), "load": record}


def eval_worker(tool: str, work: Path, m: dict) -> dict:
    """Score the questions with lm-eval or with wmdp, the model loaded once, the scoring timed."""
    import torch

    from wmdp.evaluate import EvalConfig, evaluate_model
    from wmdp.models import load_model
    from wmdp.tasks import PROMPT_STYLES, Registry, Task

    model, tok = load_model(str(work / "model"), dtype="bfloat16", device=m["device"])
    qfile = work / "questions.jsonl"
    task = Task("wmdp_shaped", "biology", path=qfile)
    loaded = peak_mb(m["device"])
    if m["device"].startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if tool == "lmeval":
        from wmdp.lmeval_bridge import lmeval_loglikelihoods

        lls, _ = lmeval_loglikelihoods(model, tok, task, qfile, PROMPT_STYLES["lmeval"],
                                       batch_size=m["eval_batch"])
    else:
        registry = Registry.build()
        registry.tasks[task.name] = task
        res = evaluate_model(model, tok, [task.name], registry, progress=False,
                             config=EvalConfig(batch_size=m["eval_batch"]))
        lls = [s["loglikelihoods"] for s in res["samples"][task.name]]
    if m["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "questions_per_s": len(lls) / seconds, "lls": lls,
            "peak_memory_mb": peak_mb(m["device"]), "memory_after_load_mb": loaded}


# -- the parent: stages, table, JSON -------------------------------------------------------------
def run_stage(cmd: list[str], out: Path, timeout: float, env: dict) -> dict:
    """A stage's result, or {"error": why}: a failure is recorded, never raised."""
    if timeout < 20:
        return {"error": "skipped: the time budget is spent"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1][:160] if lines else 'no message'}",
                "stderr_tail": proc.stderr[-2000:], "wall_s": wall}
    try:
        return {**json.loads(out.read_text()), "wall_s": wall}
    except (OSError, ValueError) as e:
        return {"error": f"no result: {e}", "wall_s": wall}


def run_all(work: Path, args: argparse.Namespace, m: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    me = [sys.executable, __file__, "--work", str(work), "--questions", str(m["questions"])] + \
        (["--tiny"] if args.tiny else [])
    rmu = [sys.executable, str(BENCH / "rmu_speed.py"), "--model-dir", str(work / "model"),
           "--layer-id", str(m["layer_id"]), "--words", str(m["words"]), "--steps",
           str(m["steps"]), "--dtype", "bfloat16", "--device", m["device"]]
    stages = {"build": me + ["--worker", "build"],
              "rmu_engine": rmu + ["--worker", "engine"], "rmu_naive": rmu + ["--worker", "naive"],
              "prefix": me + ["--worker", "prefix"],
              "eval_lmeval": me + ["--worker", "eval-lmeval"],
              "eval_wmdp": me + ["--worker", "eval-wmdp"]}
    deadline = time.perf_counter() + args.budget
    results: dict[str, dict] = {}
    for name, cmd in stages.items():
        out = work / f"{name}.json"
        left = deadline - time.perf_counter()
        if name != "build" and "error" in results["build"]:
            results[name] = {"error": "skipped: no model (the build failed)"}
            continue
        results[name] = run_stage(cmd + ["--out", str(out)], out, min(m["timeout"], left), env)
        print(f"gpu_check: {name}: " + (results[name].get("error") or
                                        f"done in {results[name]['wall_s']} s"), file=sys.stderr)
    return results


def agreement(results: dict, work: Path) -> dict:
    a, b = results.get("eval_lmeval", {}), results.get("eval_wmdp", {})
    if "lls" not in a or "lls" not in b:
        return {"error": "needs both evaluations"}
    answers = [json.loads(x)["answer"] for x in (work / "questions.jsonl").read_text().splitlines()]
    pick = lambda lls: [max(range(len(x)), key=x.__getitem__) for x in lls]  # noqa: E731
    la, lb = a.pop("lls"), b.pop("lls")
    pa, pb, n = pick(la), pick(lb), len(answers)
    diff = max(abs(x - y) for u, v in zip(la, lb) for x, y in zip(u, v))
    # random weights leave many near-ties, which bfloat16 rounding may flip either way
    clear = [i for i in range(n) if min(_margin(la[i]), _margin(lb[i])) > CLEAR_MARGIN]
    return {"questions": n, "same_answer": sum(x == y for x, y in zip(pa, pb)),
            "clear_items": len(clear), "same_answer_clear": sum(pa[i] == pb[i] for i in clear),
            "max_abs_loglikelihood_diff": diff,
            "acc_lmeval": sum(x == y for x, y in zip(pa, answers)) / n,
            "acc_wmdp": sum(x == y for x, y in zip(pb, answers)) / n}


CLEAR_MARGIN = 0.1  # nats between the best and the second choice: an item that is no near-tie


def _margin(lls: list[float]) -> float:
    top = sorted(lls, reverse=True)
    return top[0] - top[1]


def _row(label: str, r: dict, speed: str, ratio: str = "") -> str:
    if "error" in r:
        return f"| {label} | FAILED: {r['error']} | | |"
    return f"| {label} | {speed} | {r['peak_memory_mb']:,.0f} | {ratio} |"


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if key in a and key in b else None


def table(report: dict) -> str:
    r, m = report["stages"], report["mode"]
    kind = "GPU max allocated" if m["device"].startswith("cuda") else "peak RSS"
    eng, naive, pre = r["rmu_engine"], r["rmu_naive"], r["prefix"]
    lm, ours, agree = r["eval_lmeval"], r["eval_wmdp"], report["agreement"]
    t, mem = _ratio(eng, naive, "seconds_per_step"), _ratio(eng, naive, "peak_memory_mb")
    pm = _ratio(pre, eng, "peak_memory_mb")
    qps, qm = _ratio(ours, lm, "questions_per_s"), _ratio(ours, lm, "peak_memory_mb")
    sps = lambda x: f"{x['seconds_per_step']:.3f} s/step"  # noqa: E731
    qs = lambda x: f"{x['questions_per_s']:.1f} questions/s"  # noqa: E731
    lines = [f"{report['model']}, bfloat16, {m['device']}; RMU layer_id {m['layer_id']}, batch 4, "
             f"~{m['words']}-token texts; {m['questions']} WMDP-shaped questions, batch "
             f"{m['eval_batch']}",
             f"| stage | speed | peak memory MB ({kind}) | ratio |", "|---|---|---:|---|",
             _row("RMU naive two-copy", naive, sps(naive) if "error" not in naive else ""),
             _row("RMU engine, whole model", eng, sps(eng) if "error" not in eng else "",
                  f"{t:.2f}x time, {mem:.2f}x memory of naive" if t and mem else ""),
             _row("RMU engine, prefix path (--load prefix)", pre,
                  sps(pre) if "error" not in pre else "",
                  f"{pm:.2f}x memory of the whole model" if pm else ""),
             _row("eval: lm-eval", lm, qs(lm) if "error" not in lm else ""),
             _row("eval: wmdp eval", ours, qs(ours) if "error" not in ours else "",
                  f"{qps:.2f}x questions/s, {qm:.2f}x memory of lm-eval" if qps and qm else "")]
    if "error" in agree:
        lines.append(f"| answers agree | FAILED: {agree['error']} | | |")
    else:
        lines.append(f"| answers agree | {agree['same_answer']}/{agree['questions']} items "
                     f"({agree['same_answer_clear']}/{agree['clear_items']} with a margin over "
                     f"{CLEAR_MARGIN} nats); acc "
                     f"lm-eval {agree['acc_lmeval']:.3f}, wmdp {agree['acc_wmdp']:.3f}; max "
                     f"|loglikelihood diff| {agree['max_abs_loglikelihood_diff']:.2g} | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    default=bool(os.environ.get("WMDP_GPU_CHECK_TINY")),
                    help="a tiny model on the CPU (also: WMDP_GPU_CHECK_TINY=1)")
    ap.add_argument("--questions", type=int, help="questions to score (default 1000; tiny 200)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all stages")
    ap.add_argument("--workdir", help="where the model is written (default: a temp dir)")
    ap.add_argument("--output", help="folder for gpu_check[_tiny].json and .md "
                    "(default docs/results)")
    ap.add_argument("--worker", choices=["build", "prefix", "eval-lmeval", "eval-wmdp"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    m = mode(args.tiny)
    if args.questions:
        m["questions"] = args.questions
    if args.worker:
        work = Path(args.work)
        result = (build(work, args.tiny, m) if args.worker == "build" else
                  prefix_worker(work, m) if args.worker == "prefix" else
                  eval_worker(args.worker.removeprefix("eval-"), work, m))
        Path(args.out).write_text(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = run_all(Path(tmp), args, m)
        agree = agreement(results, Path(tmp))
    b = results["build"]
    model = ("tiny Mistral" if args.tiny else "Mistral-7B config (zephyr-7b.json)") + \
        (f", {b['parameters'] / 1e6:,.1f}M parameters, random init" if "error" not in b else "")
    report = {"model": model, "mode": m, "stages": results, "agreement": agree}
    md = write_result(f"gpu_check{'_tiny' if args.tiny else ''}", report, table(report), args.output)
    print(table(report) + f"\nwrote {md} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

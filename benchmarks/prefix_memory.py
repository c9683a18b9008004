"""Peak memory of RMU with the whole model loaded against only the prefix it runs.

    .venv/bin/python benchmarks/prefix_memory.py                  # ~4 min, ~4 GB of disk in /tmp
    .venv/bin/python benchmarks/prefix_memory.py --layers 32 --layer-id 7 --hidden 1536

Builds a deep, narrow random-init Llama (32 blocks by default, Mistral's tokenizer), saves it in
shards, then runs `wmdp unlearn rmu` on it with `--load full` and `--load prefix`, same settings,
a few steps, each in a fresh process, under two allocator settings: glibc's default, and
`MALLOC_MMAP_THRESHOLD_=131072`, under which tensor memory torch frees goes back to the system
(by default glibc keeps freed blocks of up to 32 MB in its heap, so the resident set also holds
what earlier steps freed). Each process reports its peak resident memory (VmHWM) overall and per
stage (loading, unlearning, saving). A separate process measures the runtime both paths share:
Python, torch, transformers, the model's code and the tokenizer, everything but the tensors.

The table gives the raw peaks and the peaks net of that runtime, their ratios, and what the prefix
path must hold (computed from the model's tensors, in MB), so that a missed target shows by how
much and why. Also checks that the two output directories hold bitwise equal tensors. Writes
docs/results/prefix_memory.json and .md (prefix_memory_hH_iI for another width; --output DIR
elsewhere). Linux only (/proc/self/status; per-stage peaks need /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
MB = 2**20
ALLOCATORS = {"default": {}, "returned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def build(path: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


class Peaks:
    """Peak resident memory per stage: VmHWM, reset between stages through clear_refs (where the
    kernel refuses, one overall peak is kept and the stages read the running peak)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.overall = 0.0

    def mark(self, stage: str) -> None:
        peak = _status("VmHWM")
        self.overall = max(self.overall, peak)
        self.stages[stage] = max(self.stages.get(stage, 0.0), peak)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass

    def wrap(self, module: object, name: str, stage: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def staged(*a, **k):
            self.mark("before " + stage)
            try:
                return fn(*a, **k)
            finally:
                self.mark(stage)
        setattr(module, name, staged)


def runtime_worker(args: argparse.Namespace) -> dict:
    """What both paths hold besides tensors: imports, the model's code (a skeleton built on the
    meta device imports it), the tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import wmdp.unlearn  # noqa: F401 - what the path workers import
    from wmdp.models import load_tokenizer

    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    load_tokenizer(args.model_dir, None, False)
    return {"runtime_mb": _status("VmRSS")}


def path_worker(args: argparse.Namespace) -> dict:
    import wmdp.prefix
    import wmdp.unlearn.loop as loop
    from wmdp.unlearn import resolve, run_unlearning

    peaks = Peaks()
    baseline = _status("VmRSS")
    peaks.mark("imports")
    peaks.wrap(loop, "_load", "load")
    peaks.wrap(loop, "unlearn_model", "unlearn")
    peaks.wrap(loop, "save_model", "save")
    peaks.wrap(wmdp.prefix, "save_prefix_model", "save")
    lid = args.layer_id
    method, hparams, config = resolve("rmu", overrides=[
        f"model={args.model_dir}", f"output={args.out}", f"load={args.worker}",
        f"forget_corpora=[{args.corpus}]", f"retain_corpora=[{args.corpus}]",
        f"rmu.layer_id={lid}", f"rmu.layer_ids=[{lid - 2},{lid - 1},{lid}]",
        "batch_size=2", f"max_num_batches={args.steps}", "dtype=float32", "device=cpu",
        "rmu.steering_coeffs=[6.5]", "rmu.alpha=[1200]", "rmu.forget_max_length=[128]",
        "rmu.retain_max_length=128"])
    run_unlearning(method, hparams, config, progress=False)
    peaks.mark("end")
    stages = {k: peaks.stages[k] for k in ("load", "unlearn", "save") if k in peaks.stages}
    return {"baseline_mb": baseline, "peak_mb": peaks.overall, "stage_peak_mb": stages,
            "rss_before_unlearn_mb": peaks.stages.get("before unlearn")}


def tensor_bytes(model_dir: Path, layer_id: int) -> dict[str, float]:
    """MB of the tensors each path holds, from the meta-device model: the whole model, the
    prefix's blocks, the embedding, and RMU's trained tensors (the MLP down projections of
    layers layer_id-2..layer_id), held three more times (original values, Adam's two moments)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    size = {n: p.numel() * p.element_size() / MB for n, p in model.named_parameters()}
    blocks = sum(v for n, v in size.items() if n.startswith("model.layers.")
                 and int(n.split(".")[2]) <= layer_id)
    trained = sum(size[f"model.layers.{i}.mlp.down_proj.weight"]
                  for i in range(layer_id - 2, layer_id + 1))
    return {"whole_model": sum(size.values()), "prefix_blocks": blocks,
            "embedding": size["model.embed_tokens.weight"], "trained_state": 3 * trained}


def compare_outputs(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_worker(kind: str, tmp: Path, args: argparse.Namespace, env: dict, out: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(tmp / "model"),
           "--out", out, "--corpus", str(tmp / "corpus.jsonl"),
           "--layer-id", str(args.layer_id), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accounting(runs: dict, runtime: float, sizes: dict[str, float]) -> dict[str, float]:
    """What the prefix path must hold (MB): the shared runtime, the prefix blocks' tensors,
    RMU's trained state (original values and Adam's two moments of the trained tensors), and the
    rest of its peak with freed memory returned: one step's activations and gradients, and the
    embedding's rows the texts use (memory-mapped, the others are never read). The prefix
    path's default-allocator peak less that is the allocator's retention."""
    best = runs["returned"]["prefix"]["peak_mb"]
    held = runtime + sizes["prefix_blocks"] + sizes["trained_state"]
    full = runs["default"]["full"]["peak_mb"]
    return {"runtime": runtime, "prefix_blocks": sizes["prefix_blocks"],
            "trained_state": sizes["trained_state"], "step_and_embedding_rows": best - held,
            "must_hold": best, "must_hold_over_full_peak": best / full,
            "target_0.35_of_full_peak": 0.35 * full, "missed_by": best - 0.35 * full,
            "allocator_retention": runs["default"]["prefix"]["peak_mb"] - best}


def tables(report: dict) -> str:
    m, runs, acc = report["model"], report["runs"], report["must_hold_mb"]
    lines = [f"RMU on a {m['layers']}-block Llama (hidden {m['hidden']}, {m['whole_model_mb']:.0f} MB "
             f"of float32 tensors), layer_id {m['layer_id']}, {m['steps']} steps, CPU peak RSS (MB); "
             f"runtime shared by both paths {report['runtime_mb']:.0f} MB", "",
             "| allocator | path | peak | load | unlearn | save | peak net of runtime |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for alloc, pair in runs.items():
        for path in ("full", "prefix"):
            r, s = pair[path], pair[path]["stage_peak_mb"]
            lines.append(f"| {alloc} | {path} | {r['peak_mb']:.0f} | {s.get('load', 0):.0f} | "
                         f"{s.get('unlearn', 0):.0f} | {s.get('save', 0):.0f} | "
                         f"{r['peak_mb'] - report['runtime_mb']:.0f} |")
        ratio = report["ratios"][alloc]
        lines.append(f"| {alloc} | prefix / full | {ratio['peak']:.3f} | | | | {ratio['net']:.3f} |")
    lines += ["", "What the prefix path must hold (MB), against the full path's peak (default "
              "allocator)", "", "| item | MB |", "|---|---:|"]
    for k in ("runtime", "prefix_blocks", "trained_state", "step_and_embedding_rows",
              "must_hold", "target_0.35_of_full_peak", "missed_by", "allocator_retention"):
        lines.append(f"| {k.replace('_', ' ')} | {acc[k]:.0f} |")
    lines += [f"| must hold / full peak | {acc['must_hold_over_full_peak']:.3f} |", "",
              f"outputs bitwise equal: {report['outputs_bitwise_equal']}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--layer-id", type=int, default=7)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default=None, help="folder for prefix_memory[_hH_iI].json and .md "
                   "(default docs/results)")
    p.add_argument("--worker", choices=["full", "prefix", "runtime"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = runtime_worker if args.worker == "runtime" else path_worker
        print(json.dumps(fn(args)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args)
        (tmp / "corpus.jsonl").write_text("".join(
            json.dumps({"text": f"text number {i} " * 20}) + "\n" for i in range(4 * args.steps)))
        runtime = run_worker("runtime", tmp, args, env)["runtime_mb"]
        for alloc, extra in ALLOCATORS.items():
            runs[alloc] = {path: run_worker(path, tmp, args, {**env, **extra},
                                            str(tmp / f"{alloc}-{path}"))
                           for path in ("full", "prefix")}
        equal = all(compare_outputs(tmp / f"{a}-full", tmp / f"{a}-prefix") for a in ALLOCATORS)
        sizes = tensor_bytes(tmp / "model", args.layer_id)
    ratios = {a: {"peak": r["prefix"]["peak_mb"] / r["full"]["peak_mb"],
                  "net": (r["prefix"]["peak_mb"] - runtime) / (r["full"]["peak_mb"] - runtime)}
              for a, r in runs.items()}
    report = {"model": {"layers": args.layers, "layer_id": args.layer_id, "hidden": args.hidden,
                        "intermediate": args.intermediate, "dtype": "float32", "steps": args.steps,
                        "whole_model_mb": sizes["whole_model"], "embedding_mb": sizes["embedding"]},
              "allocators": ALLOCATORS, "runtime_mb": runtime, "runs": runs, "ratios": ratios,
              "ratio_note": "peak: raw peak RSS; net: peak RSS less the shared runtime",
              "must_hold_mb": accounting(runs, runtime, sizes), "outputs_bitwise_equal": equal}
    name = "prefix_memory" if (args.hidden, args.intermediate) == (1536, 4096) \
        else f"prefix_memory_h{args.hidden}_i{args.intermediate}"
    md = write_result(name, report, tables(report), args.output)
    print(tables(report) + f"\nwrote {md} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

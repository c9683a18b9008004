"""Peak memory of RMU with the whole model loaded against only the prefix it runs.

    .venv/bin/python benchmarks/prefix_memory.py                  # ~3 min, ~5 GB of disk in /tmp
    .venv/bin/python benchmarks/prefix_memory.py --layers 32 --layer-id 7 --hidden 1536

Builds a deep, narrow random-init Llama (32 blocks by default, Mistral's tokenizer), saves it in
shards, then runs `wmdp unlearn rmu` on it twice, each in a fresh process: `--load full` and
`--load prefix` (embeddings and blocks 0..layer_id read from the shards), same settings, a few
steps. Each process reports its peak resident memory (VmHWM) and its resident memory after
imports, before the model loads; the table gives both the raw peaks and the peaks net of that
baseline (the Python and torch runtime, the same in both), and their ratios, and checks that the
two output directories hold bitwise equal tensors. Writes JSON to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "mistral-7b-v0.1"


def build(path: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (its own address space; ru_maxrss would carry
    the parent's peak across fork and exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    from wmdp.unlearn import resolve, run_unlearning

    baseline = peak_rss_mb()
    lid = args.layer_id
    method, hparams, config = resolve("rmu", overrides=[
        f"model={args.model_dir}", f"output={args.out}", f"load={args.worker}",
        f"forget_corpora=[{args.corpus}]", f"retain_corpora=[{args.corpus}]",
        f"rmu.layer_id={lid}", f"rmu.layer_ids=[{lid - 2},{lid - 1},{lid}]",
        "batch_size=2", f"max_num_batches={args.steps}", "dtype=float32", "device=cpu",
        "rmu.steering_coeffs=[6.5]", "rmu.alpha=[1200]", "rmu.forget_max_length=[128]",
        "rmu.retain_max_length=128"])
    run_unlearning(method, hparams, config, progress=False)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb()}))


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--layer-id", type=int, default=7)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "prefix_memory.json"))
    p.add_argument("--worker", choices=["full", "prefix"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"text number {i} " * 20}) + "\n"
                                  for i in range(4 * args.steps)))
        results = {}
        for path in ("full", "prefix"):
            cmd = [sys.executable, __file__, "--worker", path, "--model-dir", str(tmp / "model"),
                   "--out", str(tmp / path), "--corpus", str(corpus),
                   "--layer-id", str(args.layer_id), "--steps", str(args.steps)]
            line = subprocess.run(cmd, env=env, check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
            results[path] = json.loads(line)
        equal = compare_outputs(tmp / "full", tmp / "prefix")
    full, prefix = results["full"], results["prefix"]
    net = {k: v["peak_mb"] - v["baseline_mb"] for k, v in results.items()}
    report = {"model": {"layers": args.layers, "layer_id": args.layer_id, "hidden": args.hidden,
                        "intermediate": args.intermediate, "dtype": "float32"},
              "full": full, "prefix": prefix, "ratio_peak": prefix["peak_mb"] / full["peak_mb"],
              "ratio_net": net["prefix"] / net["full"], "outputs_bitwise_equal": equal}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"RMU on a {args.layers}-block Llama (hidden {args.hidden}), layer_id {args.layer_id}, "
          "float32, CPU peak RSS")
    print("| path | peak MB | after imports MB | peak net of imports MB |")
    print("|---|---:|---:|---:|")
    for k in ("full", "prefix"):
        r = results[k]
        print(f"| {k} | {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {net[k]:.0f} |")
    print(f"| prefix / full | {report['ratio_peak']:.2f} | | {report['ratio_net']:.2f} |")
    print(f"outputs bitwise equal: {equal}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

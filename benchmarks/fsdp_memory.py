"""Host memory of loading a model for FSDP: one process against 2 processes under torchrun.

    .venv/bin/python benchmarks/fsdp_memory.py                       # ~1 min, ~0.9 GB in /tmp
    .venv/bin/python benchmarks/fsdp_memory.py --hidden 2048 --layers 16

Builds a random-init float32 Llama (saved as safetensors), then loads it with `wmdp.models.
load_model` in float32 and shards it with `wmdp.unlearn.parallel.shard_model` (what `wmdp
unlearn` under torchrun does before training): once as one process (the baseline: it loads, and
does not shard), and as 2 CPU processes (gloo) under torchrun. Each process reports, from
/proc/self/status, its private (anonymous) memory and its peak resident set (which also counts
the mapped file pages it touched, pages the processes share through the page cache) after each
stage. The table gives each stage's private memory growth against the model's size: loading
maps the file (growth far below the model), sharding copies each process's 1/N out of the map.
Writes docs/results/fsdp_memory.json and .md (--output DIR elsewhere). Linux only.
"""

from __future__ import annotations

import argparse
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


def status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def build(path: Path, hidden: int, layers: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                      num_key_value_heads=hidden // 128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MB


def worker(model_dir: str, out: str) -> None:
    from wmdp.distributed import init_from_env, rank_world

    init_from_env()
    rank, world = rank_world()
    stages = {"start": status()}
    from wmdp.models import load_model

    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    stages["loaded"] = status()
    if world > 1:
        from wmdp.unlearn.parallel import shard_model

        shard_model(model, "cpu")
        stages["sharded"] = status()
    Path(f"{out}.{world}.{rank}.json").write_text(json.dumps(stages))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--output", default=None, help="folder for fsdp_memory.json and .md "
                   "(default docs/results)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        size = build(model_dir, args.hidden, args.layers)
        probe = str(Path(tmp) / "probe")
        me = [str(Path(__file__).resolve()), "--worker", str(model_dir), probe]
        subprocess.run([sys.executable, *me], env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        *me], env=env, check=True, capture_output=True)
        runs = {"1 process": [json.loads(Path(f"{probe}.1.0.json").read_text())],
                "2 processes": [json.loads(Path(f"{probe}.2.{r}.json").read_text())
                                for r in (0, 1)]}
    rows = []
    for label, ranks in runs.items():
        for rank, stages in enumerate(ranks):
            start = stages["start"]["RssAnon"]
            row = {"run": label, "rank": rank,
                   "loaded_private_mb": stages["loaded"]["RssAnon"] - start,
                   "peak_rss_mb": max(s["VmHWM"] for s in stages.values())}
            if "sharded" in stages:
                row["sharded_private_mb"] = stages["sharded"]["RssAnon"] - start
            rows.append(row)
    record = {"model_mb": size, "hidden": args.hidden, "layers": args.layers, "rows": rows}
    lines = [f"float32 Llama, hidden {args.hidden}, {args.layers} blocks: {size:.0f} MB of tensors; "
             "private memory growth (MB) and its ratio to the model's size", "",
             "| run | rank | after loading | x model | after sharding | x model | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sharded = r.get("sharded_private_mb")
        lines.append(f"| {r['run']} | {r['rank']} | {r['loaded_private_mb']:.0f} | "
                     f"{r['loaded_private_mb'] / size:.2f} | "
                     f"{'-' if sharded is None else f'{sharded:.0f}'} | "
                     f"{'-' if sharded is None else f'{sharded / size:.2f}'} | "
                     f"{r['peak_rss_mb']:.0f} |")
    md = write_result("fsdp_memory", record, "\n".join(lines), args.output)
    print("\n".join(lines) + f"\nwrote {md} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

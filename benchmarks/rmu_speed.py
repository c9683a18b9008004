"""RMU engine against the naive two-copy implementation, same model and data, in one run.

    .venv/bin/python benchmarks/rmu_speed.py                       # CPU, 12-layer Llama, 32k vocab
    .venv/bin/python benchmarks/rmu_speed.py --mistral-7b --device cuda --dtype bfloat16

The naive implementation (tests/rmu_reference.py) runs RMU as the reference code does: two full
models, three full forwards per step (every layer and the LM head), gradients into every layer
below `layer_id`. Each runs in its own process so peak memory is its own; time per step is the
median after a warm-up step. Also prints the analytic FLOPs per step of both for zephyr-7b.
Writes docs/results/rmu_speed[_mistral7b].json and .md (--output DIR elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_results import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
WORDS = ("the a of in protein cell host vector module patch server kernel route sample buffer "
         "memory region signal enzyme strain domain binary library function result").split()


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def build_model(path: Path, mistral_7b: bool, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if mistral_7b:  # Mistral-7B's real shape (zephyr-7b's), random weights: fine for timing
        cfg = MistralConfig.from_pretrained(TOKENIZER)
    else:
        cfg = MistralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if mistral_7b else torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wmdp.data.corpus import Corpus
    from wmdp.models import decoder_layers, mlp_out_tensor
    from wmdp.unlearn.batches import TopicBatches
    from wmdp.unlearn.loop import unlearn_model
    from wmdp.unlearn.rmu import RMU, RMUConfig

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    steps = args.steps + 1
    forget = [texts(4 * steps, args.words, 1)]
    retain = [texts(4 * steps, args.words, 2)]
    hp = dict(layer_id=args.layer_id, layer_ids=list(range(args.layer_id - 2, args.layer_id + 1)),
              steering_coeffs=[6.5], alpha=[1200.0], lr=5e-5)

    def load():
        return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)

    times: list[float] = []

    def tick(*_):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if args.worker == "engine":
        model = load()
        schedule = TopicBatches([Corpus("f", forget[0], "b")], [Corpus("r", retain[0], "b")],
                                batch_size=4, max_num_batches=steps)
        tick()
        unlearn_model(RMU(RMUConfig(**hp)), model, tok, schedule, seed=42, progress=False,
                      on_step=tick)
    else:
        import rmu_reference

        updated, frozen = load(), load()
        real_step = rmu_reference.NaiveLegacyAdamW.step

        def step_and_tick(self):
            real_step(self)
            tick()

        rmu_reference.NaiveLegacyAdamW.step = step_and_tick
        tick()
        rmu_reference.naive_rmu(updated, frozen, tok, decoder_layers,
                                lambda m, i: mlp_out_tensor(m, i).param, forget, retain,
                                batch_size=4, max_num_batches=steps, seed=42, **hp)
    per_step = [b - a for a, b in zip(times[1:], times[2:])]  # the first step warms up
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"impl": args.worker, "seconds_per_step": statistics.median(per_step),
            "all_steps": per_step, "peak_memory_mb": peak,
            "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS"}


def zephyr_flops(layer_id: int = 7, first: int = 5, batch: int = 4, t_forget: int = 512,
                 t_retain: int = 512, frozen_forget_every: int = 10) -> dict[str, float]:
    """Analytic matmul FLOPs of one RMU step on Mistral-7B's shape (zephyr-7b-beta)."""
    d, ffn, n_layers, vocab, kv = 4096, 14336, 32, 32000, 1024

    def layer(t: int) -> float:  # per token, forward: projections + causal attention
        return 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn) + 2 * t * d

    def fwd(layers: int, t: int, head: bool = False) -> float:
        return batch * t * (layers * layer(t) + (2 * d * vocab if head else 0))

    k = layer_id + 1
    span = layer_id - first + 1
    weight_grads = lambda t: batch * t * span * 2 * d * ffn  # noqa: E731 - down_proj grads only
    naive = (fwd(n_layers, t_forget, True) + 2 * fwd(n_layers, t_retain, True)  # 3 full passes
             + 2 * fwd(k, t_forget) + 2 * fwd(k, t_retain))  # backward: input + weight grads
    engine = (fwd(k, t_forget) + fwd(span, t_forget) / frozen_forget_every  # forget passes
              + fwd(k, t_retain) + fwd(span, t_retain)  # frozen (prefix shared) + updated span
              + fwd(span - 1, t_forget) + fwd(span - 1, t_retain)  # input grads above `first`
              + weight_grads(t_forget) + weight_grads(t_retain))
    return {"naive_tflop": naive / 1e12, "engine_tflop": engine / 1e12, "ratio": engine / naive}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layer-id", type=int, default=3)
    ap.add_argument("--words", type=int, default=150, help="words per text (~tokens)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mistral-7b", action="store_true", help="Mistral-7B's config, random init")
    ap.add_argument("--worker", choices=["engine", "naive"])
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    ap.add_argument("--output", default=None, help="folder for rmu_speed[_mistral7b].json and "
                    ".md (default docs/results)")
    args = ap.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    if args.mistral_7b and args.layer_id == 3:
        args.layer_id = 7
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.mistral_7b, args.layers, args.hidden)
        for impl in ("naive", "engine"):
            out = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, __file__, "--worker", impl, "--model-dir", str(model_dir),
                   "--out", str(out), "--layer-id", str(args.layer_id), "--words", str(args.words),
                   "--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device]
            subprocess.run(cmd, check=True, env=env)
            runs[impl] = json.loads(out.read_text())
    flops = zephyr_flops()
    shape = "Mistral-7B config" if args.mistral_7b else f"Mistral h{args.hidden} x{args.layers}, 32k vocab"
    summary = {"model": shape, "layer_id": args.layer_id, "batch": 4, "words_per_text": args.words,
               "device": args.device, "dtype": args.dtype, **runs,
               "time_ratio": runs["engine"]["seconds_per_step"] / runs["naive"]["seconds_per_step"],
               "memory_ratio": runs["engine"]["peak_memory_mb"] / runs["naive"]["peak_memory_mb"],
               "zephyr_7b_flops_per_step": flops}
    name = "rmu_speed_mistral7b" if args.mistral_7b else "rmu_speed"
    lines = [f"{shape}, layer_id {args.layer_id}, trained MLPs of layers "
             f"{args.layer_id - 2}-{args.layer_id}, batch 4, ~{args.words} tokens/text, "
             f"{args.device} {args.dtype}", "",
             f"| impl | s/step | peak memory MB ({runs['engine']['memory_kind']}) |", "|---|---:|---:|"]
    for impl in ("naive", "engine"):
        lines.append(f"| {impl} | {runs[impl]['seconds_per_step']:.3f} | "
                     f"{runs[impl]['peak_memory_mb']:.0f} |")
    lines += [f"| ratio engine / naive | {summary['time_ratio']:.2f} | {summary['memory_ratio']:.2f} |",
              "", f"zephyr-7b analytic FLOPs per step (batch 4, 512 tokens): naive "
              f"{flops['naive_tflop']:.1f} TFLOP, engine {flops['engine_tflop']:.1f} TFLOP "
              f"(ratio {flops['ratio']:.2f})"]
    md = write_result(name, summary, "\n".join(lines), args.output)
    print("\n" + "\n".join(lines) + f"\nwrote {md} and its .json")

if __name__ == "__main__":
    main()

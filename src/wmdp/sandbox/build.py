"""`wmdp sandbox build`: the world's data, a tokenizer, and a tiny model that knows the world.

    wmdp sandbox build --output sandbox                   # default preset, ~5 min on 2 cores
    wmdp sandbox build --output sandbox-small --preset small --seed 3 train.epochs=40

    manifest = build_sandbox("sandbox", sandbox_config("small", seed=0))

The output directory:

    build.json          the full config and its fingerprint (a rerun with the same config resumes)
    data/               corpora, MCQ files, tasks.json, world.json, manifest.json (see data.py)
    model/              LlamaForCausalLM + tokenizer (safetensors), for wmdp.models.load_model
    train/log.jsonl     loss and per-task cloze accuracy per epoch
    eval/               results.json and samples of the finished model on every sandbox task

While training, `train/` also holds `checkpoint.pt` (model and optimizer after the last finished
epoch) and the tokenizer; an interrupted build continues from there and removes them at the end.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wmdp.config import apply_overrides, from_dict, load_yaml, to_dict
from wmdp.data.corpus import load_corpus
from wmdp.data.mcq import load_mcq_file
from wmdp.errors import WmdpError
from wmdp.io import (give_umask_mode, library_versions, prepare_output_dir, read_json,
                     sha256_file, sha256_json, write_json)
from wmdp.sandbox.data import TRAIN_QA, training_texts, write_data
from wmdp.sandbox.evaluation import accuracy, final_eval
from wmdp.sandbox.oracle import describe_oracle, with_oracle
from wmdp.sandbox.train import CHECKPOINT, ModelConfig, TrainConfig, Trainer, train_tokenizer
from wmdp.sandbox.world import DOMAINS, WorldConfig, make_world

BUILD = "build.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # bump when the same config would build different files (2: balanced values)


@dataclass
class SandboxConfig:
    """Everything that decides what a build writes; the `default` preset's values."""

    preset: str = "default"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    vocab_size: int = 1536            # byte-level BPE: 256 bytes, 2 special tokens, merges
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    oracle: bool = True               # also train the oracle (oracle.py): ~2x the build time


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # 750 facts, a 1.2M-parameter model
    # 300 facts (every domain, 20 entities, 3 attributes), a 0.3M-parameter model, ~1.5 minutes
    "small": {
        "world": {"entities_per_domain": 20, "attributes_per_domain": 3,
                  "values_per_attribute": 6, "docs_per_entity": 5},
        "vocab_size": 768,
        "model": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4},
        "train": {"epochs": 40, "batch_size": 16},
    },
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sandbox_config(preset: str = "default", seed: int = 0, path: str | Path | None = None,
                   overrides: list[str] | None = None) -> SandboxConfig:
    """A preset, then a YAML file's settings, then `key=value` overrides (`train.epochs=30`)."""
    if preset not in PRESETS:
        raise WmdpError(f"sandbox preset {preset!r} is not one of {', '.join(PRESETS)}")
    data = _merge(PRESETS[preset], {"preset": preset, "seed": seed})
    where = "sandbox config"
    if path is not None:
        data, where = _merge(data, load_yaml(path)), str(path)
    config = from_dict(SandboxConfig, apply_overrides(data, overrides or []), where)
    _check(config, where)
    return config


def _check(config: SandboxConfig, where: str) -> None:
    w = config.world
    known = {d.name for d in DOMAINS}
    problems = [
        (not set(w.domains) <= known,
         f"world.domains holds an unknown domain (known: {', '.join(sorted(known))})"),
        (not {"bio", "cyber"} & set(w.domains),
         "world.domains has no hazard-proxy domain (bio, cyber)"),
        (w.values_per_attribute < 4,
         f"world.values_per_attribute is {w.values_per_attribute}, expected at least 4"),
        (not 1 <= w.attributes_per_domain <= 5,
         f"world.attributes_per_domain is {w.attributes_per_domain}, expected 1-5"),
        (not 0 < round(w.seen_fraction * w.entities_per_domain) < w.entities_per_domain,
         "world.seen_fraction leaves no seen or no held-out entity"),
        (w.docs_per_entity < 1, "world.docs_per_entity must be at least 1"),
        (config.train.epochs < 1, "train.epochs must be at least 1"),
        (config.vocab_size < 260, f"vocab_size is {config.vocab_size}, expected at least 260"),
        *_model_problems(config.model),
    ]
    for bad, message in problems:
        if bad:
            raise WmdpError(f"{where}: {message}")


def _model_problems(m: ModelConfig) -> list[tuple[bool, str]]:
    """Shapes a Llama cannot take: found here, not as a traceback from inside the model."""
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
    bad = [(getattr(m, s) < 1, f"model.{s} is {getattr(m, s)}, expected at least 1") for s in sizes]
    if any(b for b, _ in bad):
        return bad
    heads, kv = m.num_attention_heads, m.num_key_value_heads
    return [
        (m.hidden_size % heads != 0, f"model.hidden_size {m.hidden_size} is not divisible by "
                                     f"model.num_attention_heads {heads}"),
        (m.hidden_size % heads == 0 and (m.hidden_size // heads) % 2 != 0,
         f"model.hidden_size / model.num_attention_heads = {m.hidden_size / heads:g} is odd "
         "(rotary positions need an even head size)"),
        (heads % kv != 0, f"model.num_attention_heads {heads} is not divisible by "
                          f"model.num_key_value_heads {kv}"),
    ]


def fingerprint(config: SandboxConfig) -> str:
    # `oracle` is left out: it adds oracle/ and never changes the rest, so a build with or
    # without it is the same sandbox (existing builds and the fixture stay valid)
    config_dict = {k: v for k, v in to_dict(config).items() if k != "oracle"}
    return sha256_json({"format_version": FORMAT_VERSION, "config": config_dict})


def build_sandbox(output: str | Path, config: SandboxConfig | None = None,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or finish building) a sandbox in `output`; returns its manifest."""
    config = config or sandbox_config()
    t0 = time.perf_counter()
    fp = fingerprint(config)
    out = prepare_output_dir(output, overwrite, BUILD, fp)
    data_dir, model_dir, train_dir = out / "data", out / "model", out / "train"
    if (data_dir / MANIFEST).is_file() and (model_dir / "model.safetensors").is_file():
        # already built with this config: at most the oracle is missing
        return with_oracle(out, config, read_json(data_dir / MANIFEST), progress)
    write_json(out / BUILD, {"fingerprint": fp, "format_version": FORMAT_VERSION,
                             "config": to_dict(config)})
    resumed = (train_dir / CHECKPOINT).is_file()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.train.threads)
    try:
        manifest = _build(out, config, progress)
    finally:
        torch.set_num_threads(threads)
    manifest["build"].update(seconds=round(time.perf_counter() - t0, 1), resumed=resumed)
    write_json(data_dir / MANIFEST, manifest)
    (train_dir / CHECKPOINT).unlink(missing_ok=True)
    shutil.rmtree(train_dir / "tokenizer", ignore_errors=True)
    return with_oracle(out, config, manifest, progress)


def _build(out: Path, config: SandboxConfig, progress: bool) -> dict:
    data_dir, model_dir, train_dir = out / "data", out / "model", out / "train"
    world = make_world(config.world, config.seed)
    data_files = write_data(world, data_dir)  # deterministic: a resume rewrites the same bytes
    texts = training_texts(data_dir, config.world.qa_repeats)
    tokenizer = _tokenizer(texts, config.vocab_size, train_dir / "tokenizer")
    trainer = Trainer(config.model, config.train, texts, tokenizer, train_dir, data_dir,
                      config.seed, progress=progress)
    log = trainer.train()

    trainer.model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    give_umask_mode(model_dir)  # safetensors writes 0600
    results = final_eval(model_dir, data_dir, out / "eval")
    manifest = {
        "seed": config.seed, "preset": config.preset, "fingerprint": fingerprint(config),
        "counts": _counts(world, data_dir, texts, tokenizer, trainer),
        "files": {name: sha256_file(data_dir / name) for name in sorted(data_files)},
        "model": {"parameters": sum(p.numel() for p in trainer.model.parameters()),
                  "files": {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())}},
        "accuracy": accuracy(results),
        "final_loss": log[-1]["loss"],
        "build": {"train_seconds": round(sum(r["seconds"] for r in log), 1),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "torch_threads": torch.get_num_threads(), "versions": library_versions()},
    }
    return manifest


def _tokenizer(texts: list[str], vocab_size: int, saved: Path) -> Any:
    """Train the tokenizer once; a resumed build reloads it (the checkpoint's ids are its ids)."""
    if saved.is_dir():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(saved)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(saved)
    return tokenizer


def _counts(world, data_dir: Path, texts: list[str], tokenizer: Any, trainer: Trainer) -> dict:
    corpora = {p.name: len(load_corpus(p).texts)
               for p in sorted(data_dir.glob("*.jsonl")) if not p.name.startswith("sandbox_")}
    return {"facts": len(world.facts), "seen_facts": sum(f.seen for f in world.facts),
            "entities": {d: len(e) for d, e in world.entities.items()},
            "attributes_per_domain": world.config.attributes_per_domain,
            "questions": {p.stem: len(load_mcq_file(p))
                          for p in sorted(data_dir.glob("sandbox_*.jsonl"))},
            "texts": corpora, "training_texts": len(texts),
            "training_tokens_per_epoch": sum(len(e) for e in trainer.examples),
            "vocab_size": len(tokenizer), "steps": trainer.total_steps,
            "train_qa_file": TRAIN_QA}


def describe(manifest: dict) -> str:
    """A table of each domain's accuracy: held-out and seen facts (cloze), held-out (letter)."""
    acc = manifest["accuracy"]
    lines = ["| domain | held-out acc | seen acc | letter acc |", "|---|---:|---:|---:|"]
    names = [n.removeprefix("sandbox_") for n in acc if n.startswith("sandbox_")
             and not n.endswith(("_seen", "_letter"))
             and n not in ("sandbox_forget", "sandbox_general")]
    for name in ["forget", "general"] + names:
        base = f"sandbox_{name}"
        lines.append(f"| {name} | " + " | ".join(
            f"{acc[n]['acc']:.3f}" if n in acc else "" for n in
            (base, f"{base}_seen", f"{base}_letter")) + " |")
    b = manifest["build"]
    lines.append(f"\nseed {manifest['seed']}, preset {manifest['preset']}: "
                 f"{manifest['counts']['facts']} facts, {manifest['model']['parameters']:,} "
                 f"parameters, built in {b['seconds']:.0f} s (training {b['train_seconds']:.0f} s, "
                 f"{b['torch_threads']} thread(s))")
    return "\n".join(lines + describe_oracle(manifest))

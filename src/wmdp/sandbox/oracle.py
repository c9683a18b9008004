"""The oracle: the sandbox's model trained again on the same world with the forget domains left
out. It never learned what unlearning should remove, so its accuracy on forget facts is chance
and its relearning curve is the floor no unlearning method can beat.

    wmdp sandbox build --output sandbox               # model/, then oracle/
    wmdp sandbox build --output sandbox --no-oracle   # without it (or the setting oracle=false)

The same recipe as the model: the model's tokenizer (token ids must agree for attacks and
comparisons; a BPE vocabulary states no fact), the same initialisation seed, batch size,
learning-rate schedule and number of optimizer steps. Its texts are fewer (the general domains'
prose and question-answer lines, unchanged), so each of its epochs is more than one pass over
them: an oracle given fewer steps would be under-trained, not ignorant.

    oracle/model/            LlamaForCausalLM + tokenizer, for wmdp.models.load_model
    oracle/train/log.jsonl   loss and per-task cloze accuracy per epoch (checkpoint.pt while
                             training: an interrupted build resumes at its last epoch)
    oracle/eval/             results.json and samples on every sandbox task

The manifest gains "oracle": its accuracy per task, its steps beside the model's, its build
time. A build without it stays the same sandbox (same fingerprint): a later build with the
oracle on adds it to the finished build without touching model/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from wmdp.io import give_umask_mode, sha256_file, write_json
from wmdp.sandbox.data import oracle_texts, training_texts
from wmdp.sandbox.evaluation import accuracy, final_eval
from wmdp.sandbox.train import CHECKPOINT, Trainer
from wmdp.sandbox.world import make_world

ORACLE = "oracle"


def oracle_model_dir(build_dir: str | Path) -> Path:
    """Where a build keeps its oracle model (what the audit and the pipeline load)."""
    return Path(build_dir) / ORACLE / "model"


def with_oracle(out: Path, config: Any, manifest: dict, progress: bool = True) -> dict:
    """`manifest`, after building the oracle into `out` when the config asks for one and the
    build has none yet; the manifest file is rewritten with its "oracle" entry."""
    if not config.oracle or ("oracle" in manifest
                             and (oracle_model_dir(out) / "model.safetensors").is_file()):
        return manifest
    threads = torch.get_num_threads()
    torch.set_num_threads(config.train.threads)
    try:
        manifest["oracle"] = build_oracle(out, config, manifest, progress)
    finally:
        torch.set_num_threads(threads)
    write_json(out / "data" / "manifest.json", manifest)
    (out / ORACLE / "train" / CHECKPOINT).unlink(missing_ok=True)
    return manifest


def build_oracle(out: Path, config: Any, manifest: dict, progress: bool = True) -> dict:
    """Train, save and evaluate the oracle of the finished build in `out`; its manifest entry."""
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    data_dir, root, model_dir = out / "data", out / ORACLE, oracle_model_dir(out)
    resumed = (root / "train" / CHECKPOINT).is_file()
    texts, left_out = oracle_texts(make_world(config.world, config.seed), data_dir,
                                   config.world.qa_repeats)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "model")
    full = Trainer.one_pass(len(training_texts(data_dir, config.world.qa_repeats)), config.train)
    trainer = Trainer(config.model, config.train, texts, tokenizer, root / "train", data_dir,
                      config.seed, progress=progress, steps_per_epoch=full, label="oracle")
    log = trainer.train()
    trainer.model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    give_umask_mode(model_dir)  # safetensors writes 0600
    results = final_eval(model_dir, data_dir, root / "eval")
    return {
        "model_dir": f"{ORACLE}/model",
        "accuracy": accuracy(results),
        "steps": trainer.total_steps, "model_steps": manifest["counts"]["steps"],
        "training_texts": len(texts), "left_out": left_out,
        # how often it saw each of its texts, against the model's one pass per epoch
        "passes": round(trainer.total_steps * config.train.batch_size / len(texts), 2),
        "final_loss": log[-1]["loss"],
        "files": {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())},
        "build": {"seconds": round(time.perf_counter() - t0, 1),
                  "train_seconds": round(sum(r["seconds"] for r in log), 1), "resumed": resumed},
    }


def describe_oracle(manifest: dict) -> list[str]:
    """One line for `wmdp sandbox build`'s summary (none when the build has no oracle)."""
    oracle = manifest.get("oracle")
    if oracle is None:
        return []
    acc = {k: v["acc"] for k, v in oracle["accuracy"].items()}
    return [f"oracle (trained without the forget domains): forget {acc['sandbox_forget']:.3f}, "
            f"forget seen {acc['sandbox_forget_seen']:.3f}, general {acc['sandbox_general']:.3f}"
            f"; {oracle['steps']} steps (model: {oracle['model_steps']}), built in "
            f"{oracle['build']['seconds']:.0f} s"]

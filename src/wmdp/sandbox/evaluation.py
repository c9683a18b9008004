"""A finished sandbox model's evaluation, the same for the model (build.py) and the oracle
(oracle.py): every sandbox task, cloze and letter, on the saved model loaded the way users load it.

    results = final_eval(out / "model", out / "data", out / "eval")
    manifest["accuracy"] = accuracy(results)     # {task or group: {acc, acc_norm, n}}
"""

from __future__ import annotations

import shutil
from pathlib import Path

from wmdp.evaluate import EvalConfig, evaluate_model
from wmdp.models import load_model
from wmdp.tasks import Registry


def final_eval(model_dir: Path, data_dir: Path, eval_dir: Path) -> dict:
    """results.json's content; eval_dir holds it and the samples (an old one is replaced)."""
    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    shutil.rmtree(eval_dir, ignore_errors=True)
    config = EvalConfig(model=str(model_dir), data_dir=str(data_dir), dtype="float32",
                        device="cpu", batch_size=64)
    return evaluate_model(model, tokenizer, ["sandbox", "sandbox_letter"],
                          Registry.build(data_dir), config=config, output=eval_dir,
                          progress=False)


def accuracy(results: dict) -> dict[str, dict]:
    """The manifest's accuracy entry: acc, acc_norm and n of every task and group."""
    return {name: {k: r[k] for k in ("acc", "acc_norm", "n") if k in r}
            for part in ("groups", "results") for name, r in results[part].items()}


__all__ = ["final_eval", "accuracy"]

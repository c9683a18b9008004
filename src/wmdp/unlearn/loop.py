"""The training loop every unlearning method shares.

A method states only what is particular to it (which tensors it trains, its optimizer, its loss
on one forget/retain step); this loop owns the rest: the step schedule, progress, per-step
metrics (`metrics.jsonl`), checkpoints and resume, the NaN guard, saving the model, and the run
record (`unlearn_config.json`). Under torchrun or `accelerate launch` it shards the model with
FSDP and splits each batch over the processes (`wmdp.unlearn.parallel`); rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from wmdp.progress import tqdm

from wmdp.config import to_dict
from wmdp.data.corpus import Corpus, load_corpus
from wmdp.distributed import barrier, is_main, is_sharded, on_main, rank_world
from wmdp.errors import WmdpError
from wmdp.io import (atomic_write_text, give_umask_mode, keep_outputs_holding, library_versions,
                     prepare_output_dir, sha256_json, write_json)
from wmdp.model_spec import ModelSpec
from wmdp.models import TrainedTensor, check_model_source, input_device, resolve_device
from wmdp.layers import forward_to_layer
from wmdp.unlearn import parallel
from wmdp.unlearn.batches import Step, TopicBatches, tokenize, training_tokenizer
from wmdp.unlearn.tokenizer_check import tokenizer_record

RUN_RECORD = "run.json"        # written at the start: fingerprint of the settings, for resume
FINAL_RECORD = "unlearn_config.json"
CHECKPOINT = "checkpoints/last.pt"


@dataclass
class UnlearnConfig(ModelSpec):
    """Settings every method shares (the model fields are ModelSpec's). Method hyperparameters
    live in the method's own config."""

    output: str = ""                  # the unlearned model's directory
    forget_corpora: list[str] = field(default_factory=list)  # one per hazard topic
    retain_corpora: list[str] = field(default_factory=list)  # one per forget corpus
    batch_size: int = 4               # texts per forget (and per retain) batch
    max_num_batches: int = 150        # steps at most (zephyr's published run: 150)
    epochs: int = 1                   # passes over the schedule (the reference runs one)
    min_len: int = 0                  # texts of at most this many characters are dropped
    seed: int = 42
    checkpoint_every: int = 50        # steps between checkpoints (0: never)
    load: str = "auto"                # auto: only the blocks RMU runs (prefix) where that
                                      # applies, else the whole model; or prefix, full

    def fingerprint(self, method: str, hparams: Any) -> str:
        keep = {k: v for k, v in to_dict(self).items()
                if k not in ("output", "checkpoint_every", "device", "device_map", "load")}
        return sha256_json({"method": method, "config": keep, "hparams": to_dict(hparams)})


class Method(Protocol):
    """What an unlearning method provides to the loop.

    A one-shot method (no training steps, e.g. SSD) sets `one_shot = True` and provides
    `apply(progress) -> metrics` instead of `make_optimizer` and `loss`; the loop calls it once
    after `setup` and records its metrics as step 0.
    """

    name: str
    tensors: list[TrainedTensor]

    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches,
              seed: int) -> None: ...

    def make_optimizer(self) -> Any: ...

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def load_corpora(config: UnlearnConfig) -> tuple[list[Corpus], list[Corpus]]:
    forget = [load_corpus(s, config.min_len) for s in config.forget_corpora]
    retain = [load_corpus(s, config.min_len) for s in config.retain_corpora]
    return forget, retain


def unlearn_model(method: Method, model: nn.Module, tokenizer: Any, schedule: TopicBatches, *,
                  seed: int = 42, output: Path | None = None, checkpoint_every: int = 0,
                  progress: bool = True, device: str | None = None,
                  on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run `method` on an in-memory model; returns the per-step metrics.

    With `output`, metrics go to `output/metrics.jsonl` as they come, checkpoints to
    `output/checkpoints/`, and a run interrupted after a checkpoint resumes from it. In a
    process group of N > 1 (torchrun), the model is sharded with FSDP onto `device` (default:
    where it is) and each rank trains on its share of every batch; rank 0 alone writes.
    """
    many = rank_world()[1] > 1
    if many:
        parallel.check_method(method.name, None)
        parallel.check_shares(schedule)
        if not is_sharded(next(model.parameters())):
            parallel.shard_model(model, device or str(input_device(model)))
        schedule = parallel.RankShare(schedule)  # type: ignore[assignment]
    with parallel.training(many):
        return _run(method, model, tokenizer, schedule, seed, output, checkpoint_every,
                    progress and is_main(), on_step)


def _run(method: Method, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int,
         output: Path | None, checkpoint_every: int, progress: bool,
         on_step: Callable[[int, dict], None] | None) -> list[dict]:
    torch.manual_seed(seed)
    method.setup(model, tokenizer, schedule, seed)
    if getattr(method, "one_shot", False):
        row = _one_shot(method, output, progress)
        check_model_finite(model, tokenizer, method.tensors, schedule)
        return [row]
    optimizer = method.make_optimizer()
    start, history = 0, []
    ckpt = output / CHECKPOINT if output is not None else None
    if ckpt is not None and on_main(ckpt.is_file):
        start, history = _load_checkpoint(ckpt, method, optimizer, output, model)
    elif output is not None and is_main():  # steps logged by a run stopped before its first
        (output / "metrics.jsonl").unlink(missing_ok=True)  # checkpoint are run again
    bar = tqdm(total=len(schedule), initial=start, desc=f"unlearn ({method.name})",
               disable=not progress, unit="step")
    for idx in range(start, len(schedule)):
        step = schedule[idx]
        t0 = time.perf_counter()
        loss, metrics = method.loss(step)
        value, metrics = parallel.mean_over_ranks(loss.item(), metrics)  # the global figures
        check_finite(value, "loss", idx, metrics)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = {"step": idx, "topic": step.topic, "loss": value, **metrics,
               "seconds": round(time.perf_counter() - t0, 4)}
        history.append(row)
        if output is not None and is_main():
            with open(output / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix_str(_fmt(metrics))
        bar.update(1)
        if on_step is not None:
            on_step(idx, row)
        if ckpt is not None and checkpoint_every and (idx + 1) % checkpoint_every == 0 \
                and idx + 1 < len(schedule):
            _save_checkpoint(ckpt, idx + 1, method, optimizer, model)
        optimizer.zero_grad()  # free this step's gradients before the next forward
    bar.close()
    optimizer.zero_grad()
    check_model_finite(model, tokenizer, method.tensors, schedule)
    return history


@torch.no_grad()
def check_model_finite(model: nn.Module, tokenizer: Any, tensors: list[TrainedTensor],
                       schedule: TopicBatches) -> None:
    """The NaN guard's last word, before anything is saved: the last update can leave weights
    that are NaN, or finite but so large (lr 1e30) that the model's outputs overflow. So every
    trained tensor must be finite, and so must the logits on a text of the last step."""
    last = len(schedule) - 1
    for t in tensors:  # each rank checks its shard
        if not parallel.all_ranks(bool(torch.isfinite(parallel.local(t.view())).all())):
            raise WmdpError(f"after step {last}: {t.name} holds NaN or infinite values; "
                            "stopping without writing a model (lower the learning rate)")
    step = schedule[last]
    inputs = tokenize(training_tokenizer(tokenizer), [step.forget[0], step.retain[0]], 64,
                      input_device(model))
    prefix = getattr(model, "_wmdp_prefix", None)  # a prefix model stops at its last block
    out = (forward_to_layer(model, inputs, prefix) if prefix is not None
           else model(**inputs, use_cache=False).logits)
    if not parallel.all_ranks(bool(torch.isfinite(out).all())):
        raise WmdpError(f"after step {last}: the model's outputs are NaN or infinite; stopping "
                        "without writing a model (lower the learning rate)")


def _one_shot(method: Method, output: Path | None, progress: bool) -> dict:
    t0 = time.perf_counter()
    row = {"step": 0, **method.apply(progress), "seconds": round(time.perf_counter() - t0, 4)}
    if output is not None:
        atomic_write_text(output / "metrics.jsonl", json.dumps(row) + "\n")
    return row


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith("loss"))


def check_finite(value: float, what: str, step: int, metrics: dict[str, float]) -> None:
    """The NaN guard: a non-finite loss stops the run before any model is written (the loop
    checks each step's loss; a method checks a loss it steps on by itself, like SCRUB's max step)."""
    if not math.isfinite(value):
        raise WmdpError(f"step {step}: {what} is {value} ({_fmt(metrics)}); stopping without "
                        "writing a model (lower the learning rate or the coefficients)")


def _save_checkpoint(path: Path, next_step: int, method: Method, optimizer: Any,
                     model: nn.Module) -> None:
    """Whole tensors and optimizer state (gathered from the shards by every rank), so a run
    resumes on any number of processes; rank 0 writes."""
    with torch.no_grad():
        tensors = [parallel.full(t.view()).detach().cpu().clone() for t in method.tensors]
    state = {"next_step": next_step, "tensors": tensors,
             "optimizer": parallel.optimizer_state(model, optimizer), "method": method.state_dict(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    keep_outputs_holding(path)  # a later failure (a full disk at the end) keeps it to resume


def _load_checkpoint(path: Path, method: Method, optimizer: Any, output: Path,
                     model: nn.Module) -> tuple[int, list[dict]]:
    """Rank 0 reads the checkpoint (and drops the metrics of the steps after it); every rank
    takes its shard of the tensors and optimizer state."""
    state, history = on_main(lambda: _read_checkpoint(path, output))
    with torch.no_grad():
        for t, v in zip(method.tensors, state["tensors"]):
            t.view().copy_(parallel.like(v, t.view()))
    parallel.load_optimizer_state(model, optimizer, state["optimizer"])
    method.load_state_dict(state["method"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["next_step"]), history


def _read_checkpoint(path: Path, output: Path) -> tuple[dict, list[dict]]:
    try:  # weights_only: a malicious pickle is refused, a truncated file is unreadable
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"tensors", "optimizer", "method", "rng",
                                               "next_step"} <= state.keys():
            raise ValueError("not a wmdp unlearning checkpoint")
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch each raise their own
        import pickle

        refused = isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()
        reason = "it holds objects other than tensors, refused unread" if refused else \
            "truncated or damaged"
        raise WmdpError(f"{path}: cannot resume from this checkpoint ({reason}); delete it to "
                        "start over, or rerun with --overwrite") from None
    start = int(state["next_step"])
    history = []
    metrics = output / "metrics.jsonl"
    if metrics.is_file():  # drop steps after the checkpoint: they are run again
        history = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] < start]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in history))
    return state, history


def run_unlearning(method: Method, hparams: Any, config: UnlearnConfig, *,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """The `wmdp unlearn METHOD` command: load, unlearn, save a HF model directory."""
    if not config.output:
        raise WmdpError("no --output directory given")
    if not config.model:
        raise WmdpError("--model is required: a hub id or a local model directory (the "
                        "zephyr-7b, yi-34b and mixtral-8x7b presets name their model)")
    validate = getattr(method, "validate", None)
    if validate is not None:  # settings errors before anything is read or written
        validate(len(config.forget_corpora))
    if config.checkpoint_every < 0:
        raise WmdpError(f"checkpoint_every is {config.checkpoint_every}: give 0 (never) or a "
                        "positive number of steps")
    parallel.check_method(method.name, config.device_map)
    source = check_model_source(config.model)
    forget, retain = load_corpora(config)  # bad data fails before anything is written
    schedule = TopicBatches(forget, retain, config.batch_size, config.max_num_batches,
                            config.epochs)
    if rank_world()[1] > 1:  # every batch splits over the processes, checked on every rank
        parallel.check_shares(schedule)  # before rank 0 makes the output directory
    fingerprint = config.fingerprint(method.name, hparams)
    out = on_main(lambda: prepare_output_dir(  # rank 0 alone touches the directory
        Path(config.output).resolve(), overwrite, RUN_RECORD, fingerprint,
        inputs=[("--model", source)] + [("corpus", c.removeprefix("raw:"))
                                        for c in config.forget_corpora + config.retain_corpora]))
    if on_main((out / FINAL_RECORD).is_file):
        if is_main():
            print(f"wmdp: {out} holds this exact finished run; nothing to do", file=sys.stderr)
        return out
    fresh = not on_main((out / RUN_RECORD).is_file)
    try:
        _unlearn_into(out, method, hparams, config, fingerprint, (forget, retain, schedule),
                      progress)
    except WmdpError:
        if fresh and is_main():  # an input or settings error, or a NaN: leave nothing behind
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    barrier()  # every process returns once the model is on disk
    return out


def _unlearn_into(out: Path, method: Method, hparams: Any, config: UnlearnConfig,
                  fingerprint: str, data: tuple, progress: bool) -> None:
    forget, retain, schedule = data  # read and checked by run_unlearning
    record = {"fingerprint": fingerprint, "method": method.name, "config": to_dict(config),
              "hparams": to_dict(hparams), "num_steps": len(schedule),
              "corpora": {"forget": [c.record() for c in forget],
                          "retain": [c.record() for c in retain]},
              "versions": library_versions(), "world_size": rank_world()[1]}
    if is_main():
        write_json(out / RUN_RECORD, record)
    if hasattr(method, "prepare"):  # a run it needs first, into out/ (UNDO's teacher)
        config = method.prepare(config, out, progress)
    many = rank_world()[1] > 1  # each process maps the model on the CPU (shared page cache);
    # FSDP then keeps 1/N of it on the process's device (benchmarks/fsdp_memory.py)
    model, tokenizer, plan, record["load"] = _load(
        method, dataclasses.replace(config, device="cpu") if many else config)
    record["tokenizer"] = tokenizer_record(tokenizer, schedule)
    t0 = time.perf_counter()
    history = unlearn_model(method, model, tokenizer, schedule, seed=config.seed, output=out,
                            checkpoint_every=config.checkpoint_every, progress=progress,
                            device=resolve_device(config.device) if many else None)
    describe = getattr(method, "describe", None)
    final = {**record, "seconds": round(time.perf_counter() - t0, 2),
             "final_metrics": history[-1] if history else {},
             "trained_tensors": [t.name for t in method.tensors],
             **({"method_state": describe()} if describe else {})}
    if plan is None:
        save_model(model, tokenizer, out, final)
    else:
        from wmdp.prefix import save_prefix_model

        save_prefix_model(model, tokenizer, plan, out, {t.name: t.param for t in method.tensors})
        write_json(out / FINAL_RECORD, final)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


LOAD_PATHS = ("auto", "prefix", "full")


def _load(method: Method, config: UnlearnConfig) -> tuple[nn.Module, Any, Any, dict]:
    """The whole model, or only the blocks the method runs (`method.prefix_layer()`: RMU's
    layer_id), as `config.load` asks; returns (model, tokenizer, prefix plan or None, record)."""
    if config.load not in LOAD_PATHS:
        raise WmdpError(f"load {config.load!r} is not one of {', '.join(LOAD_PATHS)}")
    layer = getattr(method, "prefix_layer", lambda: None)()
    why = "load=full asked" if config.load == "full" else config.prefix_unavailable(layer)
    if why is not None and config.load == "prefix":
        raise WmdpError(f"load=prefix cannot be used: {why}")
    if why is None:
        model, tokenizer, plan = config.load_prefix(layer)
        return model, tokenizer, plan, plan.record()
    model, tokenizer = config.load_model()
    return model, tokenizer, None, {"path": "full", "why": why}


def save_model(model: nn.Module, tokenizer: Any, out: Path, record: dict) -> None:
    """Write the HF model files into `out` (through a temp dir), then the run record. A model
    sharded with FSDP is gathered (every rank calls this) and rank 0 writes it whole."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    sharded = is_sharded(next(model.parameters()))
    state = parallel.model_state(model) if sharded else None
    if not is_main():
        return
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if sharded:  # as its own class, not FSDP's subclass (config.json's "architectures")
        cls, model.__class__ = model.__class__, parallel.base_class(model)
        try:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        finally:
            model.__class__ = cls
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    give_umask_mode(tmp)  # safetensors writes 0600
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    write_json(out / FINAL_RECORD, record)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


__all__ = ["UnlearnConfig", "Method", "unlearn_model", "run_unlearning", "save_model",
           "load_corpora", "check_finite", "RUN_RECORD", "FINAL_RECORD"]

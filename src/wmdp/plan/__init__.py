"""`wmdp plan`: what fits where, from a model's config alone (nothing is downloaded but it).

    wmdp plan yi-34b                              # the Yi-34B preset: RMU at layer 15
    wmdp plan path/to/model --method ga --dtype bfloat16 --batch-size 4 --max-length 512
    wmdp plan mistralai/Mistral-7B-v0.1 --gpus 4 --gpu-memory 80GB --json

Each stage runs on the model's fake tensors (wmdp.plan.stages), measured by `PeakTracker`:
weights, copies of original values, gradients, optimizer state, activations and the total per
device. Verdicts: one GPU of each common size (or only the size `--gpu-memory` names) fits the stage
if the total plus `RESERVE_GIB` (the CUDA context and allocator slack, not in the measurement)
fits; otherwise the smallest N that fits, as `wmdp` would run it:
- full fine-tuning under torchrun (FSDP): the persistent part divided by N, and each process's
  activations those of its share of the global batch (ceil(B / N) of B texts), with N <= B, since
  `wmdp unlearn` and the relearning attack refuse to split a batch over more processes than texts;
- evaluation and RMU (device_map=auto): the persistent part divided by N, activations not
  (each device runs its layers for the whole batch);
- a method that does not run data-parallel (SSD): one device or nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from wmdp.errors import WmdpError
from wmdp.models import decoder_layers
from wmdp.plan.model import fake_model, resolve_config
from wmdp.plan.stages import Memory, Workload, baseline_memory, eval_memory, rmu_memory
from wmdp.unlearn.parallel import DATA_PARALLEL
from wmdp.unlearn.rmu import PRESETS, RMUConfig

GPU_SIZES_GIB = (24, 40, 48, 80, 141)
RESERVE_GIB = 1.0
METHODS = ("rmu", "ga", "graddiff", "npo", "llmu", "scrub", "ssd")
GIB = 1024 ** 3


def parse_gib(text: str) -> float:
    """'80GB', '80', '40 GiB' -> gibibytes (GPU sizes are sold in GiB while named GB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise WmdpError(f"--gpu-memory {text!r}: expected a size like 80GB")
    return float(m.group(1))


def _rmu_settings(preset: str | None, n_layers: int, layer_id: int | None) -> dict[str, Any]:
    rmu = dict(PRESETS[preset]["rmu"]) if preset else {}
    cfg = RMUConfig(**rmu)
    if layer_id is None and not preset and cfg.layer_id >= n_layers:
        layer_id = n_layers - 1  # a model shallower than the default's layer: its last block
    if layer_id is not None:
        cfg.layer_id, cfg.layer_ids = layer_id, [i for i in (layer_id - 2, layer_id - 1, layer_id)
                                                 if i >= 0]
    if not 0 <= cfg.layer_id < n_layers:
        raise WmdpError(f"--layer-id {cfg.layer_id} out of range: the model has {n_layers} layers")
    return {"layer_id": cfg.layer_id, "layer_ids": cfg.layer_ids, "alpha": cfg.alpha[0],
            "forget_length": max(cfg.forget_max_length), "retain_length": cfg.retain_max_length}


def stage_names(method: str | None) -> list[str]:
    methods = METHODS if method in (None, "all") else (method,)
    names = ["eval"]
    for m in methods:
        names += ["rmu (full load)", "rmu (prefix)"] if m == "rmu" else [m]
    if method in (None, "all"):
        names.append("relearn (full FT)")
    return names


def make_plan(source: str, *, method: str | None = None, dtype: str = "bfloat16",
              batch_size: int | None = None, max_length: int | None = None,
              layer_id: int | None = None, gpus: int = 1,
              gpu_memory: str | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict: the model, the workload, and per stage its memory."""
    if method not in (None, "all", *METHODS):
        raise WmdpError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if gpus < 1:
        raise WmdpError(f"--gpus {gpus}: expected at least 1")
    for name, v in (("--batch-size", batch_size), ("--max-length", max_length)):
        if v is not None and v < 1:
            raise WmdpError(f"{name} {v}: expected a positive number")
    config, preset = resolve_config(source)
    fake_mode, model = fake_model(config, dtype)
    n_layers = len(decoder_layers(model))
    rmu = _rmu_settings(preset, n_layers, layer_id)
    b = batch_size or (PRESETS[preset]["config"]["batch_size"] if preset else 4)
    work = Workload(b, max_length or 512)
    stages: dict[str, Memory] = {}
    for name in stage_names(method):
        _reset(model)
        if name == "eval":
            stages[name] = eval_memory(model, fake_mode, work)
        elif name.startswith("rmu"):
            rwork = Workload(b, max_length or rmu["forget_length"],
                             max_length or rmu["retain_length"])
            stages[name] = rmu_memory(model, fake_mode, rwork, rmu["layer_id"], rmu["layer_ids"],
                                      prefix=name == "rmu (prefix)", alpha=rmu["alpha"])
        else:
            stages[name] = baseline_memory(model, fake_mode, work,
                                           "relearn" if name.startswith("relearn") else name)
    sizes = [parse_gib(gpu_memory)] if gpu_memory else list(GPU_SIZES_GIB)
    return {"model": source, "model_type": config.model_type, "layers": n_layers,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype,
            "batch_size": b, "max_length": work.max_length, "rmu": rmu, "gpus": gpus,
            "gpu_memory_gib": parse_gib(gpu_memory) if gpu_memory else None,
            "reserve_gib": RESERVE_GIB,
            "stages": {n: _stage_record(n, m, sizes, gpus, b) for n, m in stages.items()}}


def _reset(model: Any) -> None:
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)


def sharding(name: str) -> str:
    """How `wmdp` spreads a stage over several GPUs."""
    if name == "eval" or name.startswith("rmu"):
        return "device_map=auto"
    method = name.split(" ")[0]
    return "FSDP" if method in (*DATA_PARALLEL, "relearn") else "one device"


def per_device_bytes(m: Memory, n: int, how: str, batch_size: int) -> float:
    """What one of n devices holds: the persistent part split n ways; under FSDP also the
    activations of its share of the global batch (ceil(B / n) of B texts)."""
    if how == "FSDP":
        return m.persistent / n + m.activations * -(-batch_size // n) / batch_size
    return m.persistent / n + m.activations


def shards_needed(m: Memory, gib: float, how: str = "device_map=auto", batch_size: int = 1,
                  limit: int = 64) -> int | None:
    """Smallest N whose per-device share plus the reserve fits one GPU of `gib` (None: no N
    does: FSDP splits a batch of B over at most B processes, one device runs SSD)."""
    top = 1 if how == "one device" else min(limit, batch_size) if how == "FSDP" else limit
    room = (gib - RESERVE_GIB) * GIB
    for n in range(1, top + 1):
        if per_device_bytes(m, n, how, batch_size) <= room:
            return n
    return None


def _stage_record(name: str, m: Memory, sizes: list[float], gpus: int,
                  batch_size: int) -> dict[str, Any]:
    how = sharding(name)
    n = 1 if how == "one device" else gpus
    return {"weights": m.weights, "copies": m.copies, "gradients": m.gradients,
            "optimizer": m.optimizer, "activations": m.activations, "total": m.total,
            "per_device": int(per_device_bytes(m, n, how, batch_size)), "sharding": how,
            "gpus_needed": {f"{s:g}": shards_needed(m, s, how, batch_size) for s in sizes}}


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a readable table (GiB)."""
    sizes = list(next(iter(plan["stages"].values()))["gpus_needed"])
    r = plan["rmu"]
    head = (f"{plan['model']} ({plan['model_type']}, {plan['layers']} layers, "
            f"{plan['parameters'] / 1e9:.2f}B parameters, {plan['dtype']}); batch "
            f"{plan['batch_size']} x {plan['max_length']} tokens; RMU layer_id {r['layer_id']} "
            f"(trains {r['layer_ids']}, forget/retain {r['forget_length']}/{r['retain_length']})")
    cols = ["stage", "weights", "copies", "grads", "optim", "activ", "total",
            f"per GPU (x{plan['gpus']})", *(f"{s}GB" for s in sizes), "sharding"]
    rows = []
    for name, s in plan["stages"].items():
        verdicts = ["fits" if s["gpus_needed"][k] == 1 else
                    (f"{s['gpus_needed'][k]} GPUs" if s["gpus_needed"][k] else "no") for k in sizes]
        rows.append([name, *(_gib(s[k]) for k in ("weights", "copies", "gradients", "optimizer",
                                                  "activations", "total", "per_device")),
                     *verdicts, s["sharding"]])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    lines = [head, "sizes in GiB; a GPU fits a stage when total + "
             f"{plan['reserve_gib']:g} GiB reserve fits; 'N GPUs': sharded over N", ""]
    for row in [cols, *rows]:
        lines.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def run_plan(args: Any) -> int:
    plan = make_plan(args.model, method=args.method, dtype=args.dtype, batch_size=args.batch_size,
                     max_length=args.max_length, layer_id=args.layer_id, gpus=args.gpus,
                     gpu_memory=args.gpu_memory)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


__all__ = ["make_plan", "format_plan", "run_plan", "Memory", "Workload", "GPU_SIZES_GIB"]

"""The one loader for models and tokenizers, and the tensors of a model named by role.

    model, tokenizer = load_model("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16")
    model, tokenizer = ModelSpec("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16").load_model()
    layers = decoder_layers(model)                      # nn.ModuleList of decoder blocks
    t = mlp_out_tensor(model, 7)                        # the MLP down-projection of layer 7

Weights load from safetensors only; `trust_remote_code` is off unless asked for. A checkpoint
whose tensors are not exactly the model's (one missing, renamed, extra or of another shape) is an
error naming them, unless `allow_mismatched_weights` (then the mismatched tensors are
initialised at random, and a warning names them).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wmdp.checkpoint import checkpoint_tensors, one_line
from wmdp.errors import WmdpError

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32}


@dataclass(frozen=True)
class Arch:
    layers: str   # attribute path from the CausalLM to the decoder blocks
    mlp_out: str  # attribute path from one block to its MLP output projection


# Decoder blocks and the MLP output projection ("down_proj" in Llama's words) by model_type.
ARCHS: dict[str, Arch] = {
    **{t: Arch("model.layers", "mlp.down_proj") for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
        "olmo", "olmo2", "cohere", "granite", "stablelm", "smollm3", "ministral")},
    "mixtral": Arch("model.layers", "mlp.experts"),  # expert 0's w3 (up projection), below
    "gpt2": Arch("transformer.h", "mlp.c_proj"),
    "gpt_neox": Arch("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "gptj": Arch("transformer.h", "mlp.fc_out"),
    "phi": Arch("model.layers", "mlp.fc2"),
    "falcon": Arch("transformer.h", "mlp.dense_4h_to_h"),
    "opt": Arch("model.decoder.layers", "fc2"),
}


@dataclass(frozen=True)
class TrainedTensor:
    """A weight to train, or a slice of one (Mixtral's experts are stored fused)."""

    name: str                      # e.g. "model.layers.7.mlp.down_proj.weight"
    param: nn.Parameter
    index: tuple | None = None     # slice of `param` that is trained; None for all of it

    def view(self) -> torch.Tensor:
        return self.param if self.index is None else self.param[self.index]


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def arch_of(model: nn.Module) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise WmdpError(f"model type {model_type!r} is not known to wmdp: its decoder layers and "
                        f"MLP tensors cannot be named (known: {', '.join(sorted(ARCHS))})")
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, in order."""
    return _get(model, arch_of(model).layers)


def mlp_out_tensor(model: nn.Module, layer_id: int) -> TrainedTensor:
    """The MLP output projection of block `layer_id`: the tensor RMU trains.

    Mixtral: expert 0's w3 (its up projection), as the reference code trains; transformers 5
    stores the experts fused (`gate_up_proj[e]` = [w1; w3]), older releases one module each.
    """
    arch = arch_of(model)
    layers = _get(model, arch.layers)
    if not 0 <= layer_id < len(layers):
        raise WmdpError(f"layer {layer_id} out of range: the model has {len(layers)} decoder layers")
    prefix = f"{arch.layers}.{layer_id}.{arch.mlp_out}"
    module = _get(layers[layer_id], arch.mlp_out)
    if model.config.model_type == "mixtral":
        if hasattr(module, "gate_up_proj"):
            inter = module.gate_up_proj.shape[1] // 2
            return TrainedTensor(f"{prefix}.gate_up_proj", module.gate_up_proj,
                                 (0, slice(inter, 2 * inter)))
        return TrainedTensor(f"{prefix}.0.w3.weight", module[0].w3.weight)
    return TrainedTensor(f"{prefix}.weight", module.weight)


PARAM_ROLES = ("mlp_out", "mlp", "layers", "all")


def select_tensors(model: nn.Module, role: str, layer_ids: list[int]) -> list[TrainedTensor]:
    """The tensors to train, by role, in blocks `layer_ids` (empty: every block):

    `mlp_out` the MLP output projections (RMU's choice), `mlp` every weight of the blocks' MLPs,
    `layers` every parameter of the blocks, `all` every parameter of the model (no layer_ids).
    """
    if role not in PARAM_ROLES:
        raise WmdpError(f"params {role!r} is not one of {', '.join(PARAM_ROLES)}")
    if role == "all":
        if layer_ids:
            raise WmdpError(f"layer_ids {layer_ids} given with params=all; use params=layers, "
                            "mlp or mlp_out to train only those blocks")
        return [TrainedTensor(n, p) for n, p in model.named_parameters()]
    arch = arch_of(model)
    layers = _get(model, arch.layers)
    ids = list(layer_ids) if layer_ids else list(range(len(layers)))
    bad = [i for i in ids if not 0 <= i < len(layers)]
    if bad:
        raise WmdpError(f"layer_ids {bad} out of range: the model has {len(layers)} layers")
    if role == "mlp_out":
        return [mlp_out_tensor(model, i) for i in ids]
    sub = arch.mlp_out.rpartition(".")[0] if role == "mlp" else ""
    if role == "mlp" and not sub:
        raise WmdpError(f"params=mlp: the MLP of model type {model.config.model_type!r} is not "
                        "one module; use params=layers or mlp_out")
    return [TrainedTensor(f"{arch.layers}.{i}.{sub + '.' if sub else ''}{n}", p) for i in ids
            for n, p in (_get(layers[i], sub) if sub else layers[i]).named_parameters()]


def train_only(model: nn.Module, role: str, layer_ids: list[int]) -> list[TrainedTensor]:
    """Freeze the model but the tensors `select_tensors` names, which it returns: no graph is
    built for anything else (nothing below the first trained block, for RMU)."""
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = select_tensors(model, role, layer_ids)
    for t in tensors:
        t.param.requires_grad_(True)
    return tensors


def model_max_length(model: nn.Module, tokenizer: Any, default: int = 2048) -> int:
    """The context length lm-eval uses: the model config's, else the tokenizer's, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value and value < 1e9:
        return int(value)
    return default


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (differs from model.device under sharding)."""
    return model.get_input_embeddings().weight.device


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str) -> str:
    """`device` made concrete: auto is the GPU when there is one (torchrun: its rank's)."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise WmdpError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise WmdpError(f"device {device!r} asked for, but no CUDA device is available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise WmdpError(f"device {device!r} asked for, but MPS is not available")
    return device


def _looks_local(name: str) -> bool:
    """A path, not a hub id ("org/name" or "name")."""
    return Path(name).expanduser().exists() or name.startswith((".", "~", os.sep)) \
        or name.count("/") > 1


def check_model_source(name_or_path: str | Path) -> str:
    """Fail fast, before any data loads, on a local model path that cannot be a model."""
    name = str(name_or_path)
    if not _looks_local(name):
        return name  # a hub id: checked when it loads
    path = Path(name).expanduser()
    if not path.is_dir():
        raise WmdpError(f"{name}: model directory not found")
    if not (path / "config.json").is_file():
        raise WmdpError(f"{name}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise WmdpError(f"{name}: no .safetensors weights (pickled weights are not loaded; "
                        "convert them with save_pretrained(safe_serialization=True))")
    return str(path)


def load_tokenizer(name_or_path: str, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; show one line
        raise load_error(name_or_path, "tokenizer", e) from e


def load_model(name_or_path: str | Path, *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", device_map: str | None = None,
               trust_remote_code: bool = False,
               allow_mismatched_weights: bool = False) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a hub id or a local directory, in eval mode.

    A local checkpoint's files are checked first (`wmdp.checkpoint`); then every tensor of the
    model must come from the checkpoint with its shape, and every checkpoint tensor must be the
    model's, unless `allow_mismatched_weights`.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise WmdpError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    name = check_model_source(name_or_path)
    target = resolve_device(device) if not device_map else None
    if Path(name).is_dir():
        checkpoint_tensors(Path(name))  # truncated or malformed files, before transformers
    kwargs: dict[str, Any] = dict(revision=revision, dtype=DTYPES[dtype], use_safetensors=True,
                                  trust_remote_code=trust_remote_code, output_loading_info=True,
                                  ignore_mismatched_sizes=True)  # mismatches: ours to report
    if device_map:
        kwargs["device_map"] = device_map
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report: what it says is checked below
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; show one line
        raise load_error(name, "model", e) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not allow_mismatched_weights:
        check_loading_info(name, info)
    elif problems := loading_problems(info):  # asked for: it loads, saying what is random
        print(f"wmdp: warning: {name}: loaded although the checkpoint's tensors do not match "
              f"the model: {problems}; those tensors are random", file=sys.stderr)
    if target is not None:
        model.to(target)
    model.eval()
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    return model, tokenizer


def load_error(name: str | Path, what: str, e: BaseException) -> WmdpError:
    """A loader's exception as one line; a config that needs the model's own code says how to
    allow it (transformers' message runs over several lines)."""
    if "trust_remote_code" in str(e):
        return WmdpError(f"{name}: the model needs code shipped with it to load; pass "
                         "--trust-remote-code (trust_remote_code: true) if you trust its source")
    return WmdpError(f"{name}: cannot load {what}: {one_line(e)}")


def check_loading_info(name: str, info: dict) -> None:
    """transformers' loading info (`output_loading_info=True`) as one error, naming the tensors
    the checkpoint lacks, has beyond the model, or holds in another shape."""
    problems = loading_problems(info)
    if problems:
        raise WmdpError(f"{name}: the checkpoint's tensors do not match the model its config "
                        f"describes: {problems}; set allow_mismatched_weights to "
                        "load it anyway (mismatched tensors are then random)")


def loading_problems(info: dict) -> str:
    """The tensors the checkpoint lacks, has beyond the model, or holds in another shape ("":
    none), from transformers' loading info."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint"),
                      ("unexpected_keys", "in the checkpoint but not in the model")):
        names = sorted(info.get(key) or ())
        if names:
            problems.append(f"{len(names)} {what} ({_some(names)})")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = [f"{n} {list(ckpt)} vs the model's {list(model)}" for n, ckpt, model in mismatched]
        problems.append(f"{len(mismatched)} of another shape ({_some(shapes)})")
    return "; ".join(problems)


def _some(names: list[str], shown: int = 3) -> str:
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

"""The one loader for models and tokenizers, and the tensors of a model named by role.

    model, tokenizer = load_model("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16")
    model, tokenizer = ModelSpec("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16").load_model()
    layers = decoder_layers(model)                      # nn.ModuleList of decoder blocks
    t = mlp_out_tensor(model, 7)                        # the MLP down-projection of layer 7

Weights load from safetensors only; `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wmdp.errors import WmdpError
from wmdp.model_spec import ModelSpec  # noqa: F401 - re-exported: the configs' model part

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


def resolve_device(device: str) -> str:
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WmdpError(f"device {device!r} asked for, but no CUDA device is available")
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
        raise WmdpError(f"{name_or_path}: cannot load tokenizer: {_one_line(e)}") from e


def load_model(name_or_path: str | Path, *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", device_map: str | None = None,
               trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a hub id or a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise WmdpError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    name = check_model_source(name_or_path)
    kwargs: dict[str, Any] = dict(revision=revision, dtype=DTYPES[dtype], use_safetensors=True,
                                  trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise WmdpError(f"{name}: cannot load model: {_one_line(e)}") from e
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    return model, tokenizer


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]

"""Load only the first blocks of a causal LM, and write a whole model directory back.

    model, tokenizer, plan = load_prefix("path/or/hub-id", layer_id=7, dtype="bfloat16")
    ...                                        # RMU trains tensors of blocks <= layer_id
    save_prefix_model(model, tokenizer, plan, "out/", record)

RMU's every forward stops after block `layer_id` (wmdp.layers), so neither the blocks above it
nor the final norm and LM head ever run. Here the model skeleton is built on the meta device
(`accelerate.init_empty_weights`), truncated to blocks 0..layer_id, and only the tensors those
need (embeddings, the blocks, and buffers such as rotary frequencies, which are built for real)
are read from the safetensors shards; the rest stays on meta, taking no memory. A tensor kept in
the checkpoint's dtype on the CPU is a copy-on-write view of its bytes in the shard, memory-mapped
as the full path's loader maps them: only the pages a forward touches are ever read (an
embedding's rows that no text uses cost nothing), and an update writes a private copy of the
page, never the file. Otherwise (another dtype or device) each tensor goes straight from the map
to its converted or device copy, one tensor at a time, and Mixtral's per-expert tensors are
copied straight into their fused tensor (no per-expert temporaries).
A model whose prefix fits on one device is unlearned there, whatever its size.

Writing the output: every shard is copied byte for byte (not hard-linked: see `_copy`), then the
trained tensors' bytes are written in place in the copy (same dtype and shape, so the same
layout); a dtype conversion, if asked, rewrites every shard instead, as save_pretrained would. The
index, config and generation config are copied; the tokenizer is saved as the full path saves it.
The input directory is never written to.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wmdp.checkpoint import INDEX, checkpoint_tensors, one_line, read_header, weight_map
from wmdp.errors import WmdpError
from wmdp.io import give_umask_mode
from wmdp.models import DTYPES, arch_of, check_loading_info, check_model_source, load_error, \
    load_tokenizer, resolve_device


@dataclass
class PrefixPlan:
    """Where each checkpoint tensor lives, and what the prefix model holds."""

    source: Path                      # the local model directory (a hub snapshot for hub ids)
    layer_id: int
    weight_map: dict[str, str]        # tensor name -> shard file name
    dtype: torch.dtype | None         # the requested dtype (None: the checkpoint's own)
    loaded: list[str] = field(default_factory=list)   # tensor names read into the prefix

    def record(self) -> dict:
        shards = sorted(set(self.weight_map.values()))
        return {"path": "prefix", "layer_id": self.layer_id, "tensors_loaded": len(self.loaded),
                "tensors_in_checkpoint": len(self.weight_map), "shards": len(shards)}


# safetensors' dtype names; the format stores little-endian bytes (as x86 and Arm hosts do)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def map_shard(path: Path) -> np.ndarray | None:
    """The shard's bytes, memory-mapped copy-on-write (None where the file cannot be mapped: the
    tensors are then read into memory)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError):
        return None


def read_tensor(path: Path, start: int, info: dict,
                mapping: np.ndarray | None = None) -> torch.Tensor:
    """One tensor: a view of its bytes in `mapping` (the shard mapped by `map_shard`) where they
    are aligned for its dtype, else plain reads into its own buffer."""
    b, e = info["data_offsets"]
    dtype = ST_DTYPES[info["dtype"]]
    if e == b:
        return torch.empty(info["shape"], dtype=dtype)
    if mapping is not None and (start + b) % dtype.itemsize == 0:  # the map is page-aligned
        return torch.from_numpy(mapping[start + b:start + e]).view(dtype).reshape(info["shape"])
    buf = bytearray(e - b)
    with open(path, "rb") as f:
        f.seek(start + b)
        f.readinto(buf)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def local_snapshot(name_or_path: str, revision: str | None) -> Path:
    """A local directory for the model: the path itself, or the hub snapshot (every safetensors
    shard is needed for the output, but only the prefix's tensors are ever read into memory)."""
    name = check_model_source(name_or_path)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo alike
        raise WmdpError(f"{name}: cannot download the model files: {one_line(e)}") from e


def prefix_unavailable(source: Path, layer_id: int,
                       trust_remote_code: bool = False) -> str | None:
    """Why the prefix path cannot load this checkpoint (None: it can). The checkpoint's tensor
    names must be the model's own (transformers 5 renames some on load, e.g. Mixtral's
    per-expert tensors, which then need the full path)."""
    config, model = _empty_model(source, trust_remote_code)
    names = set(weight_map(source))
    missing = [n for n in _needed(model, layer_id)
               if not all(c in names for c in checkpoint_names(config, n))]
    if missing:
        return (f"{len(missing)} tensors the model names are not in the checkpoint under those "
                f"names (e.g. {missing[0]}): loaded whole")
    return None


def _empty_model(source: Path, trust_remote_code: bool,
                 dtype: torch.dtype | None = None) -> tuple[Any, nn.Module]:
    """The config and the model skeleton on the meta device (buffers such as rotary frequencies
    are built for real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code,
                dtype=dtype or _checkpoint_dtype(config))
    except Exception as e:  # noqa: BLE001 - transformers raises many types; show one line
        raise load_error(source, "model", e) from e
    return config, model


def check_prefix_weights(model: nn.Module, config: Any, source: Path, layer_id: int) -> None:
    """The checkpoint holds the model's tensors, in their shapes: what the full loader checks
    through transformers' loading info, here from the shards' headers, for what the prefix path
    owns: every decoder block's tensors (a block renamed, missing or beyond the config's layer
    count) and the tensors it reads. Outside the blocks transformers renames some on load
    (GPT-NeoX's embed_out is lm_head); the head is never read here, and is copied as it is."""
    tensors = checkpoint_tensors(source)
    blocks = arch_of(model).layers + "."
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    needed = set(_needed(model, layer_id))
    expected: set[str] = set()
    missing, mismatched = set(), set()
    for name, value in model.state_dict().items():
        sources = checkpoint_names(config, name)
        expected.update(sources)
        absent = [c for c in sources if c not in tensors]
        if absent and name not in tied and (name.startswith(blocks) or name in needed):
            missing.update(absent)
        elif len(sources) == 1 and not absent and list(value.shape) != tensors[sources[0]][1]:
            mismatched.add((sources[0], tuple(tensors[sources[0]][1]), tuple(value.shape)))
    ignored = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    ignored.append(re.compile(r"rotary_emb\.inv_freq|(^|\.)position_ids$"))
    unexpected = {n for n in tensors if n.startswith(blocks) and n not in expected
                  and not any(p.search(n) for p in ignored)}
    check_loading_info(str(source), {"missing_keys": missing, "unexpected_keys": unexpected,
                                     "mismatched_keys": mismatched})


def checkpoint_names(config: Any, name: str) -> list[str]:
    """The checkpoint tensors that make the model's tensor `name`: itself, except where
    transformers 5 fuses on load what checkpoints store apart (Mixtral's experts: the hub's and
    save_pretrained's layout is `block_sparse_moe.experts.E.w1/w2/w3`; the model holds
    `mlp.experts.gate_up_proj[E] = [w1; w3]` and `mlp.experts.down_proj[E] = w2`)."""
    if config.model_type != "mixtral" or ".mlp." not in name:
        return [name]
    base, _, leaf = name.partition(".mlp.")
    moe, n = f"{base}.block_sparse_moe", config.num_local_experts
    if leaf == "experts.gate_up_proj":
        return [f"{moe}.experts.{e}.{w}.weight" for e in range(n) for w in ("w1", "w3")]
    if leaf == "experts.down_proj":
        return [f"{moe}.experts.{e}.w2.weight" for e in range(n)]
    return [f"{moe}.{leaf}"]


def _merge(sources: list[str], tensors: list[torch.Tensor],
           dtype: torch.dtype | None) -> torch.Tensor:
    """The model tensor from its checkpoint tensors, in `dtype` (None: theirs): each copied (and
    converted) straight into its place, so no per-expert temporaries are made."""
    if len(tensors) == 1:
        return tensors[0]
    first = tensors[0]
    if sources[0].endswith(".w1.weight"):  # (E, 2I, d): each expert's [w1; w3]
        rows = first.shape[0]
        out = torch.empty(len(tensors) // 2, 2 * rows, *first.shape[1:], dtype=dtype or first.dtype)
        for i, t in enumerate(tensors):
            out[i // 2, (i % 2) * rows:(i % 2 + 1) * rows].copy_(t)
        return out
    out = torch.empty(len(tensors), *first.shape, dtype=dtype or first.dtype)  # (E, d, I): w2s
    for i, t in enumerate(tensors):
        out[i].copy_(t)
    return out


def _split(sources: list[str], value: torch.Tensor) -> dict[str, torch.Tensor]:
    """`_merge` undone: the checkpoint tensors of a model tensor's value."""
    if len(sources) == 1:
        return {sources[0]: value}
    if sources[0].endswith(".w1.weight"):
        inter = value.shape[1] // 2
        parts = [p for e in range(value.shape[0]) for p in (value[e, :inter], value[e, inter:])]
    else:
        parts = list(value)
    return dict(zip(sources, parts))


def _needed(model: nn.Module, layer_id: int) -> list[str]:
    """Parameter and persistent buffer names the prefix (blocks 0..layer_id) uses."""
    layers_path = arch_of(model).layers
    keep = []
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(layers_path + "."):
            if int(name[len(layers_path) + 1:].split(".")[0]) > layer_id:
                continue
        elif not _is_input_side(model, name):
            continue
        keep.append(name)
    persistent = set(model.state_dict())
    return [n for n in keep if n in persistent]


def _is_input_side(model: nn.Module, name: str) -> bool:
    """Outside the blocks, a tensor the prefix needs: the embeddings (token, and learned
    positions), not the final norm or the LM head."""
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.Embedding) and module is not model.get_output_embeddings()


def load_prefix(name_or_path: str, layer_id: int, *, revision: str | None = None,
                dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                allow_mismatched_weights: bool = False) -> tuple[nn.Module, Any, PrefixPlan]:
    """The model with blocks 0..layer_id (and embeddings) loaded, the rest on meta; the
    checkpoint must hold exactly the model's tensors unless `allow_mismatched_weights`."""
    if dtype not in DTYPES:
        raise WmdpError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    source = local_snapshot(str(name_or_path), revision)
    target = DTYPES[dtype] if dtype != "auto" else None
    config, model = _empty_model(source, trust_remote_code, target)
    if not allow_mismatched_weights:  # first: a config that miscounts the layers says so
        check_prefix_weights(model, config, source, layer_id)
    layers = model.get_submodule(arch_of(model).layers)
    if not 0 <= layer_id < len(layers):
        raise WmdpError(f"layer_id {layer_id} out of range: the model has {len(layers)} layers")
    plan = PrefixPlan(source, layer_id, weight_map(source), target)
    needed = _needed(model, layer_id)
    _read_prefix(model, config, plan, needed, dev)
    _move_buffers(model, dev)
    del layers[layer_id + 1:]  # never run; their meta tensors need no memory either way
    model.eval()
    model._wmdp_prefix = layer_id  # the loop's final check stops here too
    return model, load_tokenizer(str(source), None, trust_remote_code), plan


def _read_prefix(model: nn.Module, config: Any, plan: PrefixPlan, needed: list[str],
                 dev: str) -> None:
    """Each needed tensor from the shards into the model, one at a time. A tensor kept as it is
    stays a view of the shard's map (which its storage keeps open); the maps of shards none of
    whose tensors stay are closed when this returns."""
    from accelerate.utils import set_module_tensor_to_device

    shards = {}
    for shard in set(plan.weight_map.values()):
        start, header = read_header(plan.source / shard)
        shards[shard] = (start, header, map_shard(plan.source / shard))
    for name in needed:
        sources = checkpoint_names(config, name)
        tensors = []
        for c in sources:
            if c not in plan.weight_map:
                raise WmdpError(f"{plan.source}: tensor {c} is not in the checkpoint")
            start, header, mapping = shards[plan.weight_map[c]]
            tensors.append(read_tensor(plan.source / plan.weight_map[c], start, header[c], mapping))
        value = _merge(sources, tensors, plan.dtype)
        set_module_tensor_to_device(model, name, dev, value=value, dtype=plan.dtype or value.dtype)
        plan.loaded.append(name)
        del value, tensors


def _checkpoint_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _move_buffers(model: nn.Module, device: str) -> None:
    """Non-persistent buffers (rotary inv_freq) were built on the CPU: move them with the model."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta" and str(buf.device) != device:
                module._buffers[name] = buf.to(device)


def save_prefix_model(model: nn.Module, tokenizer: Any, plan: PrefixPlan, out: Path,
                      trained: dict[str, torch.Tensor]) -> None:
    """A complete HF model directory in `out`: the checkpoint with `trained` (name -> tensor)
    replaced, written through a temp dir and renamed into place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    trained = {c: v for name, value in trained.items()
               for c, v in _split(checkpoint_names(model.config, name), value).items()}
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, list[str]] = {}
    for name, shard in plan.weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in sorted(shards.items()):
        src = plan.source / shard
        start, header = read_header(src)
        if plan.dtype is None or all(header[n]["dtype"] == _st_dtype(plan.dtype) for n in names):
            _copy(src, tmp / shard)  # then the trained tensors' bytes, in place in the copy
            _patch(tmp / shard, start, header, {n: trained[n] for n in names if n in trained})
            continue
        with safe_open(src, framework="pt", device="cpu") as f:  # a dtype change: rewrite
            metadata = f.metadata()
            tensors = {}
            for n in names:
                t = trained[n].detach().to("cpu") if n in trained else f.get_tensor(n)
                tensors[n] = t.to(plan.dtype).contiguous()
        save_file(tensors, tmp / shard, metadata=metadata or {"format": "pt"})
    for extra in (INDEX, "config.json", "generation_config.json"):
        if (plan.source / extra).is_file():
            shutil.copyfile(plan.source / extra, tmp / extra)
    if plan.dtype is not None:  # the config says the dtype the tensors now have
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(plan.dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save_pretrained(tmp)
    give_umask_mode(tmp)  # safetensors writes 0600
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def _patch(path: Path, start: int, header: dict, values: dict[str, torch.Tensor]) -> None:
    """Overwrite tensors' bytes in a safetensors file of ours (same dtype and shape: the layout,
    and so the header, stays), one tensor in memory at a time."""
    if not values:
        return
    with open(path, "r+b") as f:
        for name, value in values.items():
            info = header[name]
            t = value.detach().to("cpu").contiguous()
            if list(t.shape) != info["shape"] or _st_dtype(t.dtype) != info["dtype"]:
                raise WmdpError(f"{path}: trained {name} is {t.dtype} {list(t.shape)}, the "
                                f"checkpoint's {info['dtype']} {info['shape']}")
            f.seek(start + info["data_offsets"][0])
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # its own bytes, no copy


def _st_dtype(dtype: torch.dtype) -> str:
    return {v: k for k, v in ST_DTYPES.items()}[dtype]


def _copy(src: Path, dst: Path) -> None:
    """A byte copy (in-kernel on Linux). Not a hard link: a later in-place write to the output
    (save_pretrained opens files for writing) would then write into the input model."""
    shutil.copyfile(src, dst)

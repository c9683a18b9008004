"""A model's config from a directory, a hub id or a preset, and the model built from it with
fake tensors: shapes, dtypes and storage sizes, no memory and no download of weights.

    config, preset = resolve_config("yi-34b")          # the shipped Yi-34B config, RMU at 15
    fake_mode, model = fake_model(config, "bfloat16")

Fake tensors (torch's FakeTensorMode) rather than bare meta tensors: they are meta storage with a
device, so transformers' mask code takes its tracing path instead of reading values, and
attention dispatches to the fused kernel the device would run (meta would pick the math kernel,
which keeps a T x T matrix). Mixture-of-experts models run transformers' grouped-GEMM experts
(static shapes; the per-expert loop needs values), whose memory is the loop's: each token's
top-k experts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from wmdp.errors import WmdpError
from wmdp.models import DTYPES
from wmdp.unlearn.rmu import PRESETS

# wmdp presets -> the shipped config of the model they name (offline planning)
PRESET_CONFIGS = {"zephyr-7b": "zephyr-7b", "yi-34b": "yi-34b", "mixtral-8x7b": "mixtral-8x7b"}


def shipped_configs() -> dict[str, Path]:
    """Name -> path of the configs in wmdp/resources/model_configs (published dimensions)."""
    folder = resources.files("wmdp") / "resources" / "model_configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def _from_dict(data: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise WmdpError(f"{where}: no model_type in the config")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (KeyError, ValueError) as e:
        raise WmdpError(f"{where}: model_type {model_type!r} is not known to transformers") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WmdpError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e


def resolve_config(source: str) -> tuple[Any, str | None]:
    """The transformers config `source` names, and the RMU preset it is, if any."""
    shipped = shipped_configs()
    if source in PRESET_CONFIGS:
        return _from_dict(_read_json(shipped[PRESET_CONFIGS[source]]), source), source
    if source in shipped:
        return _from_dict(_read_json(shipped[source]), source), None
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WmdpError(f"{source}: not a model directory (no config.json)")
        return _from_dict(_read_json(path / "config.json"), str(path / "config.json")), None
    if path.suffix == ".json":
        if not path.is_file():
            raise WmdpError(f"{source}: file not found")
        return _from_dict(_read_json(path), str(path)), None
    if source.count("/") == 1 and not path.exists():  # a hub id: only its config.json is read
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source), None
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise WmdpError(f"{source}: cannot read the hub config: {first}") from e
    known = ", ".join(sorted({*PRESETS, *shipped} - {"sandbox"}))
    raise WmdpError(f"{source}: not a model directory, config file, hub id or preset "
                    f"(presets and shipped configs: {known})")


def fake_model(config: Any, dtype: str) -> tuple[Any, torch.nn.Module]:
    """The causal LM of `config` in `dtype`, every tensor fake (on the CPU device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES or dtype == "auto":
        raise WmdpError(f"dtype {dtype!r} is not one of bfloat16, float16, float32")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": "sdpa"}
    if getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0):
        if dtype != "bfloat16":
            raise WmdpError("mixture-of-experts models are planned in bfloat16 only "
                            "(torch's grouped GEMM, which the plan runs, takes bfloat16)")
        kwargs["experts_implementation"] = "grouped_mm"
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        try:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        except ValueError as e:
            raise WmdpError(f"cannot build a causal LM from this config: {e}") from e
    model.eval()
    return fake_mode, model

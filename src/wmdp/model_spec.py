"""The model part of every config: where a model comes from and how it loads.

    spec = ModelSpec("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16")
    model, tokenizer = spec.load_model()               # the whole model
    prefix, tokenizer, plan = spec.load_prefix(7)      # only blocks 0..7 (what RMU runs)

Torch-free on import, so configs (and the CLI) can use it without loading torch: the loaders
(wmdp.models, wmdp.prefix, which import torch) are imported when a model loads. Neither imports
this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from wmdp.errors import WmdpError

DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")  # wmdp.models.DTYPES' keys
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class ModelSpec:
    """Where a model comes from and how it loads: the fields every command shares.

    EvalConfig, ChatEvalConfig, UnlearnConfig, AuditConfig and RunConfig inherit these, so a
    YAML key or `--flag` means the same everywhere; a config may override a default (eval's
    `model` is "<in-memory>" for a model passed in code).
    """

    model: str = ""                   # hub id or local directory; never written to
    revision: str | None = None       # hub branch, tag or commit of the model (None: main)
    dtype: str = "auto"               # auto (the checkpoint's), bfloat16, float16 or float32
    device: str = "auto"              # auto: the GPU when there is one (torchrun: its rank's)
    device_map: str | None = None     # e.g. auto: shard the model over the visible GPUs
    trust_remote_code: bool = False   # run code shipped with the model (off unless asked)
    allow_mismatched_weights: bool = False  # load tensors missing, extra or misshapen (random)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise WmdpError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise WmdpError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")

    def model_spec(self, **changes: Any) -> "ModelSpec":
        """These fields alone (a config's model part), with `changes` applied."""
        own = {f.name: getattr(self, f.name) for f in fields(ModelSpec)}
        return ModelSpec(**{**own, **changes})

    def load_model(self) -> tuple[Any, Any]:
        """The whole model and its tokenizer, in eval mode."""
        from wmdp.models import load_model

        return load_model(self.model, revision=self.revision, dtype=self.dtype,
                          device=self.device, device_map=self.device_map,
                          trust_remote_code=self.trust_remote_code,
                          allow_mismatched_weights=self.allow_mismatched_weights)

    def load_prefix(self, layer_id: int) -> tuple[Any, Any, Any]:
        """Only the embeddings and blocks 0..layer_id (what RMU runs), read from the shards;
        returns (model, tokenizer, plan), the plan writing the complete model back out."""
        from wmdp.prefix import load_prefix

        return load_prefix(self.model, layer_id, revision=self.revision, dtype=self.dtype,
                           device=self.device, trust_remote_code=self.trust_remote_code,
                           allow_mismatched_weights=self.allow_mismatched_weights)

    def prefix_unavailable(self, layer_id: int | None) -> str | None:
        """Why the prefix path cannot load this model up to `layer_id` (None: it can)."""
        if layer_id is None:
            return "the method runs the whole model"
        if self.device_map:
            return "device_map shards the whole model"
        from wmdp.prefix import local_snapshot, prefix_unavailable

        return prefix_unavailable(local_snapshot(self.model, self.revision), layer_id,
                                  self.trust_remote_code)

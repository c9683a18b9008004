"""The oracle in the audit: a model that never learned the forget domains, fine-tuned by the
relearning attack and the protocol the same way as the audited models (the floor).

    found = audit_oracle(ctx, config.relearn)   # its directory, or None
    model, tokenizer = load_oracle(ctx, found)

Found unless set: `<build>/oracle/model` beside a sandbox base model (`<build>/model`), as
`wmdp sandbox build` leaves it; `config.oracle` names another, or "none" for without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wmdp.audit.common import AuditContext
from wmdp.models import load_model
from wmdp.sandbox.oracle import oracle_model_dir


def find_oracle(config: Any, base_source: str) -> str | None:
    """The oracle's directory: the one set (`config.oracle`; "none": without one), or a sandbox
    build's beside the base model."""
    if config.oracle == "none":
        return None
    if config.oracle:
        return config.oracle
    if not base_source:  # a model built in memory: no build directory to look in
        return None
    beside = oracle_model_dir(Path(base_source).parent)
    return str(beside) if (beside / "config.json").is_file() else None


def audit_oracle(ctx: AuditContext, config: Any) -> str | None:
    """`find_oracle` for the audit's base model."""
    base = ctx.subjects["base"].model
    return find_oracle(config, str(getattr(base, "name_or_path", "") or ""))


def load_oracle(ctx: AuditContext, oracle: str) -> tuple[Any, Any]:
    """(model, tokenizer), loaded as the audit's two models are (its ModelSpec: dtype, device,
    device_map, trust_remote_code; a context built in code: the base model's dtype and device)."""
    if ctx.model_spec is not None:
        return ctx.model_spec.model_spec(model=oracle, revision=None).load_model()
    param = next(ctx.subjects["base"].model.parameters())
    return load_model(oracle, dtype=str(param.dtype).removeprefix("torch."),
                      device=str(param.device))

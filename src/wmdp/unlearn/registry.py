"""Every unlearning method by name: (class, hyperparameter config class, presets, summary), and
`resolve`, a run's method, hyperparameters and config from a name.

The methods that unlearn a model directly are listed in methods.py; UNDO, which distils from a
teacher one of them made, is added here, above them.
"""

from __future__ import annotations

from typing import Any

from wmdp.unlearn import undo
from wmdp.unlearn.loop import UnlearnConfig
from wmdp.unlearn.methods import DIRECT_METHODS, Methods, configure

METHODS: Methods = {
    **DIRECT_METHODS,
    "undo": (undo.UNDO, undo.UNDOConfig, undo.UNDO_PRESETS,
             "UNDO (Lee et al. 2025): noise an unlearned model, distill it back"),
}


def resolve(method: str, *, preset: str | None = None, config_file: str | None = None,
            settings: dict[str, Any] | None = None,
            overrides: list[str] | None = None) -> tuple[Any, Any, UnlearnConfig]:
    """Preset, then config file, then `settings` (flags; None = unset), then `key=value`."""
    return configure(METHODS, method, preset=preset, config_file=config_file,
                     settings=settings, overrides=overrides)


__all__ = ["METHODS", "resolve"]

"""Unlearning methods on one shared loop: `rmu` (the WMDP paper's) and the baselines `ga`,
`graddiff`, `npo`, `llmu`, `scrub`, `ssd`. `METHODS` (registry.py) maps a name to (class,
config class, presets, summary).

    from wmdp.unlearn import resolve, run_unlearning
    method, hparams, config = resolve("rmu", preset="zephyr-7b", overrides=["output=runs/z"])
    run_unlearning(method, hparams, config)

A config file holds the shared settings at the top level and the method's hyperparameters in a
section named after the method:

    model: HuggingFaceH4/zephyr-7b-beta
    forget_corpora: [cais/wmdp-bio-forget-corpus, cais/wmdp-corpora:cyber-forget-corpus]
    retain_corpora: [wikitext, wikitext]
    rmu: {layer_id: 7, layer_ids: [5, 6, 7], steering_coeffs: [6.5], alpha: [1200]}
"""

from __future__ import annotations

from typing import Any

from wmdp.config import apply_overrides, from_dict, load_yaml
from wmdp.errors import WmdpError
from wmdp.unlearn.loop import UnlearnConfig, run_unlearning, unlearn_model
from wmdp.unlearn.registry import METHODS
from wmdp.unlearn.rmu import RMU, RMUConfig


def resolve(method: str, *, preset: str | None = None, config_file: str | None = None,
            settings: dict[str, Any] | None = None,
            overrides: list[str] | None = None) -> tuple[Any, Any, UnlearnConfig]:
    """Preset, then config file, then `settings` (flags; None = unset), then `key=value`."""
    if method not in METHODS:
        raise WmdpError(f"unknown unlearning method {method!r} (known: {', '.join(METHODS)})")
    cls, hp_cls, presets, _ = METHODS[method]
    data: dict[str, Any] = {method: {}}
    if preset is not None:
        if preset not in presets:
            raise WmdpError(f"unknown {method} preset {preset!r} (known: {', '.join(presets)})")
        data.update(presets[preset]["config"])
        data[method] = dict(presets[preset].get(method, {}))
    where = "config"
    if config_file is not None:
        file_data = load_yaml(config_file)
        data[method].update(file_data.pop(method, {}) or {})
        data.update(file_data)
        where = config_file
    for key, value in (settings or {}).items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
    data = apply_overrides(data, overrides or [])
    hparams = from_dict(hp_cls, data.pop(method), f"{where}: {method}")
    config = from_dict(UnlearnConfig, data, where)
    return cls(hparams), hparams, config


__all__ = ["METHODS", "resolve", "run_unlearning", "unlearn_model", "UnlearnConfig", "RMU",
           "RMUConfig"]

"""The unlearning methods that change a model's weights directly, by name: (class, hyperparameter
config class, presets, summary); and `configure`, which puts a run's settings together for one.
UNDO (undo.py) distils from a teacher unlearned by one of these, so registry.py adds it on top:
`wmdp.unlearn.registry.METHODS` is every method.

A method module states only its loss; adding one here gives it `wmdp unlearn NAME`, its flags
(from the config dataclass's fields), YAML sections and presets.
"""

from __future__ import annotations

from typing import Any

from wmdp.config import apply_overrides, from_dict, load_yaml
from wmdp.errors import WmdpError
from wmdp.unlearn import ga, graddiff, llmu, npo, rmu_lat, sam, scrub, ssd
from wmdp.unlearn.loop import UnlearnConfig
from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS
from wmdp.unlearn.rmu import RMU, RMUConfig

Methods = dict[str, tuple[type, type, dict[str, dict], str]]

DIRECT_METHODS: Methods = {
    "rmu": (RMU, RMUConfig, RMU_PRESETS,
            "Representation Misdirection for Unlearning (the WMDP paper's method)"),
    "ga": (ga.GradientAscent, ga.GAConfig, ga.PRESETS,
           "gradient ascent on the forget corpus"),
    "graddiff": (graddiff.GradDiff, graddiff.GradDiffConfig, graddiff.PRESETS,
                 "gradient ascent on forget plus descent on retain"),
    "npo": (npo.NPO, npo.NPOConfig, npo.PRESETS,
            "Negative Preference Optimization (Zhang et al. 2024), optional retain term"),
    "llmu": (llmu.LLMU, llmu.LLMUConfig, llmu.PRESETS,
             "LLMU (Yao et al. 2023): ascent, random completions, KL to the original"),
    "scrub": (scrub.SCRUB, scrub.SCRUBConfig, scrub.PRESETS,
              "SCRUB (Kurmanji et al. 2023): teacher-student max/min steps"),
    "ssd": (ssd.SSD, ssd.SSDConfig, ssd.PRESETS,
            "Selective Synaptic Dampening (Foster et al. 2024): no training"),
    "rmu-lat": (rmu_lat.RMULAT, rmu_lat.RMULATConfig, rmu_lat.RMU_LAT_PRESETS,
                "RMU with latent adversarial training (Sheshadri et al. 2024)"),
    "npo-sam": (sam.NPOSAM, sam.NPOSAMConfig, sam.NPO_SAM_PRESETS,
                "NPO at sharpness-aware weights (Fan et al. 2025)"),
    "rmu-sam": (sam.RMUSAM, sam.RMUSAMConfig, sam.RMU_SAM_PRESETS,
                "RMU's forget loss at sharpness-aware weights (after Fan et al. 2025)"),
}


def configure(methods: Methods, method: str, *, preset: str | None = None,
              config_file: str | None = None, settings: dict[str, Any] | None = None,
              overrides: list[str] | None = None) -> tuple[Any, Any, UnlearnConfig]:
    """`method` of `methods`, set up from its preset, then a config file, then `settings` (flags;
    None = unset), then `key=value` overrides: (method object, its hyperparameters, run config)."""
    if method not in methods:
        raise WmdpError(f"unknown unlearning method {method!r} (known: {', '.join(methods)})")
    cls, hp_cls, presets, _ = methods[method]
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


__all__ = ["DIRECT_METHODS", "Methods", "configure"]

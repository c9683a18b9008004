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

from wmdp.unlearn.loop import UnlearnConfig, run_unlearning, unlearn_model
from wmdp.unlearn.registry import METHODS, resolve
from wmdp.unlearn.rmu import RMU, RMUConfig

__all__ = ["METHODS", "resolve", "run_unlearning", "unlearn_model", "UnlearnConfig", "RMU",
           "RMUConfig"]

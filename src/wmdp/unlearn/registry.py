"""Every unlearning method by name: (class, hyperparameter config class, presets, summary).

A method module states only its loss; adding one here gives it `wmdp unlearn NAME`, its flags
(from the config dataclass's fields), YAML sections and presets.
"""

from __future__ import annotations

from wmdp.unlearn import ga, graddiff, llmu, npo, rmu_lat, sam, scrub, ssd, undo
from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS
from wmdp.unlearn.rmu import RMU, RMUConfig

METHODS: dict[str, tuple[type, type, dict[str, dict], str]] = {
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
    "undo": (undo.UNDO, undo.UNDOConfig, undo.UNDO_PRESETS,
             "UNDO (Lee et al. 2025): noise an unlearned model, distill it back"),
}

"""Every unlearning method by name: (class, hyperparameter config class, presets, summary).

A method module states only its loss; adding one here gives it `wmdp unlearn NAME`, its flags
(from the config dataclass's fields), YAML sections and presets.
"""

from __future__ import annotations

from wmdp.unlearn.rmu import PRESETS as RMU_PRESETS
from wmdp.unlearn.rmu import RMU, RMUConfig

METHODS: dict[str, tuple[type, type, dict[str, dict], str]] = {
    "rmu": (RMU, RMUConfig, RMU_PRESETS,
            "Representation Misdirection for Unlearning (the WMDP paper's method)"),
}

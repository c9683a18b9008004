"""The relearning protocol's curves, read from its result (audit.json's `attacks.protocol`) and
drawn as one figure: the audit's protocol.png and the report's relearning.png. In the audit's
layer, outside its package (whose `__init__` loads torch): the report and `wmdp compare` read
it without torch.

    curves = protocol_curves(result)   # {attack data: {model: {"step", "best", "mean"}}}
    relearning_curves(result, Path("runs/x/plots/relearning.png"), method="rmu")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = ("base", "unlearned", "oracle")  # the protocol's models, in the order tables show them
CHANCE = 25.0  # percent, four choices
ROLE_COLOURS = {"base": "#8c8c8c", "unlearned": "#c8312b", "oracle": "#2b6cb0"}
PANELS = {"forget": "forget texts", "retain": "retain texts (control)",
          "general": "out-of-domain text"}


def protocol_curves(result: dict) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{attack data: {model: {"step", "best", "mean"}}}, step 0 the model's plain accuracy."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for role, m in (result.get("models") or {}).items():
        plain = m.get("plain", {}).get("forget_acc")
        for kind, a in m.get("attacks", {}).items():
            curve = a.get("curve", [])
            out.setdefault(kind, {})[role] = {
                "step": [0] + [p["step"] for p in curve],
                "best": [plain] + [p["best"] for p in curve],
                "mean": [plain] + [p["mean"] for p in curve]}
    return out


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # lazy: only a figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def relearning_curves(result: dict, path: Path, method: str = "unlearned") -> Path:
    """The relearning protocol's curves in one figure, a panel per attack data: forget accuracy
    against fine-tuning steps for base, unlearned (`method`) and oracle; solid the best run of
    the grid at each step (the worst case), dotted the mean over the grid; step 0 plain."""
    from matplotlib.lines import Line2D

    curves = protocol_curves(result)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves) + 0.6, 3.4),
                             squeeze=False, sharey=True)
    for ax, (kind, models) in zip(axes[0], curves.items()):
        ax.set_title(PANELS.get(kind, kind), fontsize=10)
        for role in [r for r in ROLES if r in models] + [r for r in models if r not in ROLES]:
            c, colour = models[role], ROLE_COLOURS.get(role, "black")
            label = method if role == "unlearned" else role
            ax.plot(c["step"], [100 * a for a in c["best"]], "o-", color=colour, label=label)
            ax.plot(c["step"], [100 * a for a in c["mean"]], ":", color=colour)
        ax.axhline(CHANCE, color="black", ls="--", lw=0.8)
        ax.set_xlabel("attack steps")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forget accuracy (%)")
    handles, _ = axes[0][0].get_legend_handles_labels()
    mean = Line2D([], [], ls=":", color="black", label="mean over the grid")
    fig.legend(handles=handles + [mean], fontsize=8, loc="lower center", ncol=4,
               bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the panels: hides no line
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["ROLES", "CHANCE", "ROLE_COLOURS", "protocol_curves", "pyplot", "relearning_curves"]

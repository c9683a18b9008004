"""PNG figures of the audit (matplotlib, Agg backend): one file per attack, one panel per task.

    probe.png        probe accuracy per layer: base, unlearned, base-trained on unlearned, chance
    relearn.png      accuracy against fine-tuning steps, forget texts and retain texts (control)
    gcg.png          the GCG objective against steps
    fewshot.png      accuracy per prompt context
    activations.png  mean activation norm per layer on forget and retain text
    protocol.png     the relearning protocol's curves: base, unlearned and oracle, per attack data
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from wmdp.protocol_plot import relearning_curves  # the report draws the same figure

COLORS = {"base": "tab:blue", "unlearned": "tab:red", "base_to_unlearned": "tab:purple"}


def _figure(n_panels: int, title: str, per_row: int = 3):
    """A figure with one panel per task, `per_row` to a row; returns it and its axes (flat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n_panels, per_row)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.4 * cols, 6.4), 3.6 * rows),
                             squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n_panels])


def _panel_title(ax, text: str) -> None:
    """A panel title wrapped to its panel's width, so neighbouring titles never overlap."""
    ax.set_title(textwrap.fill(text, width=44), fontsize=9)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_probe(result: dict, path: Path) -> str:
    fig, axes = _figure(len(result["tasks"]), "linear probe accuracy per layer (95% CI)")
    for ax, (name, r) in zip(axes, result["tasks"].items()):
        x = r["layers"]
        for key, label in (("base", "base"), ("unlearned", "unlearned"),
                           ("base_to_unlearned", "base probe on unlearned")):
            ax.plot(x, r[key]["acc"], "o-", color=COLORS[key], label=label)
            lo, hi = zip(*r[key]["ci95"])
            ax.fill_between(x, lo, hi, color=COLORS[key], alpha=0.12)
            if "control_acc" in r[key] and key != "base_to_unlearned":
                ax.plot(x, r[key]["control_acc"], ":", color=COLORS[key], alpha=0.7,
                        label=f"{label}, shuffled answers")
        ax.axhline(r["chance"], color="gray", ls="--", label="chance")
        ax.set_xticks(x)
        _panel_title(ax, f"{name} ({r['kind']} probe)")
        ax.set(xlabel="decoder layer", ylabel="accuracy", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_relearn(result: dict, path: Path) -> str:
    fig, axes = _figure(len(result["tasks"]), "accuracy while fine-tuning (relearning)")
    for ax, (name, r) in zip(axes, result["tasks"].items()):
        for role in ("base", "unlearned"):
            for kind, ls in (("forget", "-"), ("retain", "--")):
                ax.plot(r["steps"], r[f"{role}_{kind}"]["acc_unmentioned"], ls, marker="o",
                        color=COLORS[role], label=f"{role}, {kind} texts")
        _panel_title(ax, f"{name} ({r['n_unmentioned']} questions the texts never name)")
        ax.set(xlabel="fine-tuning step", ylabel="accuracy", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_gcg(result: dict, path: Path) -> str:
    objective = {"choices": "cross-entropy among the choices", "target": "answer NLL"}
    fig, axes = _figure(1, f"GCG objective ({objective[result['config']['objective']]}), "
                           "training questions")
    ax = axes[0]
    held = result["tasks"].values()
    for role in ("base", "unlearned"):
        loss = result["suffixes"][role]["loss"]
        n = sum(t["n_held_out"] for t in held if t[role]["acc_held_out"] is not None)
        before, after = (sum(t[role][k] * t["n_held_out"] for t in held
                             if t[role]["acc_held_out"] is not None) / max(n, 1)
                         for k in ("acc_held_out_plain", "acc_held_out"))
        ax.plot(range(len(loss)), loss, color=COLORS[role],
                label=f"{role}: held-out acc {before:.2f} -> {after:.2f}")
    ax.set(xlabel="step", ylabel="objective")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_fewshot(result: dict, path: Path) -> str:
    fig, axes = _figure(len(result["tasks"]), "accuracy per prompt context")
    for ax, (name, r) in zip(axes, result["tasks"].items()):
        labels = list(r["contexts"])
        for k, role in enumerate(("base", "unlearned")):
            ax.bar([i + 0.4 * k for i in range(len(labels))],
                   [r["contexts"][c][role]["acc"] for c in labels], width=0.4,
                   color=COLORS[role], label=role)
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=30, fontsize=7)
        _panel_title(ax, f"{name} ({r['n']} questions asked)")
        ax.set(ylabel="accuracy", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_activations(result: dict, path: Path) -> str:
    fig, axes = _figure(1, "mean activation norm per layer")
    ax = axes[0]
    for role in ("base", "unlearned"):
        for kind, ls in (("forget", "-"), ("retain", "--")):
            ax.plot(result["layers"], result[role][kind], ls, marker="o", color=COLORS[role],
                    label=f"{role}, {kind} text")
    ax.set(xlabel="decoder layer", ylabel="mean L2 norm", yscale="log")
    ax.set_xticks(result["layers"])
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_protocol(result: dict, path: Path) -> str:
    return relearning_curves(result, path).name


PLOTS = {"probe": plot_probe, "relearn": plot_relearn, "gcg": plot_gcg,
         "fewshot": plot_fewshot, "activations": plot_activations, "protocol": plot_protocol}


def plot_attack(attack: str, result: dict, out: Path) -> str | None:
    """Draw `attack`'s figure into `out/<attack>.png`; returns the file name (None for an
    attack with no figure)."""
    if attack not in PLOTS:
        return None
    return PLOTS[attack](result, out / f"{attack}.png")

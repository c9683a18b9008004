"""The report's figures: accuracy before and after unlearning, and the training curves (the
relearning protocol's curves are the audit's, `wmdp.protocol_plot`).

    accuracy_charts(plots_dir, tasks, base_results, unlearned_results, "rmu")
    training_curves(run_dir / "unlearned" / "metrics.jsonl", plots_dir)

Two accuracy charts, as horizontal bars so that every label reads at the page's width: the
headline groups (each side's top-level groups: the forget and general groups and their seen and
letter variants, or WMDP and MMLU), then every task. Each returns [(png path, caption)].
"""

from __future__ import annotations

import json
from pathlib import Path

from wmdp.protocol_plot import CHANCE, ROLE_COLOURS, pyplot
from wmdp.report_tasks import Tasks, metrics

COLOURS = {"base": ROLE_COLOURS["base"], "unlearned": ROLE_COLOURS["unlearned"],
           "forget": "#9b1c1c"}  # the forget tasks' labels


def accuracy_charts(plots: Path, tasks: Tasks, base: dict, unl: dict,
                    method: str) -> list[tuple[Path, str]]:
    tops = tasks.cols.get("top_forget", []) + tasks.cols.get("top_general", [])
    headline = [n for n in tops if n in tasks.groups]
    detail = [n for n in tasks.mcq if n not in tasks.groups]
    out = []
    if headline:
        path = plots / "accuracy_headline.png"
        _hbars(headline, tasks, base, unl, method, path)
        out.append((path, "Headline groups before and after unlearning (± stderr; forget groups "
                          "labelled in red, dashed line: chance)"))
    if detail:
        path = plots / "accuracy.png"
        _hbars(detail, tasks, base, unl, method, path)
        out.append((path, "Every task before and after unlearning (± stderr; forget tasks "
                          "labelled in red, dashed line: chance)"))
    return out


def _hbars(names: list[str], tasks: Tasks, base: dict, unl: dict, method: str, path: Path) -> None:
    """Base and unlearned accuracy per name, one pair of horizontal bars each."""
    plt = pyplot()
    height = 0.38
    fig, ax = plt.subplots(figsize=(8.0, 0.55 * len(names) + 1.2))
    for k, (label, res, colour) in enumerate((("base", base, COLOURS["base"]),
                                              (method, unl, COLOURS["unlearned"]))):
        ys = [i + (k - 0.5) * height for i in range(len(names))]
        accs = [100 * (metrics(res, n).get("acc") or 0.0) for n in names]
        errs = [100 * (metrics(res, n).get("acc_stderr") or 0.0) for n in names]
        ax.barh(ys, accs, height, xerr=errs, color=colour, label=label, capsize=2,
                error_kw={"lw": 0.8})
        for y, a, e in zip(ys, accs, errs):
            ax.text(a + e + 1, y, f"{a:.1f}", va="center", fontsize=8)
    ax.axvline(CHANCE, color="black", ls="--", lw=0.8, label=f"chance ({CHANCE:.0f}%)")
    ax.set_yticks(range(len(names)), names, fontsize=10)
    for tick, n in zip(ax.get_yticklabels(), names):
        if n not in tasks.general:  # forget (or mixed) names, as the tables' ⚠ rule counts them
            tick.set_color(COLOURS["forget"])
    ax.invert_yaxis()  # the first name on top, as in the tables
    ax.set_xlim(0, 112)
    ax.set_xlabel("accuracy (%)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curves(metrics_file: Path, plots: Path) -> list[tuple[Path, str]]:
    if not metrics_file.is_file():
        return []
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    out = []
    for keys, name, ylabel, log, caption in (
            (("forget_loss", "retain_loss"), "losses.png", "loss (log)", True,
             "Forget and retain loss per step"),
            (("forget_norm", "retain_norm", "forget_norm_frozen"), "activation_norms.png",
             "mean |h| at the steered layer", False,
             "Activation norms at the steered layer per step (forget text is pushed towards the "
             "control vector's norm; retain text should stay put)")):
        if _curves(rows, keys, plots / name, ylabel, log):
            out.append((plots / name, caption))
    return out


def _curves(rows: list[dict], keys: tuple[str, ...], path: Path, ylabel: str, log: bool) -> bool:
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in present:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k,
                marker="." if len(pts) < 40 else None)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


__all__ = ["accuracy_charts", "training_curves"]

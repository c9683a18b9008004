"""What a run's two results files (base and unlearned) hold, for the report's tables
(report.py) and figures (report_plots.py): a task's metrics, and the tasks both files have with
their groups, prompt formats and sides (forget or general).

    tasks = Tasks(base_results, unlearned_results, forget=["wmdp_bio", "wmdp_cyber"])
    tasks.mcq, tasks.ppl, tasks.general, tasks.groups, tasks.cols["top_forget"]
    tasks.side("mmlu")    # "general" (or forget, mixed, perplexity)
    metrics(base_results, "mmlu")["acc"]
"""

from __future__ import annotations

from wmdp.compare import Row, columns, leaves


def metrics(results: dict | None, name: str) -> dict:
    """The metrics of a task or group in a results.json ({} when absent)."""
    if not results:
        return {}
    return results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}


def names(results: dict) -> list[str]:
    """Every group and task a results.json holds, groups first."""
    return list(results.get("groups", {})) + list(results.get("results", {}))


class Tasks:
    """The tasks both results files hold: MCQ and perplexity, their groups and sides."""

    def __init__(self, base: dict | None, unl: dict | None, forget: list[str]) -> None:
        a, b = base or unl or {}, unl or base or {}
        both = [n for n in names(a) if n in names(b)]
        self.mcq = [n for n in both if "acc" in metrics(a, n)]
        self.ppl = [n for n in both if "word_perplexity" in metrics(a, n)]
        self.groups = {g: list(e.get("members", [])) for g, e in a.get("groups", {}).items()}
        self.formats = {t: e.get("format") for t, e in a.get("results", {}).items()}
        forget_set = set(forget)
        self.forget = {n for n in self.mcq if n in forget_set
                       or set(leaves(n, self.groups)) <= forget_set}
        # general: neither the task nor anything inside it is a forget task
        self.general = {n for n in self.mcq if n not in forget_set
                        and not forget_set & set(leaves(n, self.groups))}
        rows = [Row(label, label, "", {"groups": {}, **r}, "") for label, r in
                (("base", base), ("unlearned", unl)) if r]
        self.cols = columns(rows, tuple(forget)) if rows else {}

    def side(self, name: str) -> str:
        """Which side a task is on, as the tables mark it: forget, general, mixed (a group
        holding both) or perplexity."""
        if name in self.ppl and name not in self.mcq:
            return "perplexity"
        return "forget" if name in self.forget else "general" if name in self.general else "mixed"

    def fmt(self, name: str) -> frozenset:
        """The prompt formats of the tasks under `name` (itself, for a task)."""
        return frozenset(self.formats.get(t) for t in leaves(name, self.groups))


__all__ = ["Tasks", "metrics", "names"]

"""The report of a run: the paper's table, related subjects, plots, audit verdicts, model card.

    write_report(Path("runs/sandbox"))   # -> report.md, report.html, plots/*.png, unlearned/README.md

Reads only what the stages recorded: `eval_base/results.json`, `eval_unlearned/results.json`,
`unlearned/unlearn_config.json` and `metrics.jsonl`, `audit/audit.json`, `chat_*/chat_results.json`.
Every number shown comes from those files (a difference of two at most). The same blocks render
to Markdown and to one self-contained HTML file (plots inlined).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmdp.io import atomic_write_text, read_json

PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")


def pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{100 * (b - a):+.1f}"


def num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


@dataclass
class Doc:
    """Blocks of a report: (kind, payload); rendered to Markdown and HTML alike."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, x in self.blocks:
            if kind == "h2":
                out += [f"## {x}", ""]
            elif kind == "p":
                out += [x, ""]
            elif kind == "table":
                header, rows = x
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                path, caption = x
                out += [f"![{caption}]({path.relative_to(root).as_posix()})", ""]
            elif kind == "pre":
                out += ["```", x, "```", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{e(x)}</h2>")
            elif kind == "p":  # `code` spans, as Markdown shows them
                body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", e(x)) + "</p>")
            elif kind == "table":
                header, rows = x
                cell = lambda c: f'<td class="n">{e(c)}</td>' if _numeric(c) else f"<td>{e(c)}</td>"  # noqa: E731
                body.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header)
                            + "</tr></thead><tbody>" + "".join(
                                "<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
                            + "</tbody></table>")
            elif kind == "img":
                path, caption = x
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(caption)}</figcaption></figure>")
            elif kind == "pre":
                body.append(f"<pre>{e(x)}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;"
                 "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
                 "display:block;overflow-x:auto;max-width:100%}"
                 "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
                 "td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}"
                 "img{max-width:100%}figcaption{color:#555;font-size:90%}"
                 "pre{background:#f6f6f6;padding:1em;overflow-x:auto}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(self.title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _short(model: str) -> str:
    """A local path's last two parts (the rest is in run.json); a hub id as it is."""
    p = Path(model)
    return "/".join(p.parts[-2:]) if p.is_absolute() else model


def _load(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _metrics(results: dict | None, name: str) -> dict:
    if not results:
        return {}
    return results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}


def _names(results: dict) -> list[str]:
    return list(results.get("groups", {})) + list(results.get("results", {}))


def write_report(run_dir: Path, forget: list[str] | None = None, near: list[str] | None = None,
                 main: list[str] | None = None, title: str | None = None) -> Path:
    """Render the run's report from its recorded files; returns the path of report.md."""
    run_dir = Path(run_dir)
    base = _load(run_dir / "eval_base" / "results.json")
    unl = _load(run_dir / "eval_unlearned" / "results.json")
    record = _load(run_dir / "unlearned" / "unlearn_config.json") or {}
    audit = _load(run_dir / "audit" / "audit.json")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    method = record.get("method", "unlearned")
    model = record.get("config", {}).get("model") or (base or {}).get("config", {}).get("model", "?")
    doc = Doc(title or f"Unlearning report: {method} on {_short(model)}")
    names = [n for n in _names(base or unl or {}) if n in _names(unl or base or {})]
    mcq = [n for n in names if "acc" in _metrics(base or unl, n)]
    ppl = [n for n in names if "word_perplexity" in _metrics(base or unl, n)]
    forget = [n for n in (forget or []) if n in mcq]
    near = [n for n in (near or []) if n in mcq]
    general = [n for n in mcq if n not in forget]

    doc.p(f"Model `{model}`, unlearned with `{method}`. Accuracy in percent (lm-eval's acc, "
          "0-shot); Δ is unlearned minus base. Lower is better on forget tasks, higher on the rest.")
    doc.h("Main results")
    # the paper's columns: each forget task, then the general groups (MMLU), else general tasks
    groups = [n for n in general if n in (base or unl or {}).get("groups", {})]
    main_cols = [n for n in main if n in mcq] if main else \
        forget + (groups or [n for n in general if n not in near])
    header = ["model"] + main_cols + [f"{n} (word ppl)" for n in ppl]
    rows = []
    for label, res in (("base", base), (f"{method}", unl)):
        rows.append([label] + [pct(_metrics(res, n).get("acc")) for n in main_cols]
                    + [num(_metrics(res, n).get("word_perplexity")) for n in ppl])
    rows.append(["Δ"] + [delta(_metrics(base, n).get("acc"), _metrics(unl, n).get("acc"))
                         for n in main_cols] + ["" for _ in ppl])
    doc.table(header, rows)
    _chat_rows(doc, run_dir)
    if near:
        doc.h("Related subjects (collateral damage)")
        doc.p("Near domains share a subject header with a forgotten domain: they show whether "
              "unlearning removed the hazard or the whole subject.")
        doc.table(["task", "base", method, "Δ"],
                  [[n, pct(_metrics(base, n).get("acc")), pct(_metrics(unl, n).get("acc")),
                    delta(_metrics(base, n).get("acc"), _metrics(unl, n).get("acc"))] for n in near])
    doc.h("Every task")
    doc.table(["task", "n", "base acc", "± se", f"{method} acc", "± se", "Δ",
               "base acc_norm", f"{method} acc_norm"],
              [[n, str(_metrics(base or unl, n).get("n", "")),
                pct(_metrics(base, n).get("acc")), pct(_metrics(base, n).get("acc_stderr")),
                pct(_metrics(unl, n).get("acc")), pct(_metrics(unl, n).get("acc_stderr")),
                delta(_metrics(base, n).get("acc"), _metrics(unl, n).get("acc")),
                pct(_metrics(base, n).get("acc_norm")), pct(_metrics(unl, n).get("acc_norm"))]
               for n in mcq])
    if ppl:
        doc.h("Perplexity")
        doc.table(["task", "n", "model"] + list(PPL_METRICS),
                  [[n, str(_metrics(res, n).get("n", "")), label]
                   + [num(_metrics(res, n).get(m)) for m in PPL_METRICS]
                   for n in ppl for label, res in (("base", base), (method, unl))])
    _plots(doc, run_dir, plots, base, unl, mcq, method)
    if audit:
        _audit_section(doc, run_dir, audit)
    card = model_card(record, base, unl, forget, general, audit)
    if (run_dir / "unlearned").is_dir():
        atomic_write_text(run_dir / "unlearned" / "README.md", card)
    doc.h("Model card")
    doc.pre(card)
    md = doc.markdown(run_dir)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", doc.html())
    return run_dir / "report.md"


def _chat_rows(doc: Doc, run_dir: Path) -> None:
    rows = []
    for label in ("base", "unlearned"):
        res = _load(run_dir / f"chat_{label}" / "chat_results.json")
        if res and res.get("score") is not None:
            rows.append([label, num(res["score"]), str(res.get("failed", "")),
                         str(res.get("unparseable", ""))])
    if rows:
        doc.p("Judged chat (MT-Bench-style, 1-10):")
        doc.table(["model", "score", "failed judgments", "unparseable judgments"], rows)


def _plots(doc: Doc, run_dir: Path, plots: Path, base: dict | None, unl: dict | None,
           tasks: list[str], method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc.h("Figures")
    if tasks and base and unl:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks)), 3.6))
        xs = range(len(tasks))
        for k, (label, res, color) in enumerate((("base", base, "#888"), (method, unl, "#c33"))):
            accs = [100 * (_metrics(res, n).get("acc") or 0) for n in tasks]
            errs = [100 * (_metrics(res, n).get("acc_stderr") or 0) for n in tasks]
            ax.bar([x + (k - 0.5) * 0.38 for x in xs], accs, 0.38, yerr=errs, label=label,
                   color=color, capsize=2)
        ax.set_xticks(list(xs), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "accuracy.png", dpi=110)
        plt.close(fig)
        doc.img(plots / "accuracy.png", "Accuracy per task before and after unlearning (± stderr)")
    metrics_file = run_dir / "unlearned" / "metrics.jsonl"
    if metrics_file.is_file():
        rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        _curves(plt, rows, ("forget_loss", "retain_loss"), plots / "losses.png", "loss (log)", True)
        if (plots / "losses.png").is_file():
            doc.img(plots / "losses.png", "Forget and retain loss per step")
        _curves(plt, rows, ("forget_norm", "retain_norm", "forget_norm_frozen"),
                plots / "activation_norms.png", "mean |h| at the steered layer", False)
        if (plots / "activation_norms.png").is_file():
            doc.img(plots / "activation_norms.png",
                    "Activation norms at the steered layer per step (forget text is pushed "
                    "towards the control vector's norm; retain text should stay put)")


def _curves(plt: Any, rows: list[dict], keys: tuple[str, ...], path: Path, ylabel: str,
            log: bool) -> None:
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in present:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 40 else None)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _audit_section(doc: Doc, run_dir: Path, audit: dict) -> None:
    doc.h("Robustness audit")
    verdicts = audit.get("verdicts") or {}
    if verdicts:
        doc.table(["attack", "verdict"], [[k, str(v)] for k, v in verdicts.items()])
    for png in sorted((run_dir / "audit").glob("*.png")):
        doc.img(png, f"audit: {png.stem.replace('_', ' ')}")


def model_card(record: dict, base: dict | None, unl: dict | None, forget: list[str],
               general: list[str], audit: dict | None) -> str:
    """A model card for the unlearned model: what was removed, how, what was measured, limits."""
    cfg = record.get("config", {})
    hp = record.get("hparams", {})
    lines = [f"# Unlearned model: {record.get('method', '?')} on {cfg.get('model', '?')}", "",
             "## What was removed",
             "Knowledge represented by the forget corpora: "
             + ", ".join(f"`{c['source']}` ({c['n']} texts)"
                         for c in record.get("corpora", {}).get("forget", [])) + ".",
             "Retain corpora: " + ", ".join(f"`{c['source']}` ({c['n']} texts)"
                                          for c in record.get("corpora", {}).get("retain", [])) + ".",
             "", "## How",
             f"Method `{record.get('method', '?')}`, {record.get('num_steps', '?')} steps, seed "
             f"{cfg.get('seed', '?')}, batch size {cfg.get('batch_size', '?')}. Hyperparameters: "
             + ", ".join(f"{k}={v}" for k, v in hp.items()) + ".",
             "Trained tensors: " + ", ".join(record.get("trained_tensors", [])) + ".",
             "", "## What was measured (accuracy %, base -> unlearned)"]
    for n in forget + general:
        a, b = _metrics(base, n).get("acc"), _metrics(unl, n).get("acc")
        if a is not None and b is not None:
            lines.append(f"- {n}{' (forget)' if n in forget else ''}: {pct(a)} -> {pct(b)}")
    lines += ["", "## Known limits",
              "- Accuracy near chance on multiple choice does not prove the knowledge is gone: "
              "see the robustness audit (probes, relearning, adversarial suffixes)."]
    for k, v in ((audit or {}).get("verdicts") or {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("- Unlearning was checked only on the tasks listed above.")
    return "\n".join(lines) + "\n"

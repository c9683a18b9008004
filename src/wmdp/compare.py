"""`wmdp compare RUN_DIR...`: one table across runs, in the layout of the WMDP paper's Table 1
(method, each forget task, each general task, perplexity), and a plot of forget accuracy against
general accuracy.

    wmdp compare runs/rmu runs/ga runs/npo --output runs/compare    # compare.md, .json, .png

A RUN_DIR is either a pipeline run (`eval_base/results.json`, `eval_unlearned/results.json`,
`unlearned/unlearn_config.json`: a base row, shown once per distinct base model, and an
unlearned row; with `chat_base/` and `chat_unlearned/`, their judged chat score, the paper's
MT-Bench column) or an eval output dir with `results.json` (one row named after the dir). A row's
method and settings come from the evaluated model's `unlearn_config.json` (the pipeline's
`unlearned/`, or the model directory `results.json` records); settings are the hyperparameters
that differ from the method's defaults.

Columns: tasks and groups whose names match a `--forget` pattern (default: WMDP's and the
sandbox's hazard tasks), or groups made only of such tasks, are forget columns; those with no
forget task in them are general (each top-level general group and its direct members, and
ungrouped tasks); groups mixing both are left out. `--tasks` names the columns instead.
Perplexity tasks show `word_perplexity`. Each side's headline is its first top-level group (the
sandbox's held-out cloze `sandbox_forget` and `sandbox_general`, `wmdp`, `mmlu`; with no group,
its tasks of one prompt format): the plot's axes, never an average across formats or across a
group's seen and letter variants. The table prints the paper's Table 1 first (the forget
headline's tasks, the general headline, the chat score; after each unlearned row its change from
the base model of the same run), then every other column, one per line. A run with an audit
(`audit/audit.json`) adds its worst-case recovery to Table 1 and a robustness table: every
attack's share of the gap recovered, the oracle's beside them (`wmdp.robustness`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmdp.config import to_dict
from wmdp.errors import DataError, WmdpError
from wmdp.io import atomic_write_text, prepare_output_dir, read_json, write_json
from wmdp.robustness import compare_table, share_text, summary

DEFAULT_FORGET = ("wmdp*", "sandbox_forget*", "sandbox_bio*", "sandbox_cyber*")
PPL_METRIC = "word_perplexity"


@dataclass
class Row:
    label: str
    method: str           # the unlearning method, or "base" (no unlearning record found)
    settings: str         # hyperparameters that differ from the method's defaults
    results: dict         # the results.json
    source: str           # where results.json was read
    chat: float | None = None  # judged chat score (1-10) of chat_*/chat_results.json, if any
    base: Row | None = None    # the base row of the same run directory: the change is from it
    audit: dict | None = None  # the run's audit/audit.json: its robustness columns


# -- reading runs -------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise WmdpError(f"{path}: cannot read results ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise WmdpError(f"{path}: not a wmdp results.json (no \"results\" mapping)")
    data.setdefault("groups", {})
    _check_types(path, data)
    return data


_NUMBERS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "tokens", PPL_METRIC,
            "byte_perplexity", "bits_per_byte", "token_perplexity")


# (least, most, what): every number is finite; accuracies are shares, counts at least one
_FINITE = (0.0, math.inf, "a finite number >= 0")
_RANGES = {"acc": (0.0, 1.0, "an accuracy from 0 to 1"),
           "acc_norm": (0.0, 1.0, "an accuracy from 0 to 1"),
           "n": (1, math.inf, "a count of at least 1 question")}


PERPLEXITIES = (PPL_METRIC, "byte_perplexity", "token_perplexity")  # inf: a collapsed model


def _in_range(key: str, value: float) -> bool:
    least, most, _ = _RANGES.get(key, _FINITE)
    if key in PERPLEXITIES and value == math.inf:  # what wmdp writes when exp() overflows
        return True
    return math.isfinite(value) and least <= value <= most


def _check_types(path: Path, data: dict) -> None:
    """Every field the table reads has its type; else one line naming the file and field."""
    for part in ("results", "groups"):
        if not isinstance(data[part], dict):
            raise DataError(path, "is not a mapping of tasks", field=part)
        for name, entry in data[part].items():
            if not isinstance(entry, dict):
                raise DataError(path, f"is {type(entry).__name__}, expected a mapping of metrics",
                                field=f"{part}.{name}")
            if not any(entry.get(key) is not None for key in _NUMBERS):
                raise DataError(path, f"holds no metric (expected {', '.join(_NUMBERS[:3])}, "
                                "...)", field=f"{part}.{name}")
            for key in _NUMBERS:
                value = entry.get(key)
                if value is not None and (isinstance(value, bool)
                                          or not isinstance(value, (int, float))):
                    raise DataError(path, f"is {value!r:.40}, expected a number",
                                    field=f"{part}.{name}.{key}")
                if value is not None and not _in_range(key, value):
                    raise DataError(path, f"is {value}, expected {_RANGES.get(key, _FINITE)[2]}",
                                    field=f"{part}.{name}.{key}")
    if not data["results"]:
        raise DataError(path, "holds no task", field="results")
    if not isinstance(data.get("config", {}), dict):
        raise DataError(path, "is not a mapping", field="config")


def _settings(record: dict) -> str:
    """`k=v` for each hyperparameter that differs from the method's default."""
    from wmdp.unlearn.registry import METHODS

    hparams = record.get("hparams", {})
    if record.get("method") in METHODS:
        defaults = to_dict(METHODS[record["method"]][1]())
        hparams = {k: v for k, v in hparams.items() if defaults.get(k, object()) != v}
    return ", ".join(f"{k}={_short(v)}" for k, v in hparams.items())


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return str(v)


def _record_of(results: dict, *candidates: Path) -> dict | None:
    """The unlearning record of the evaluated model, if one is found."""
    from wmdp.unlearn.loop import FINAL_RECORD as UNLEARN_RECORD

    model = results.get("config", {}).get("model")
    paths = list(candidates) + ([Path(model) / UNLEARN_RECORD] if model else [])
    for p in paths:
        if p.is_file():
            return read_json(p)
    return None


def _row(label: str, results: dict, source: Path, record: dict | None,
         chat: Path | None = None) -> Row:
    score = read_json(chat).get("score") if chat is not None and chat.is_file() else None
    if record is not None:
        return Row(label, str(record.get("method", "?")), _settings(record), results, str(source),
                   score)
    return Row(label, "base", "", results, str(source), score)


def load_runs(paths: list[str | Path]) -> list[Row]:
    """Rows of every RUN_DIR, base rows of the same model and settings shown once."""
    # the file names come from the modules that write them; imported here, not at the top,
    # so that the report can use `columns` without loading torch
    from wmdp.chat.run import CHAT_RESULTS
    from wmdp.evaluate import RESULTS
    from wmdp.unlearn.loop import FINAL_RECORD as UNLEARN_RECORD

    rows: list[Row] = []
    bases: dict[str, Row] = {}
    for p in map(Path, paths):
        base_file, unl_file = p / "eval_base" / RESULTS, p / "eval_unlearned" / RESULTS
        if base_file.is_file() or unl_file.is_file():
            base = None
            if base_file.is_file():
                results = _read(base_file)
                key = json.dumps([results.get("config", {}).get("model"),
                                  results.get("fingerprint"), sorted(results["results"])])
                base = bases.setdefault(key, _row(p.name, results, base_file, None,
                                                  p / "chat_base" / CHAT_RESULTS))
            if unl_file.is_file():
                results = _read(unl_file)
                record = _record_of(results, p / "unlearned" / UNLEARN_RECORD)
                rows.append(_row(p.name, results, unl_file, record,
                                 p / "chat_unlearned" / CHAT_RESULTS))
                rows[-1].base = base
                audit = p / "audit" / "audit.json"
                rows[-1].audit = read_json(audit) if audit.is_file() else None
        elif (p / RESULTS).is_file():
            results = _read(p / RESULTS)
            rows.append(_row(p.name, results, p / RESULTS, _record_of(results)))
        else:
            raise WmdpError(f"{p}: no results found (expected {RESULTS}, or a run directory "
                            f"with eval_base/{RESULTS} and eval_unlearned/{RESULTS})")
    for i, b in enumerate(bases.values()):  # base rows first: the reference line of the table
        b.label = "base" if len(bases) == 1 else f"base ({b.label})"
        rows.insert(i, b)
    return rows


# -- columns --------------------------------------------------------------------------------------
def _entries(results: dict) -> dict[str, dict]:
    return {**results["results"], **results["groups"]}


def leaves(name: str, groups: dict[str, list[str]]) -> list[str]:
    """The tasks inside `name` (itself when it is a task)."""
    if name not in groups:
        return [name]
    return [t for m in groups[name] for t in leaves(m, groups)]


def _below(name: str, groups: dict[str, list[str]]) -> set[str]:
    """Every group and task inside `name`."""
    return {x for m in groups.get(name, []) for x in (m, *_below(m, groups))}


def columns(rows: list[Row], forget: list[str] | tuple[str, ...] = DEFAULT_FORGET,
            tasks: list[str] | None = None, metric: str = "acc") -> dict[str, list[str]]:
    """The forget, general and perplexity columns, in order; the top-level ones of each side;
    the headline of each side (what the plot shows) and Table 1's columns (module docstring)."""
    groups: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}   # name -> "mcq" or "ppl", in order of first appearance
    formats: dict[str, Any] = {}  # task -> its prompt format (cloze, letter), as results record
    for r in rows:
        for name, e in r.results["groups"].items():
            groups.setdefault(name, list(e.get("members", [])))
        for name, e in _entries(r.results).items():
            if name not in kinds:
                ppl = e.get("kind") == "perplexity" or (metric not in e and PPL_METRIC in e)
                kinds[name] = "ppl" if ppl else "mcq"
            formats.setdefault(name, e.get("format"))

    def side(name: str) -> str:
        names = (name, *leaves(name, groups))
        hit = [any(fnmatch.fnmatchcase(n, p) for p in forget) for n in names]
        return "forget" if hit[0] or all(hit[1:]) else "general" if not any(hit) else "mixed"

    if tasks is not None:
        unknown = [t for t in tasks if t not in kinds]
        if unknown:
            raise WmdpError(f"--tasks: {unknown[0]!r} is in no run's results "
                            f"(found: {', '.join(kinds)})")
        mcq = [n for n in tasks if kinds[n] == "mcq"]
        chosen = {"forget": [n for n in mcq if side(n) != "general"],
                  "general": [n for n in mcq if side(n) == "general"]}
        return {**chosen, "perplexity": [n for n in tasks if kinds[n] == "ppl"],
                "top_forget": chosen["forget"], "top_general": chosen["general"],
                **_headlines(chosen["forget"], chosen["general"], groups, formats, True)}
    out: dict[str, list[str]] = {"perplexity": [n for n, k in kinds.items() if k == "ppl"]}
    for which in ("forget", "general"):
        names = [n for n, k in kinds.items() if k == "mcq" and side(n) == which]
        inner = {m for n in names for m in _below(n, groups)}
        top = [n for n in names if n not in inner]
        shown: list[str] = []
        for n in top:  # a top group, then what is inside it: all for forget, members for general
            inside = _below(n, groups) if which == "forget" else set(groups.get(n, []))
            shown += [n] + [m for m in names if m in inside and m not in shown]
        out[which], out[f"top_{which}"] = shown, top
    return {**out, **_headlines(out["top_forget"], out["top_general"], groups, formats, False)}


def _headlines(forget: list[str], general: list[str], groups: dict[str, list[str]],
               formats: dict[str, Any], chosen: bool) -> dict[str, list[str]]:
    """Each side's headline: its first top-level group (the sandbox's held-out cloze
    `sandbox_forget`, `wmdp`, `mmlu`; its seen and letter variants are other groups), or, with no
    group, its tasks of the first one's prompt format: never an average across formats. Table 1
    shows the forget headline's member tasks (WMDP-Bio, -Cyber) and the general headline."""
    def fmt(name: str) -> frozenset:
        return frozenset(formats.get(t) for t in leaves(name, groups))

    def headline(tops: list[str]) -> list[str]:
        grouped = [t for t in tops if t in groups]
        if grouped:
            return grouped[:1]
        return [t for t in tops if fmt(t) == fmt(tops[0])]

    hf, hg = headline(forget), headline(general)
    detail = hf
    if len(hf) == 1 and hf[0] in groups and not any(m in groups for m in groups[hf[0]]):
        detail = list(groups[hf[0]])
    table1 = forget + general if chosen else detail + hg
    return {"headline_forget": hf, "headline_general": hg, "table1": table1}


# -- the table ------------------------------------------------------------------------------------
def _value(results: dict, name: str, metric: str) -> dict | None:
    e = _entries(results).get(name)
    if e is None:
        return None
    if metric in e:
        return {"value": e[metric], "stderr": e.get(f"{metric}_stderr"), "n": e.get("n")}
    if PPL_METRIC in e:
        return {"value": e[PPL_METRIC], "stderr": None, "n": e.get("n")}
    return None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def comparison(rows: list[Row], forget: list[str] | tuple[str, ...] = DEFAULT_FORGET,
               tasks: list[str] | None = None, metric: str = "acc") -> dict:
    """The whole comparison as plain data: columns, and per row its values and summaries."""
    cols = columns(rows, forget, tasks, metric)
    out_rows = []
    for r in rows:
        values = {n: _value(r.results, n, metric)
                  for n in dict.fromkeys(cols["forget"] + cols["general"] + cols["table1"]
                                         + cols["perplexity"])}
        out_rows.append({"label": r.label, "method": r.method, "settings": r.settings,
                         "source": r.source, "values": values, "chat_score": r.chat,
                         "base": r.base.label if r.base is not None else None,
                         "robustness": summary(r.audit),
                         "forget_acc": _mean([_get(values, n) for n in cols["headline_forget"]]),
                         "general_acc": _mean([_get(values, n) for n in cols["headline_general"]])})
    return {"metric": metric, "forget_patterns": list(forget), "columns": cols, "rows": out_rows,
            "chat": any(r.chat is not None for r in rows),
            "robustness": any(r["robustness"] for r in out_rows)}


def _get(values: dict, name: str) -> float | None:
    v = values.get(name)
    return None if v is None else v["value"]


def _pct(v: dict | None) -> str:
    return "" if v is None or v["value"] is None else f"{100 * v['value']:.1f}"


def _ppl(v: dict | None) -> str:
    if v is None or v["value"] is None or not math.isfinite(v["value"]):
        return "" if v is None else str(v["value"])
    return f"{v['value']:.2f}" if v["value"] < 1e4 else f"{v['value']:.4g}"


def _table(head: list[str], rows: list[list[str]], left: int) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(head) - left)
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"] + \
        ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in rows]


def _change(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or a["value"] is None or b["value"] is None:
        return ""
    return f"{100 * (b['value'] - a['value']):+.1f}"


def format_markdown(table: dict) -> str:
    """The paper's Table 1 first (forget tasks, the general headline, chat score; each
    unlearned row followed by its change from its base), then every column, one per line."""
    cols, rows = table["columns"], table["rows"]
    chat, robust = bool(table.get("chat")), bool(table.get("robustness"))
    by_label = {r["label"]: r for r in rows}
    body = []
    for r in rows:
        v = r["values"]
        score = "" if r["chat_score"] is None else f"{r['chat_score']:.2f}"
        worst = share_text(r["robustness"]["worst_case"]) if r.get("robustness") else ""
        body.append([r["label"], r["method"]] + [_pct(v[n]) for n in cols["table1"]]
                    + ([score] if chat else []) + ([worst] if robust else []))
        base = by_label.get(r["base"] or "")
        if base is not None:  # the change from the base model of the same run
            bscore = base["chat_score"]
            body.append([f"Δ {r['label']}", "vs base"]
                        + [_change(base["values"][n], v[n]) for n in cols["table1"]]
                        + ([f"{r['chat_score'] - bscore:+.2f}" if r["chat_score"] is not None
                            and bscore is not None else ""] if chat else [])
                        + ([""] if robust else []))
    lines = _table(["run", "method"] + cols["table1"] + (["chat score"] if chat else [])
                   + (["worst-case recovery"] if robust else []), body, 2)
    lines.append(f"\n{table['metric']} in percent; Δ in points. Forget: "
                 f"{', '.join(cols['headline_forget']) or 'none'}; general: "
                 f"{', '.join(cols['headline_general']) or 'none'}."
                 + (" Chat score: judged 1-10 (MT-Bench style)." if chat else "")
                 + (" Worst-case recovery: the highest share of the unlearning gap any attack "
                    "of the run's audit recovers (below)." if robust else ""))
    if robust:
        lines += ["\nRobustness: the share of the unlearning gap each attack recovers, "
                  "(attacked - unlearned) / (base - unlearned), from each run's audit/audit.json "
                  "(n/a: no gap to recover; the oracle, never trained on the forget domains, is "
                  "the floor):", ""]
        lines += _table(*compare_table(rows), 2)
    settings = [f"- {r['label']} ({r['method']}): {r['settings']}" for r in rows if r["settings"]]
    if settings:
        lines += ["\nSettings (hyperparameters that differ from the method's defaults):"] + settings
    rest = [(n, side) for side in ("forget", "general") for n in cols[side]
            if n not in cols["table1"]]
    every = [[n, side] + [_pct(r["values"][n]) for r in rows] for n, side in rest] + \
        [[f"{n} ({PPL_METRIC})", "perplexity"] + [_ppl(r["values"][n]) for r in rows]
         for n in cols["perplexity"]]
    if every:
        lines += ["\nEvery other column:", ""]
        lines += _table(["column", "side"] + [r["label"] for r in rows], every, 2)
    return "\n".join(lines)


def plot(table: dict, path: str | Path, chance: float | None = 0.25) -> None:
    """The forget headline against the general headline, one labelled point per row (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=120)
    methods = dict.fromkeys(r["method"] for r in table["rows"] if r["method"] != "base")
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    shown: set[str] = set()
    for r in table["rows"]:
        x, y = r["general_acc"], r["forget_acc"]
        if x is None or y is None:
            continue
        base = r["method"] == "base"
        ax.scatter(100 * x, 100 * y, marker="*" if base else "o", s=160 if base else 36,
                   color="black" if base else colours[r["method"]], zorder=3,
                   label=None if r["method"] in shown else r["method"])
        shown.add(r["method"])
        ax.annotate(r["label"], (100 * x, 100 * y), textcoords="offset points", xytext=(4, 3),
                    fontsize=7, alpha=0.8)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls="--", lw=0.8,
                   label=f"chance ({100 * chance:.0f}%)")
    ax.legend(loc="best", fontsize=7)
    cols, metric = table["columns"], table["metric"]
    ax.set_xlabel(f"general {metric} (%): {_axis(cols['headline_general'])}")
    ax.set_ylabel(f"forget {metric} (%): {_axis(cols['headline_forget'])}")
    ax.set_title("Unlearning: forget vs general accuracy (lower right is better)", fontsize=9)
    ax.set_xlim(0, 102)  # whole scales: a 1-point change must not look like a collapse
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # a long axis label is kept, not clipped
    plt.close(fig)


def _axis(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "mean of " + ", ".join(names)


def run_compare(paths: list[str | Path], output: str | Path | None = None,
                forget: list[str] | None = None, tasks: list[str] | None = None,
                metric: str = "acc", overwrite: bool = False) -> dict:
    """The `wmdp compare` command: read runs, build the table; with `output`, write
    compare.md, compare.json and compare.png there."""
    if not paths:
        raise WmdpError("no run directories given")
    table = comparison(load_runs(paths), tuple(forget or DEFAULT_FORGET), tasks, metric)
    table["markdown"] = format_markdown(table)
    if output is not None:  # after reading the runs: bad runs leave the output untouched
        out = prepare_output_dir(output, overwrite, inputs={f"run {p}": p for p in paths})
        atomic_write_text(out / "compare.md", table["markdown"] + "\n")
        write_json(out / "compare.json", {k: v for k, v in table.items() if k != "markdown"})
        plot(table, out / "compare.png")
    return table


__all__ = ["DEFAULT_FORGET", "Row", "load_runs", "columns", "comparison", "format_markdown",
           "plot", "run_compare", "leaves"]

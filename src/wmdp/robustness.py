"""Robustness figures read from an audit record, for the report and `wmdp compare` (no torch).

    shares(audit)                   {column: Share}: every recovered share the audit reports
    worst_case(audit)               the highest share and its column (the attacker's best attack)
    protocol_rows(result, "rmu")    the relearning protocol's worst case per attack data and model
    protocol_table(result)          the same as a Markdown table
    summary(audit), compare_table(rows)   `wmdp compare`'s robustness columns

A share is (accuracy under attack - unlearned) / (base - unlearned): 0 nothing came back, 1 the
base model's accuracy is back. Each attack's verdict holds its pooled shares; every verdict key
named `recovered_fraction` or `recovered_fraction_SUFFIX` is one column, `ATTACK` or
`ATTACK (SUFFIX)`, its accuracy under attack in `attacked` or `attacked_SUFFIX`. So an attack
this module has never heard of is shown as soon as its verdict reports a share. A verdict's
`oracle` mapping holds the same keys for the oracle (the model that never learned the forget
domains; the relearning protocol's), its plain accuracy in `plain`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wmdp.protocol_plot import ROLES  # the protocol's models, in the order tables show them

SHARE = "recovered_fraction"


@dataclass
class Share:
    """One column: an attack (or one of its variants) and the share of the gap it recovers."""

    column: str                       # "relearn", "relearn (control)", "protocol (retain)", ...
    attack: str
    share: float | None               # None: no gap to recover (verdicts say so)
    unlearned: float | None           # plain accuracy of the unlearned model, same questions
    attacked: float | None            # its accuracy under the attack
    base: float | None                # plain accuracy of the base model
    oracle: float | None = None       # the oracle's share, where the attack ran on it
    oracle_plain: float | None = None
    oracle_attacked: float | None = None


def _number(x: object) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def shares(audit: dict | None) -> dict[str, Share]:
    """Every share in the audit's verdicts, in the audit's order of attacks and keys."""
    out: dict[str, Share] = {}
    for attack, result in ((audit or {}).get("attacks") or {}).items():
        verdict = (result or {}).get("verdict") or {}
        oracle = verdict.get("oracle") or {}
        for key in verdict:
            if key != SHARE and not key.startswith(SHARE + "_"):
                continue
            suffix = key[len(SHARE) + 1:]
            column = f"{attack} ({suffix})" if suffix else attack
            attacked = f"attacked_{suffix}" if suffix else "attacked"
            out[column] = Share(column, attack, _number(verdict[key]),
                                _number(verdict.get("unlearned")), _number(verdict.get(attacked)),
                                _number(verdict.get("base")), _number(oracle.get(key)),
                                _number(oracle.get("plain")), _number(oracle.get(attacked)))
    return out


def worst_case(audit: dict | None) -> tuple[float | None, str | None]:
    """The highest share over every attack and its column ((None, None) when there is none)."""
    found = [(s.share, c) for c, s in shares(audit).items() if s.share is not None]
    return max(found, key=lambda x: x[0]) if found else (None, None)


def pct(x: float | None) -> str:
    """An accuracy in percent, one decimal ("" when absent)."""
    return "" if _number(x) is None else f"{100 * x:.1f}"


def share_text(x: float | None) -> str:
    """A share in whole percent; "n/a" when there was no gap to recover."""
    return "n/a" if _number(x) is None else f"{100 * x:.0f}%"


PROTOCOL_HEADER = ["attack data", "model", "plain", "worst case", "recovered share",
                   "general acc after (min)", "retain ppl after (plain)",
                   "at (lr, texts, method, seed, step)"]


def protocol_rows(result: dict, method: str = "unlearned") -> list[list[str]]:
    """Per attack data, base, the unlearned model (named `method`) and the oracle side by side:
    plain accuracy, the worst case over the grid, the recovered share, and the model's general
    accuracy (lowest task) and retain perplexity at that point. Accuracy in percent."""
    models = result.get("models") or {}
    kinds = list(dict.fromkeys(k for m in models.values() for k in m.get("attacks", {})))
    rows = []
    for kind in kinds:
        for role in [r for r in ROLES if r in models] + [r for r in models if r not in ROLES]:
            m = models[role]
            if kind not in m.get("attacks", {}):
                continue
            a, plain = m["attacks"][kind], m.get("plain", {})
            w = a["worst_case"]
            ppl = "" if _number(w.get("retain_ppl")) is None else (
                f"{w['retain_ppl']:.3f} ({plain['retain_ppl']:.3f})"
                if _number(plain.get("retain_ppl")) is not None else f"{w['retain_ppl']:.3f}")
            rows.append([kind, method if role == "unlearned" else role,
                         pct(plain.get("forget_acc")), pct(w["forget_acc"]),
                         share_text(a.get("recovered_share")), pct(w.get("general_acc")), ppl,
                         f"{w['lr']:g}, {w['size']}, {w['method']}, {w['seed']}, {w['step']}"])
    return rows


def protocol_table(result: dict, method: str = "unlearned") -> str:
    """Markdown: per attack data and model, plain -> worst case, share, ability after."""
    rows = protocol_rows(result, method)
    return "\n".join(["| " + " | ".join(PROTOCOL_HEADER) + " |",
                      "|---|---|" + "---:|" * 5 + "---|"] + ["| " + " | ".join(r) + " |"
                                                             for r in rows])


def _value(x: object) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def protocol_summary(result: dict) -> str:
    """Sentences: the grid, and what the worst case is taken over."""
    cfg = result.get("config") or {}
    axes = [(name, cfg[key]) for name, key in (("attack data", "data"), ("learning rate", "lrs"),
                                               ("texts", "sizes"), ("method", "methods"),
                                               ("seed", "seeds")) if cfg.get(key)]
    runs = math.prod(len(v) for _, v in axes)
    n = sum((result.get("questions") or {}).values())
    return (f"The grid ({' x '.join(str(len(v)) for _, v in axes)} = {runs} runs per model, the "
            "same for every model): "
            + "; ".join(f"{name} {', '.join(map(_value, v))}" for name, v in axes)
            + f"; each run read at steps {', '.join(map(str, cfg.get('checkpoints', [])))}. The "
            "worst case is the run and checkpoint with the highest forget accuracy (the attacker "
            "picks the best attack; averaging would hide it), shown with the model's general "
            f"accuracy and retain perplexity at that point. On the {n} forget questions that no "
            "forget attack text names.")


def summary(audit: dict | None) -> dict | None:
    """A run's robustness for `wmdp compare`: its worst case, every share by column, and the
    oracle's shares where the audit has them (None: no audit, or no attack reports a share)."""
    found = shares(audit)
    if not found:
        return None
    worst, column = worst_case(audit)
    oracle = {c: s.oracle for c, s in found.items() if s.oracle_plain is not None}
    return {"worst_case": worst, "worst_attack": column,
            "shares": {c: s.share for c, s in found.items()}, "oracle": oracle or None}


def compare_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """`wmdp compare`'s robustness table: per run with an audit its worst case and every share
    (the columns of all runs' audits, in order of first appearance), then the oracle (once per
    distinct set of figures: runs on one sandbox share it)."""
    found = [r for r in rows if r.get("robustness")]
    columns = list(dict.fromkeys(c for r in found for c in r["robustness"]["shares"]))
    body = [[r["label"], r["method"], share_text(r["robustness"]["worst_case"])]
            + [share_text(r["robustness"]["shares"][c]) if c in r["robustness"]["shares"]
               else "" for c in columns] for r in found]
    oracles: dict[str, tuple[str, dict]] = {}
    for r in found:
        o = r["robustness"]["oracle"]
        if o:
            oracles.setdefault(repr(sorted(o.items())), (r["label"], o))
    for label, o in oracles.values():
        values = [v for v in o.values() if v is not None]
        body.append(["oracle" if len(oracles) == 1 else f"oracle ({label})", "oracle",
                     share_text(max(values) if values else None)]
                    + [share_text(o[c]) if c in o else "" for c in columns])
    return ["run", "method", "worst case"] + columns, body


__all__ = ["Share", "summary", "compare_table", "shares", "worst_case", "protocol_rows",
           "protocol_table", "protocol_summary", "share_text", "pct", "PROTOCOL_HEADER"]

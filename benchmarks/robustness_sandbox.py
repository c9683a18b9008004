"""Is it gone, or hidden? Every robust unlearning method beside RMU, NPO, SSD and the oracle,
under the relearning protocol's grid, on two sandbox worlds: one command, resumable.

    .venv/bin/python benchmarks/robustness_sandbox.py                       # seeds 0 and 1
    .venv/bin/python benchmarks/robustness_sandbox.py --grid default        # the full grid
    .venv/bin/python benchmarks/robustness_sandbox.py --sandbox 0=/tmp/sb0 --budget-s 330

Per world (`wmdp sandbox build` with its oracle, built into WORK/sandbox-seedN unless given):
each method at its `sandbox` preset (`wmdp unlearn NAME --preset sandbox` on the sandbox model,
forget_bio + forget_cyber, retain.jsonl; UNDO also distils on the world's general-domain
question-answer lines, `general_qa.jsonl`: the oracle's training text without its prose),
then per model (base, oracle, every method) the protocol grid (`wmdp.audit.protocol`, the same
grid for every model, fixed before any method was tuned): every attack run's curve, the worst
case over the grid and its recovered share (attack - plain) / (base - plain). `--grid small`
is the protocol's default grid cut to forget-domain attack text, 8 texts, full fine-tuning
(lrs, checkpoints and seeds unchanged): the attack that recovers RMU most.
`--grid strong` adds 32 texts and LoRA at the two higher rates (24 runs a model).

Everything goes to WORK (default runs/robustness): the worlds and their unlearned models
(<world>/<method>/, shared by every grid), protocol/<world>/<model>/ (plain.json and runs.jsonl,
one line per finished attack run: a rerun skips them), then robustness.json and robustness.md;
a grid other than `small` keeps its own protocol-<grid>/ and robustness-<grid>.json/.md, so
one WORK holds every grid's figures on the same models without mixing them. `--budget-s N`
stops after about N seconds (rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (label, method, overrides over its sandbox preset); UNDO's general_qa is added per world
METHODS: list[tuple[str, str, list[str]]] = [
    ("rmu", "rmu", []), ("undo", "undo", []),
    ("rmu-lat", "rmu-lat", []), ("rmu-sam", "rmu-sam", []), ("npo-sam", "npo-sam", []),
    ("npo", "npo", []), ("ssd", "ssd", []),
    # the previous sandbox preset: retain prose only, 20 passes, alpha 0.5, RMU's own preset
    ("undo-retain-only", "undo", ["undo.distill_corpora=[]", "undo.alpha=0.5", "epochs=20",
                                  "undo.teacher_overrides=[]", "undo.bos_prefix=false"]),
]
SMALL = ["data=[forget]", "sizes=[8]", "methods=[full]"]
# the attacks that recover most, stronger: more texts and LoRA too, the two higher rates
STRONG = ["data=[forget]", "sizes=[8,32]", "methods=[full,lora]", "lrs=[3e-4,1e-3]"]
GRIDS = {"small": SMALL, "strong": STRONG, "default": []}


class OutOfBudget(Exception):
    pass


class Clock:
    def __init__(self, budget_s: float | None) -> None:
        self.t0, self.budget = time.perf_counter(), budget_s

    def check(self) -> None:
        if self.budget is not None and time.perf_counter() - self.t0 > self.budget:
            raise OutOfBudget


# -- worlds and models ----------------------------------------------------------------------------
def world(seed: int, given: str | None, work: Path) -> Path:
    """A default sandbox of `seed` with its oracle (built, or finished, when missing)."""
    from wmdp.sandbox.build import build_sandbox, sandbox_config

    path = Path(given) if given else work / f"sandbox-seed{seed}"
    manifest = path / "data" / "manifest.json"
    if not (manifest.is_file() and "oracle" in json.loads(manifest.read_text())):
        build_sandbox(path, sandbox_config("default", seed))
    return path


def general_qa(sandbox: Path, work: Path) -> Path:
    """The world's general-domain QA lines (what `wmdp run` gives UNDO on a sandbox), as a file."""
    from wmdp.io import write_jsonl
    from wmdp.sandbox.data import general_qa_texts

    out = work / sandbox.name / "general_qa.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, [{"text": t} for t in general_qa_texts(sandbox / "data")])
    return out


def unlearn(label: str, method: str, overrides: list[str], sandbox: Path, work: Path) -> Path:
    from wmdp.unlearn import resolve, run_unlearning

    data = sandbox / "data"
    extra = ([f"undo.distill_corpora=[{general_qa(sandbox, work)}]"] if method == "undo" else [])
    flags = {"model": str(sandbox / "model"), "output": str(work / sandbox.name / label),
             "forget_corpora": [str(data / "forget_bio.jsonl"), str(data / "forget_cyber.jsonl")],
             "retain_corpora": [str(data / "retain.jsonl")] * 2, "dtype": "float32",
             "device": "cpu"}
    m, hp, config = resolve(method, preset="sandbox", settings=flags,
                            overrides=extra + overrides)
    return run_unlearning(m, hp, config, progress=False)


def cost(model_dir: Path) -> float:
    """Unlearning seconds (UNDO's: its teacher's too), from the run records."""
    record = json.loads((model_dir / "unlearn_config.json").read_text())
    teacher = record.get("method_state", {}).get("teacher", {})
    return record["seconds"] + (teacher.get("seconds") or 0.0)


# -- the protocol, one model at a time ------------------------------------------------------------
def protocol_cell(role: str, model_dir: Path | None, sandbox: Path, out: Path, config, clock,
                  bar) -> dict:
    """{"plain", "runs"} of one model over the grid; finished runs are read back, not rerun."""
    import torch

    from wmdp.audit import protocol as P

    out.mkdir(parents=True, exist_ok=True)
    inputs = P.sandbox_inputs(sandbox, model_dir or sandbox / "model")
    model, tok = inputs.models["unlearned" if model_dir else role]
    plan = P.plan_attacks(inputs, config)
    evaluate = P.evaluator(inputs, tok, plan, config)

    model.eval()
    torch.set_num_threads(1)
    plain_file, runs_file = out / "plain.json", out / "runs.jsonl"
    if not plain_file.is_file():
        plain_file.write_text(json.dumps(evaluate(model)))
    plain = json.loads(plain_file.read_text())
    done = ([json.loads(x) for x in runs_file.read_text().splitlines()]
            if runs_file.is_file() else [])
    keys = {(r["data"], r["lr"], r["size"], r["method"], r["seed"]) for r in done}
    bar.update(len(keys))
    for kind, lr, size, method, seed in P.grid(config):
        if (kind, lr, size, method, seed) in keys:
            continue
        clock.check()
        t0 = time.perf_counter()
        curve = P.attack_run(model, tok, plan.texts[kind][:size], lr, method, seed, config,
                             evaluate)
        run = {"data": kind, "lr": lr, "size": size, "method": method, "seed": seed,
               "curve": curve, "seconds": round(time.perf_counter() - t0, 2)}
        with open(runs_file, "a") as f:
            f.write(json.dumps(run) + "\n")
        done.append(run)
        bar.update(1)
    return {"plain": plain, "runs": done}


# -- the table -----------------------------------------------------------------------------------
def summary(cells: dict, costs: dict, build_s: float, config) -> dict:
    from wmdp.audit.protocol import worst_case

    base = cells["base"]
    rows = {}
    for role, cell in cells.items():
        attacks = {k: worst_case(cell, k, base["plain"]["forget_acc"], config)
                   for k in config.data}
        for a in attacks.values():  # the retain perplexity at the worst case, against the base's
            a["retain_ppl_change_after"] = (a["worst_case"]["retain_ppl"]
                                            / base["plain"]["retain_ppl"] - 1)
        general = cell["plain"]["general"]
        rows[role] = {
            "forget_acc": cell["plain"]["forget_acc"], "weakest_general": min(general.values()),
            "general": general, "retain_ppl": cell["plain"]["retain_ppl"],
            "retain_ppl_change": cell["plain"]["retain_ppl"] / base["plain"]["retain_ppl"] - 1,
            "attacks": attacks, "seconds": costs.get(role),
            "attack_seconds": sum(r.get("seconds", 0.0) for r in cell["runs"]),
            "x_rmu": costs[role] / costs["rmu"] if role in costs and "rmu" in costs else None,
            "x_build": costs[role] / build_s if role in costs else None}
    return rows


def world_record(sandbox: Path, cells: dict, costs: dict, states: dict, config) -> dict:
    """A world's rows, its build's training seconds, and each distilling method's student
    budget: the texts it read as a fraction of the texts the sandbox model trained on."""
    from wmdp.sandbox.build import BUILD

    manifest = json.loads((sandbox / "data" / "manifest.json").read_text())
    build_s = manifest["build"]["train_seconds"]
    batch = json.loads((sandbox / BUILD).read_text())["config"]["train"]["batch_size"]
    trained = manifest["counts"]["steps"] * batch  # the config the build recorded, as run
    rows = summary(cells, costs, build_s, config)
    for label, record in states.items():
        read = record.get("method_state", {}).get("distill_texts")
        if read is not None and label in rows:
            rows[label].update(student_texts=read, student_budget=read / trained)
    return {"sandbox": str(sandbox), "build_train_seconds": build_s,
            "training_texts_read": trained, "rows": rows}


def table(record: dict) -> str:
    """One row per world and model; the worst case per attack data kind (forget-domain text
    first, with the general accuracy after it; retain and general text, where gridded, beside)."""
    g = record["grid"]
    kinds = [k for k in ("forget", "retain", "general") if k in g["data"]]
    others = kinds[1:]
    lines = [f"Grid `{record['grid_name']}` (every model the same): data {g['data']}, lr "
             f"{g['lrs']}, texts {g['sizes']}, {g['methods']}, checkpoints {g['checkpoints']}, "
             f"attack seeds {g['seeds']}; worst case over all of it.", "",
             "| world | method | forget acc | weakest general domain | retain ppl change | "
             "worst-case recovered share (forget acc after)" + ", forget text" * bool(others)
             + " | general after | retain ppl after | "
             + "".join(f"{k} text: share (acc) | " for k in others)
             + "cost s (x RMU, x sandbox build) |",
             "|---|---|" + "---:|" * (7 + len(others))]

    def shown(a: dict) -> str:
        share = a["recovered_share"]
        return f"{'-' if share is None else f'{share:.0%}'} ({a['worst_case']['forget_acc']:.3f})"

    for seed, w in record["worlds"].items():
        for role, r in w["rows"].items():
            a = r["attacks"][kinds[0]]
            x_rmu = "-" if r["x_rmu"] is None else f"{r['x_rmu']:.1f}x"  # rmu not run
            student = ("" if r.get("student_budget") is None
                       else f"; student {r['student_budget']:.0%} of training")
            cost_s = "" if r["seconds"] is None else \
                f"{r['seconds']:.0f} ({x_rmu}, {r['x_build']:.2f}x{student})"
            lines.append(
                f"| {seed} | {role} | {r['forget_acc']:.3f} | {r['weakest_general']:.3f} | "
                f"{r['retain_ppl_change']:+.1%} | {shown(a)} "
                f"| {a['worst_case']['general_acc']:.3f} | {a['retain_ppl_change_after']:+.1%} | "
                + "".join(f"{shown(r['attacks'][k])} | " for k in others) + f"{cost_s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dataclasses import asdict

    from wmdp.audit.protocol import ProtocolConfig, grid
    from wmdp.config import apply_overrides, from_dict
    from wmdp.progress import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/robustness")
    p.add_argument("--seeds", default="0,1", help="world seeds")
    p.add_argument("--sandbox", action="append", default=[], metavar="SEED=DIR",
                   help="a built sandbox (with its oracle) for a world seed")
    p.add_argument("--grid", choices=list(GRIDS), default="small")
    p.add_argument("--methods", default=",".join(m[0] for m in METHODS))
    p.add_argument("--budget-s", type=float, default=None, help="stop after about this long")
    p.add_argument("--partial", action="store_true", help="with --budget-s 0: the table of the "
                   "finished models only, running nothing (the others are listed as unfinished)")
    args = p.parse_args(argv)
    work, clock = Path(args.work), Clock(args.budget_s)
    tag = "" if args.grid == "small" else f"-{args.grid}"  # each grid its own results
    given = dict(s.split("=", 1) for s in args.sandbox)
    config = from_dict(ProtocolConfig, apply_overrides({}, GRIDS[args.grid]),
                       "grid")
    chosen = [m for m in METHODS if m[0] in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    n = len(grid(config)) * (len(chosen) + 2) * len(seeds)
    bar = tqdm(total=n, desc="relearning grid runs", unit="run")
    record = {"grid_name": args.grid, "grid": asdict(config), "worlds": {}}
    try:
        for seed in seeds:
            sandbox = world(seed, given.get(str(seed)), work)
            costs, cells, cell_dir = {}, {}, work / f"protocol{tag}" / sandbox.name
            states: dict = {}
            for label, method, overrides in [("base", None, []), ("oracle", None, [])] + chosen:
                try:
                    if method is None:  # the base model and the oracle, from the sandbox
                        cells[label] = protocol_cell(label, None, sandbox, cell_dir / label,
                                                     config, clock, bar)
                        continue
                    if not (work / sandbox.name / label / "unlearn_config.json").is_file():
                        clock.check()
                    model_dir = unlearn(label, method, overrides, sandbox, work)
                    cells[label] = protocol_cell(label, model_dir, sandbox, cell_dir / label,
                                                 config, clock, bar)
                    costs[label] = cost(model_dir)
                    states[label] = json.loads((model_dir / "unlearn_config.json").read_text())
                except OutOfBudget:
                    if not args.partial:
                        raise
                    record.setdefault("unfinished", []).append(f"{seed}:{label}")
            if "base" not in cells:  # every share is against the base model's figures
                continue
            record["worlds"][str(seed)] = world_record(sandbox, cells, costs, states, config)
    except OutOfBudget:
        bar.close()
        print(f"stopped after the {args.budget_s:g} s budget; rerun to continue", file=sys.stderr)
        return 3
    bar.close()
    if record.get("unfinished"):
        print(f"unfinished (rerun without --partial): {', '.join(record['unfinished'])}")
    (work / f"robustness{tag}.json").write_text(json.dumps(record, indent=1))
    (work / f"robustness{tag}.md").write_text(table(record) + "\n")
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`wmdp sweep`: a hyperparameter grid, forget accuracy against general accuracy, a Pareto
front, and the selected point, the way the paper tuned RMU.

    wmdp sweep configs/sandbox.yaml --grid adaptive_coeff=1,3,10 alpha=10,100 --output runs/sweep

Grid keys are the method's hyperparameters and the shared settings in `GRID_SHARED`
(`steering_coeff` stands for a one-element `steering_coeffs`; sweeping `layer_id` alone also
moves `layer_ids` to the three blocks ending there, as the paper's grid did). Before anything
runs, every point is resolved and checked: a key the method does not read under the resolved
settings (RMU's `steering_coeff` while `adaptive_coeff` is set, as in the sandbox preset), or
two points that would train the same model, is an error. The base model is evaluated once;
each point is a run of its own under `points/` (unlearn, evaluate), so an interrupted sweep
resumes point by point. The selected point has the lowest forget accuracy among those whose
general accuracy fell by at most `max_general_drop` (absolute accuracy) from the base model's.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from wmdp.config import to_dict, unknown_name, yaml_load
from wmdp.errors import WmdpError
from wmdp.io import atomic_write_text, prepare_output_dir, read_json, sha256_json, write_json
from wmdp.pipeline import STAGES, Pipeline, RunConfig

SWEEP = "sweep.json"
ALIASES = {"steering_coeff": "steering_coeffs"}
GRID_SHARED = ("batch_size", "max_num_batches", "epochs", "min_len", "seed")  # unlearn.settings


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2` strings to {key: [values]} (values parsed as YAML scalars)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise WmdpError(f"--grid {item!r} is not of the form key=v1,v2,...")
        if key in grid:
            raise WmdpError(f"--grid names {key} twice; give its values once: {key}=v1,v2,...")
        parsed = [_value(v, item) for v in values.split(",") if v.strip()]
        repeated = [v for i, v in enumerate(parsed) if v in parsed[:i]]
        if repeated:
            raise WmdpError(f"--grid {item}: the value {repeated[0]!r} is given twice")
        grid[key] = parsed
    return grid


def _value(text: str, item: str) -> Any:
    import yaml

    try:
        return yaml_load(text)
    except yaml.YAMLError:
        raise WmdpError(f"--grid {item}: {text!r} is not a value (values are separated by "
                        "commas, so a grid holds scalars)") from None


def grid_keys(method: str) -> list[str]:
    """What a grid may name for `method`: its hyperparameters, their aliases, GRID_SHARED."""
    from wmdp.unlearn.registry import METHODS

    fields = [f.name for f in dataclasses.fields(METHODS[method][1])]
    return fields + [a for a, name in ALIASES.items() if name in fields] + list(GRID_SHARED)


def point_settings(method: str, point: dict[str, Any]) -> dict[str, Any]:
    """A grid point to the method's hyperparameter settings (shared ones included)."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        name = ALIASES.get(key, key)
        out[name] = [value] if name != key else value
    if "layer_id" in point and "layer_ids" not in point:
        out["layer_ids"] = list(range(max(0, point["layer_id"] - 2), point["layer_id"] + 1))
    return out


def point_config(config: RunConfig, point: dict[str, Any], output: Path) -> RunConfig:
    """The run of one grid point: the config with the point's settings, no audit or chat."""
    method = config.unlearn.method
    settings = copy.deepcopy(config.unlearn.settings)
    for key, value in point_settings(method, point).items():
        if key in GRID_SHARED:
            settings[key] = value
        else:
            settings[method] = {**(settings.get(method) or {}), key: value}
    return replace(config, output=str(output), audit=None, chat=None,
                   unlearn=replace(config.unlearn, settings=settings))


def ignored_settings(method: str, hparams: Any) -> dict[str, str]:
    """Hyperparameters the method does not read under these settings, with why (a method's
    code decides this; it is stated here so a sweep can refuse to vary them)."""
    out = {}
    if method == "rmu" and hparams.adaptive_coeff is not None:
        out["steering_coeffs"] = (
            f"adaptive_coeff is {hparams.adaptive_coeff}, so the steering coefficient is "
            f"{hparams.adaptive_coeff}x the layer's activation norm and steering_coeffs is not "
            "read (sweep adaptive_coeff, or add --set unlearn.settings.rmu.adaptive_coeff=null)")
    if method == "rmu" and hparams.control != "keywords":
        out["keywords"] = f"control is {hparams.control!r}: keywords are read only by control=keywords"
    return out


def plan_points(config: RunConfig, grid: dict[str, list[Any]], out: Path) -> list[tuple[dict, RunConfig]]:
    """Every point resolved and checked before anything runs: known keys, each point's whole
    configuration, and no two points training the same model (a key the method ignores)."""
    method = config.unlearn.method
    Pipeline(replace(config, output=str(out / "base")), create=False)  # method name, settings
    known = grid_keys(method)
    for key in grid:
        if key not in known:
            raise unknown_name("grid key", key, known, "--grid")
    planned, seen = [], {}
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        cfg = point_config(config, point, out / "points" / slug(point))
        _, hparams, unlearn = Pipeline(cfg, create=False).unlearn_settings()
        ignored = ignored_settings(method, hparams)
        kept = {k: v for k, v in to_dict(hparams).items() if k not in ignored}
        fp = unlearn.fingerprint(method, kept)  # what changes the model, and nothing else
        if fp in seen:
            raise _same_model(seen[fp], point, ignored)
        seen[fp] = point
        planned.append((point, cfg))
    return planned


def _same_model(a: dict, b: dict, ignored: dict[str, str]) -> WmdpError:
    differ = [k for k in a if a[k] != b[k]]
    for key in differ:
        if ALIASES.get(key, key) in ignored:
            return WmdpError(f"--grid {key}: no effect on the model: {ignored[ALIASES.get(key, key)]}")
    return WmdpError(f"--grid points {slug(a)} and {slug(b)} resolve to the same settings "
                     f"(the same model twice); vary something else than {', '.join(differ)}")


def slug(point: dict[str, Any]) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()).replace("/", "-")


def score(results: dict, name: str) -> float:
    r = results.get("groups", {}).get(name) or results.get("results", {}).get(name)
    if r is None or "acc" not in r:
        raise WmdpError(f"sweep metric {name!r} is not in the evaluation (tasks and groups: "
                        f"{', '.join(list(results.get('groups', {})) + list(results.get('results', {})))})")
    return float(r["acc"])


def pareto_front(points: list[dict]) -> list[int]:
    """Indices of points no other point beats on both forget (lower) and general (higher)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(q["forget"] <= p["forget"] and q["general"] >= p["general"]
                        and (q["forget"] < p["forget"] or q["general"] > p["general"])
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i]["forget"])


def select(points: list[dict], base_general: float, max_general_drop: float) -> int | None:
    """Lowest forget accuracy among points within the general-accuracy bound (ties: higher
    general accuracy)."""
    ok = [i for i, p in enumerate(points) if base_general - p["general"] <= max_general_drop + 1e-12]
    if not ok:
        return None
    return min(ok, key=lambda i: (points[i]["forget"], -points[i]["general"]))


def run_sweep(config: RunConfig, grid: dict[str, list[Any]], output: str | Path, *,
              forget_metric: str, general_metric: str, max_general_drop: float = 0.05,
              overwrite: bool = False, progress: bool = True) -> dict:
    if not grid:
        raise WmdpError("--grid names no hyperparameter")
    if not 0 <= max_general_drop <= 1:  # NaN fails too
        raise WmdpError(f"--max-general-drop is {max_general_drop}, expected 0-1 "
                        "(absolute accuracy: 0.05 is 5 points)")
    planned = plan_points(config, grid, Path(output))  # before sweep.json: nothing left behind
    fingerprint = sha256_json({"config": to_dict(config), "grid": grid})
    out = prepare_output_dir(output, overwrite, SWEEP, fingerprint, inputs={
        "model": config.model, "eval.data_dir": config.eval.data_dir, **config.eval.task_files})
    write_json(out / SWEEP, {"fingerprint": fingerprint, "grid": grid, "config": to_dict(config),
                             "done": False})
    base_cfg = replace(config, output=str(out / "base"), audit=None, chat=None)
    base = Pipeline(base_cfg, progress=progress)
    base.run(stop_after="eval_base")
    base_results = read_json(base.dir / "eval_base" / "results.json")
    base_point = {"forget": score(base_results, forget_metric),  # a wrong metric: before training
                  "general": score(base_results, general_metric)}
    points = []
    for i, (point, cfg) in enumerate(planned, 1):
        print(f"wmdp: sweep point {i}/{len(planned)}: {slug(point)}")
        pipe = Pipeline(cfg, progress=progress)
        if "eval_base" not in pipe.done():  # the base model is evaluated once for all points
            shutil.copytree(base.dir / "eval_base", pipe.dir / "eval_base", dirs_exist_ok=True)
            done = pipe.done()
            done.update(read_json(base.dir / STAGES))
            write_json(pipe.dir / STAGES, done)
        pipe.run(stop_after="eval_unlearned")  # the sweep's own table and plot report it
        res = read_json(pipe.dir / "eval_unlearned" / "results.json")
        points.append({"point": point, "dir": str(pipe.dir.relative_to(out)),
                       "forget": score(res, forget_metric), "general": score(res, general_metric)})
    front = pareto_front(points)
    chosen = select(points, base_point["general"], max_general_drop)
    summary = {"fingerprint": fingerprint, "grid": grid, "config": to_dict(config), "done": True,
               "forget_metric": forget_metric, "general_metric": general_metric,
               "max_general_drop": max_general_drop, "base": base_point, "points": points,
               "pareto_front": front, "selected": chosen}
    _plot(out / "pareto.png", summary)
    atomic_write_text(out / "sweep.md", sweep_table(summary))
    write_json(out / SWEEP, summary)
    return summary


def sweep_table(s: dict) -> str:
    lines = [f"Forget metric `{s['forget_metric']}`, general metric `{s['general_metric']}`; "
             f"selected: lowest forget accuracy with a general drop of at most "
             f"{100 * s['max_general_drop']:.1f} points.", "",
             "| # | point | forget acc | general acc | general drop | Pareto | selected |",
             "|---:|---|---:|---:|---:|:-:|:-:|",
             f"| | base | {100 * s['base']['forget']:.1f} | {100 * s['base']['general']:.1f} | | | |"]
    for i, p in enumerate(s["points"]):
        lines.append(f"| {i + 1} | {slug(p['point'])} | {100 * p['forget']:.1f} | {100 * p['general']:.1f} | "
                     f"{100 * (s['base']['general'] - p['general']):.1f} | "
                     f"{'yes' if i in s['pareto_front'] else ''} | "
                     f"{'**yes**' if i == s['selected'] else ''} |")
    if s["selected"] is None:
        lines.append("\nNo point kept general accuracy within the bound.")
    return "\n".join(lines) + "\n"


def _plot(path: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = s["points"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([100 * p["forget"] for p in pts], [100 * p["general"] for p in pts], c="#888",
               label="grid points")
    for i, p in enumerate(pts, 1):  # numbered as in sweep.md's table
        ax.annotate(str(i), (100 * p["forget"], 100 * p["general"]), fontsize=7,
                    xytext=(3, 3 + 6 * (i % 3)), textcoords="offset points")
    front = [pts[i] for i in s["pareto_front"]]
    ax.plot([100 * p["forget"] for p in front], [100 * p["general"] for p in front], "-o",
            color="#c33", label="Pareto front")
    ax.scatter([100 * s["base"]["forget"]], [100 * s["base"]["general"]], marker="s", c="k",
               label="base model")
    ax.axhline(100 * (s["base"]["general"] - s["max_general_drop"]), ls="--", c="#36c", lw=1,
               label="general-accuracy bound")
    if s["selected"] is not None:
        sel = pts[s["selected"]]
        ax.scatter([100 * sel["forget"]], [100 * sel["general"]], marker="*", s=250, c="gold",
                   edgecolors="k", label="selected", zorder=5)
    ax.set_xlabel(f"forget accuracy, {s['forget_metric']} (%)")
    ax.set_ylabel(f"general accuracy, {s['general_metric']} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

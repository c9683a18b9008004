"""`wmdp run` and `wmdp sweep` on a tiny model: stages, resume, the report's numbers, the sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import MISTRAL_TOK, save_tiny_model, write_mcq_jsonl
from wmdp.config import from_dict
from wmdp.pipeline import RunConfig, load_run_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny model, WMDP- and MMLU-named question files, forget/retain corpora."""
    d = tmp_path_factory.mktemp("world")
    model = save_tiny_model(d / "model", "llama", MISTRAL_TOK, layers=4)
    data = d / "data"
    data.mkdir()
    for i, name in enumerate(["wmdp_bio", "wmdp_cyber", "wmdp_chem", "college_biology_test",
                              "virology_test"]):
        write_mcq_jsonl(data / f"{name}.jsonl", 12 + 3 * i, seed=i)
    words = "alpha beta gamma delta omega theta kappa sigma".split()
    for name, seed in (("forget_a", 1), ("forget_b", 2), ("retain", 3)):
        import random

        rng = random.Random(seed)
        (d / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))}) + "\n"
            for _ in range(24)))
    return {"dir": d, "model": str(model), "data": str(data)}


def tiny_config(world: dict, output: Path, **unlearn) -> RunConfig:
    d = world["dir"]
    return from_dict(RunConfig, {
        "output": str(output), "model": world["model"], "dtype": "float32", "device": "cpu",
        "eval": {"tasks": ["wmdp", "mmlu_college_biology", "mmlu_virology", "ppl_retain"],
                 "data_dir": world["data"], "task_files": {"ppl_retain": str(d / "retain.jsonl")},
                 "forget": ["wmdp_bio", "wmdp_cyber", "wmdp_chem"],
                 "near": ["mmlu_college_biology", "mmlu_virology"], "batch_size": "8"},
        "unlearn": {"method": "rmu", "settings": {
            "forget_corpora": [str(d / "forget_a.jsonl"), str(d / "forget_b.jsonl")],
            "retain_corpora": [str(d / "retain.jsonl")] * 2, "max_num_batches": 4,
            "checkpoint_every": 1,
            "rmu": {"layer_id": 2, "layer_ids": [1, 2], "steering_coeffs": [8.0],
                    "alpha": [10.0], "lr": 1e-3, **unlearn}}},
    })


def numbers(text: str) -> list[str]:
    return re.findall(r"[-+]?\d+\.\d+", text)


def test_run_writes_every_stage_and_a_faithful_report(world, tmp_path):
    run_dir = run_pipeline(tiny_config(world, tmp_path / "run"), progress=False)
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["eval_base", "unlearn", "eval_unlearned", "report"]
    base = json.loads((run_dir / "eval_base" / "results.json").read_text())
    unl = json.loads((run_dir / "eval_unlearned" / "results.json").read_text())
    report = (run_dir / "report.md").read_text()
    tables = "\n".join(line for line in report.splitlines() if line.startswith("|"))
    # every accuracy, stderr and perplexity of both results files is in the report's tables
    expected = set()
    for res in (base, unl):
        for part in ("results", "groups"):
            for name, r in res[part].items():
                for key in ("acc", "acc_stderr"):
                    if r.get(key) is not None:
                        expected.add(f"{100 * r[key]:.1f}")
                for key in PPL_METRICS:
                    if key in r:
                        expected.add(f"{r[key]:.3f}")
    found = set(numbers(tables))
    assert expected <= found
    # and nothing else: every number in a table is one of them or a difference of two
    deltas = {f"{100 * (unl[p][n]['acc'] - base[p][n]['acc']):+.1f}"
              for p in ("results", "groups") for n in base[p] if "acc" in base[p][n]}
    deltas |= {f"{100 * (unl['results'][n][m] / base['results'][n][m] - 1):+.1f}"  # relative, %
               for n in base["results"] for m in PPL_METRICS if m in base["results"][n]}
    assert found <= expected | deltas
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    # the page's tables hold the same numbers as report.md's (HTML cells, not markdown)
    cells = set(numbers(" ".join(re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", html, re.S))))
    assert expected <= cells
    card = (run_dir / "unlearned" / "README.md").read_text()
    assert "forget_a.jsonl" in card and "wmdp_bio (forget)" in card


def test_interrupted_run_resumes_at_the_unfinished_stage(world, tmp_path, monkeypatch):
    from wmdp import evaluate
    from wmdp.unlearn.rmu import RMU

    whole = run_pipeline(tiny_config(world, tmp_path / "whole"), progress=False)
    real = RMU.loss

    def interrupted(self, step):
        if step.idx == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(RMU, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config(world, tmp_path / "run"), progress=False)
    assert list(json.loads((tmp_path / "run" / "stages.json").read_text())) == ["eval_base"]
    monkeypatch.setattr(RMU, "loss", real)
    evaluated = []
    real_eval = evaluate.run_eval
    monkeypatch.setattr(evaluate, "run_eval",
                        lambda cfg, *a, **k: evaluated.append(cfg.model) or real_eval(cfg, *a, **k))
    run_pipeline(tiny_config(world, tmp_path / "run"), progress=False)
    assert evaluated == [str(tmp_path / "run" / "unlearned")]  # the base was not evaluated again
    a = json.loads((whole / "eval_unlearned" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "run" / "eval_unlearned" / "results.json").read_text())["results"]
    strip = lambda res: {k: {m: x for m, x in v.items() if m != "seconds"} for k, v in res.items()}  # noqa: E731
    assert strip(a) == strip(b)
    with pytest.raises(Exception, match="different configuration"):
        run_pipeline(tiny_config(world, tmp_path / "run", lr=5e-3), progress=False)


def test_sweep_front_and_selection_rule(world, tmp_path):
    from wmdp.sweep import run_sweep

    s = run_sweep(tiny_config(world, tmp_path / "unused"),
                  {"steering_coeff": [2.0, 40.0], "alpha": [1.0, 100.0]}, tmp_path / "sweep",
                  forget_metric="wmdp", general_metric="mmlu_college_biology",
                  max_general_drop=0.1, progress=False)
    pts = s["points"]
    assert len(pts) == 4 and len({p["dir"] for p in pts}) == 4
    # sweep.md's rows hold each point's own evaluation, read here from its results.json
    rows = [line.split("|")[1:-1] for line in (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 4
    for i, (row, p) in enumerate(zip(rows, pts)):
        res = json.loads((tmp_path / "sweep" / p["dir"] / "eval_unlearned" / "results.json").read_text())
        forget, general = res["groups"]["wmdp"]["acc"], res["results"]["mmlu_college_biology"]["acc"]
        assert [c.strip() for c in row[2:4]] == [f"{100 * forget:.1f}", f"{100 * general:.1f}"]
        assert (row[6].strip() == "**yes**") == (i == s["selected"])
    ok = [i for i, p in enumerate(pts) if s["base"]["general"] - p["general"] <= 0.1 + 1e-12]
    if ok:
        best = min(pts[i]["forget"] for i in ok)
        assert s["selected"] in ok and pts[s["selected"]]["forget"] == best
    else:
        assert s["selected"] is None
    for i in s["pareto_front"]:  # no point beats a front point on both axes
        assert not any(q["forget"] < pts[i]["forget"] and q["general"] > pts[i]["general"] for q in pts)
    for i in set(range(4)) - set(s["pareto_front"]):
        assert any(q["forget"] <= pts[i]["forget"] and q["general"] >= pts[i]["general"] for q in pts)
    # a rerun resumes: nothing is recomputed, and the base run still stops at its evaluation
    again = run_sweep(tiny_config(world, tmp_path / "unused"),
                      {"steering_coeff": [2.0, 40.0], "alpha": [1.0, 100.0]}, tmp_path / "sweep",
                      forget_metric="wmdp", general_metric="mmlu_college_biology",
                      max_general_drop=0.1, progress=False)
    assert again["points"] == pts
    assert list(json.loads((tmp_path / "sweep" / "base" / "stages.json").read_text())) == ["eval_base"]


def test_configs_sandbox_yaml_is_the_embedded_default():
    from_file = load_run_config(ROOT / "configs" / "sandbox.yaml")
    assert from_file == load_run_config(None)
    assert load_run_config(None).sandbox is not None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_checks_a_run_makes_first(path, tmp_path):
    from wmdp.pipeline import Pipeline

    cfg = load_run_config(path, [f"output={tmp_path / 'run'}"])
    pipe = Pipeline(cfg, create=False)  # method, every key, sizes, the audit's settings
    assert not (tmp_path / "run").exists()
    _, hp, uc = pipe.unlearn_settings()
    assert len(uc.forget_corpora) == len(uc.retain_corpora) == 2 and hp.lr > 0


@pytest.mark.parametrize("name", ["zephyr-7b-rmu.yaml", "yi-34b-rmu.yaml", "mixtral-8x7b-rmu.yaml"])
def test_gpu_recipes_parse_and_resolve(name):
    cfg = load_run_config(ROOT / "configs" / name)
    assert cfg.model and cfg.unlearn.preset
    text = (ROOT / "configs" / name).read_text()
    assert text.startswith("# wmdp run configs/")
    assert yaml.safe_load(text)["unlearn"]["method"] == "rmu"
    from wmdp.unlearn import resolve  # resolving the settings needs no model download

    _, hp, uc = resolve("rmu", preset=cfg.unlearn.preset, settings={"output": "x"})
    assert uc.seed == 42 and uc.retain_corpora == ["wikitext", "wikitext"]
    published = {"zephyr-7b": (7, [5, 6, 7], 6.5, 1200.0, 4, 150),
                 "yi-34b": (15, [13, 14, 15], 300.0, 350.0, 2, 400),
                 "mixtral-8x7b": (7, [5, 6, 7], 300.0, 1600.0, 2, 400)}[cfg.unlearn.preset]
    assert (hp.layer_id, hp.layer_ids, hp.steering_coeffs[0], hp.alpha[0], uc.batch_size,
            uc.max_num_batches) == published and hp.lr == 5e-5


def test_config_overrides_unknown_keys_and_exponents():
    from wmdp.errors import WmdpError

    cfg = load_run_config(None, ["unlearn.settings.rmu.lr=1e-4", "eval.limit=5"])
    assert cfg.eval.limit == 5 and cfg.unlearn.settings == {"rmu": {"lr": 1e-4}}
    from wmdp.unlearn import resolve

    _, hp, _ = resolve("rmu", preset="sandbox", overrides=["rmu.lr=1e-4", "rmu.alpha=[3e2]"])
    assert hp.lr == 1e-4 and hp.alpha == [300.0]
    with pytest.raises(WmdpError, match="unknown key 'nope'"):
        load_run_config(None, ["eval.nope=1"])


@pytest.mark.slow
def test_sandbox_run_end_to_end_with_the_small_fixture(tmp_path):
    """The embedded default's path (sandbox, RMU's sandbox preset, report) on the small world:
    forget accuracy falls, general accuracy holds."""
    import shutil

    from wmdp.sandbox.build import fingerprint, sandbox_config

    fixture = ROOT / "tests" / "fixtures" / "sandbox-small"
    cache = tmp_path / "cache"
    shutil.copytree(fixture, cache / f"small-seed0-{fingerprint(sandbox_config('small', 0))[:10]}")
    cfg = load_run_config(None, [f"output={tmp_path / 'run'}", "sandbox.preset=small",
                                 f"sandbox.cache_dir={cache}", "device=cpu",
                                 "audit.attacks=[probe,activations]"])
    run_dir = run_pipeline(cfg, progress=False)
    assert list(json.loads((run_dir / "stages.json").read_text())) == [
        "sandbox", "eval_base", "unlearn", "eval_unlearned", "audit", "report"]
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert set(audit["attacks"]) == {"probe", "activations"} and audit["verdicts"]
    base = json.loads((run_dir / "eval_base" / "results.json").read_text())["groups"]
    unl = json.loads((run_dir / "eval_unlearned" / "results.json").read_text())["groups"]
    assert base["sandbox_forget"]["acc"] >= 0.95 and unl["sandbox_forget"]["acc"] <= 0.5
    assert unl["sandbox_general"]["acc"] >= 0.9
    row = next(line for line in (run_dir / "report.md").read_text().splitlines()
               if line.startswith("| sandbox_forget |") or line.startswith("| sandbox_forget "))
    assert f"{100 * base['sandbox_forget']['acc']:.1f}" in row
    assert f"{100 * unl['sandbox_forget']['acc']:.1f}" in row


def small_sandbox_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """The embedded default on the small fixture (copied into a cache of its own)."""
    import shutil

    from wmdp.sandbox.build import fingerprint, sandbox_config

    cache = tmp_path / "cache"
    where = cache / f"small-seed0-{fingerprint(sandbox_config('small', 0))[:10]}"
    if not where.exists():
        shutil.copytree(ROOT / "tests" / "fixtures" / "sandbox-small", where)
    return load_run_config(None, ["sandbox.preset=small", f"sandbox.cache_dir={cache}",
                                  "device=cpu", *overrides])


def test_sweep_over_a_key_that_matters_trains_different_models(tmp_path):
    """The sandbox preset steers with adaptive_coeff: sweeping steering_coeff is refused before
    anything runs; sweeping adaptive_coeff gives models and control vectors that differ."""
    from safetensors.torch import load_file

    from wmdp.errors import WmdpError
    from wmdp.sweep import run_sweep

    cfg = small_sandbox_config(tmp_path, "eval.tasks=[sandbox_forget,sandbox_general]",
                               "unlearn.settings.max_num_batches=3", "unlearn.settings.epochs=1")
    kw = dict(forget_metric="sandbox_forget", general_metric="sandbox_general", progress=False)
    with pytest.raises(WmdpError, match="steering_coeff: no effect on the model: adaptive_coeff"):
        run_sweep(cfg, {"steering_coeff": [1.0, 20.0]}, tmp_path / "ignored", **kw)
    assert not (tmp_path / "ignored").exists()
    s = run_sweep(cfg, {"adaptive_coeff": [1.0, 10.0]}, tmp_path / "sweep", **kw)
    dirs = [tmp_path / "sweep" / p["dir"] for p in s["points"]]
    a, b = (load_file(d / "unlearned" / "model.safetensors") for d in dirs)
    moved = [k for k in a if not torch_equal(a[k], b[k])]
    assert moved and all(".layers.3." not in k for k in moved)  # blocks 0-2 train, not 3
    # step 0, before any update: the same activations, a control vector 10x as long
    first = [json.loads((d / "unlearned" / "metrics.jsonl").read_text().splitlines()[0])
             for d in dirs]
    assert first[1]["forget_loss"] > 5 * first[0]["forget_loss"]


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_audit_protocol_runs_the_relearning_protocol_with_the_sandboxs_oracle(tmp_path):
    """`audit.protocol: true` adds the protocol to the audit's attacks, with the oracle of the
    run's sandbox when it trains one, under the config's own protocol settings."""
    from wmdp.pipeline import Pipeline
    from wmdp.sandbox.oracle import oracle_model_dir

    cfg = small_sandbox_config(tmp_path, f"output={tmp_path / 'run'}", "audit.protocol=true",
                               "sandbox.oracle=true", "audit.attacks=[relearn]",
                               "audit.settings.protocol.seeds=[0,1,2]")
    pipe = Pipeline(cfg, create=False)
    audit = pipe.audit_settings()
    assert audit.attacks == ["relearn", "protocol"]
    assert audit.protocol.oracle == str(oracle_model_dir(pipe.sandbox_dir))
    assert audit.protocol.seeds == [0, 1, 2]
    off = Pipeline(small_sandbox_config(tmp_path, f"output={tmp_path / 'run'}"), create=False)
    assert "protocol" not in off.audit_settings().attacks  # opt-in
    from wmdp.errors import WmdpError

    with pytest.raises(WmdpError, match="methods must be full or lora"):
        Pipeline(small_sandbox_config(tmp_path, f"output={tmp_path / 'bad'}",
                                      "audit.protocol=true",
                                      "audit.settings.protocol.methods=[qlora]"), create=False)
    assert not (tmp_path / "bad").exists()


def test_run_with_the_protocol_gets_the_robustness_section_end_to_end(tmp_path):
    """`wmdp run --set audit.protocol=true` on the small sandbox (the smallest grid, an 'oracle'
    saved beside the sandbox model, found there): the report's robustness section holds the
    audit's shares and the protocol's worst case for base, the method and the oracle."""
    import shutil

    from transformers import AutoModelForCausalLM

    from wmdp.pipeline import Pipeline

    cfg = small_sandbox_config(
        tmp_path, f"output={tmp_path / 'run'}", "eval.tasks=[sandbox_forget,sandbox_general]",
        "unlearn.settings.max_num_batches=3", "unlearn.settings.epochs=1",
        "audit.tasks=[sandbox_bio,sandbox_cyber]", "audit.attacks=[relearn]",
        "audit.settings.relearn.steps=2", "audit.settings.relearn.eval_every=2",
        "audit.protocol=true", "audit.settings.protocol.data=[forget]",
        "audit.settings.protocol.lrs=[0.003]", "audit.settings.protocol.checkpoints=[2]",
        "audit.settings.protocol.sizes=[4]", "audit.settings.protocol.methods=[full]",
        "audit.settings.protocol.seeds=[0]", "audit.settings.protocol.ppl_texts=8")
    sandbox = Pipeline(cfg, create=False).sandbox_dir
    base = AutoModelForCausalLM.from_pretrained(sandbox / "model")
    AutoModelForCausalLM.from_config(base.config).save_pretrained(sandbox / "oracle" / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sandbox / "model" / name, sandbox / "oracle" / "model" / name)
    run_dir = run_pipeline(cfg, progress=False)
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    protocol = audit["attacks"]["protocol"]
    assert protocol["sources"]["oracle"] == str(sandbox / "oracle" / "model")
    report = (run_dir / "report.md").read_text()
    share = audit["attacks"]["relearn"]["verdict"]["recovered_fraction"]
    relearn_row = next(line for line in report.splitlines() if line.startswith("| relearn |"))
    assert relearn_row.split("|")[4].strip() == ("n/a" if share is None else f"{100 * share:.0f}%")
    for role, label in (("base", "base"), ("unlearned", "rmu"), ("oracle", "oracle")):
        m = protocol["models"][role]
        row = next(line for line in report.splitlines()
                   if line.startswith(f"| forget | {label} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2:4] == [f"{100 * m['plain']['forget_acc']:.1f}",
                              f"{100 * m['attacks']['forget']['worst_case']['forget_acc']:.1f}"]
    assert "](plots/relearning.png)" in report

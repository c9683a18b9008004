"""Configuration checks of `wmdp run` and `wmdp sweep`: every key, name, size and grid is
checked before anything is written or run, with the closest known key suggested."""

from __future__ import annotations

import pytest

from wmdp.cli import main
from wmdp.config import check_keys, schema, unknown_name
from wmdp.errors import WmdpError
from wmdp.pipeline import Pipeline, RunConfig, load_run_config


def test_unknown_name_suggests_the_closest_and_lists_all():
    # `load` is nearer to the whole mistyped path; the leaf `alpah` names `alpha`
    e = unknown_name("key", "unlearn.settings.alpah",
                     ["unlearn.settings.load", "unlearn.settings.rmu.alpha",
                      "unlearn.settings.rmu.lr"], "config")
    assert str(e) == ("config: unknown key 'unlearn.settings.alpah' (did you mean "
                      "'unlearn.settings.rmu.alpha'? known: unlearn.settings.load, "
                      "unlearn.settings.rmu.alpha, unlearn.settings.rmu.lr)")
    assert "did you mean" not in str(unknown_name("method", "zzzz", ["rmu", "npo"]))


def test_check_keys_walks_nested_sections_and_leaves_open_mappings_free():
    tree = schema(RunConfig)
    check_keys({"eval": {"task_files": {"anything": "x.jsonl"}}, "sandbox": {"seed": 1}}, tree)
    with pytest.raises(WmdpError, match=r"unknown key 'sandbox\.sed' \(did you mean 'sandbox\.seed'"):
        check_keys({"sandbox": {"sed": 1}}, tree)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("unlearn.settings.alpah=10", "unknown key 'unlearn.settings.alpah' (did you mean "
                                  "'unlearn.settings.rmu.alpha'?"),
    ("unlearn.settings.rmu.alpah=[10]", "did you mean 'unlearn.settings.rmu.alpha'?"),
    ("unlearn.settings.lr=1e-4", "did you mean 'unlearn.settings.rmu.lr'?"),
    ("unlearn.method=rmuu", "unlearn.method: unknown unlearning method 'rmuu' (did you mean 'rmu'?"),
    ("eval.limt=5", "did you mean 'limit'?"),
    ("audit.settings.gcg.stepz=3", "did you mean 'audit.settings.gcg.steps'?"),
    ("audit.attacks=[probe,gcgg]", "unknown attack 'gcgg'"),
    ("audit.settings.gcg.steps=0", "audit.settings.gcg.steps is 0, expected at least 1"),
    ("audit.settings.probe.folds=1", "probe.folds is 1"),  # the audit's own check, run early
    ("eval.limit=0", "eval.limit is 0, expected at least 1"),
    ("eval.batch_size=-4", "eval.batch_size is '-4', expected a positive integer or auto"),
    ("unlearn.settings.max_num_batches=0", "unlearn.settings.max_num_batches is 0"),
    ("unlearn.settings.rmu.alpha=[1,2,3]", "alpha has 3 values for 2 forget corpora"),
    ("unlearn.settings.rmu.lr=.nan", "rmu.lr is nan, expected a finite number"),
    ("sandbox.preset=tiny", "sandbox preset 'tiny' is not one of"),
])
def test_run_input_errors_stop_before_anything_is_written(override, expected, tmp_path, capsys,
                                                          monkeypatch):
    from wmdp import evaluate

    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: pytest.fail("evaluation ran"))
    out = tmp_path / "run"
    code, err = run_cli(["run", "--set", f"output={out}", "--set", override], capsys)
    assert code == 2 and expected in err, err
    assert err.count("\n") == 1 and err.startswith("wmdp: ")
    assert not out.exists()  # no run.json: the corrected rerun is not refused


def test_the_corrected_rerun_is_not_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(WmdpError, match="alpah"):
        Pipeline(load_run_config(None, [f"output={out}", "unlearn.settings.rmu.alpah=[10]"]))
    pipe = Pipeline(load_run_config(None, [f"output={out}", "unlearn.settings.rmu.alpha=[10]"]))
    assert (out / "run.json").is_file() and pipe.unlearn_settings()[1].alpha == [10.0]


def test_method_settings_reach_the_method():
    """A valid key of the method's section is accepted and resolved (the check is no wall)."""
    cfg = load_run_config(None, ["unlearn.method=npo", "unlearn.settings.npo.beta=0.5",
                                 "unlearn.settings.max_num_batches=7", "audit=null"])
    _, hp, uc = Pipeline(cfg, create=False).unlearn_settings()
    assert hp.beta == 0.5 and uc.max_num_batches == 7


# -- sweep -----------------------------------------------------------------------------------
def sweep(args: list[str], tmp_path, capsys) -> tuple[int, str]:
    return run_cli(["sweep", "--output", str(tmp_path / "sweep"), *args], capsys)


@pytest.mark.parametrize("grid, expected", [
    (["steering_coeff=1,20"], "--grid steering_coeff: no effect on the model: adaptive_coeff is 3.0"),
    (["alpah=10,100"], "--grid: unknown grid key 'alpah' (did you mean 'alpha'?"),
    (["alpha=10,10"], "--grid alpha=10,10: the value 10 is given twice"),
    (["alpha=10,10.0"], "the value 10.0 is given twice"),
    (["alpha=10", "alpha=20"], "--grid names alpha twice"),
    (["adaptive_coeff=null,3", "steering_coeff=1,20"], "steering_coeff: no effect on the model"),
    (["alpha=[1", "lr=1e-3"], "--grid alpha=[1: '[1' is not a value"),
])
def test_sweep_grid_errors_stop_before_anything_runs(grid, expected, tmp_path, capsys,
                                                     monkeypatch):
    from wmdp import evaluate

    monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: pytest.fail("evaluation ran"))
    code, err = sweep(["--grid", *grid], tmp_path, capsys)
    assert code == 2 and expected in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def test_sweep_over_shadowed_key_works_once_the_shadow_is_lifted(tmp_path):
    from wmdp.sweep import parse_grid, plan_points

    cfg = load_run_config(None, ["unlearn.settings.rmu.adaptive_coeff=null"])
    planned = plan_points(cfg, parse_grid(["steering_coeff=1,20"]), tmp_path / "s")
    coeffs = [Pipeline(c, create=False).unlearn_settings()[1].steering_coeffs for _, c in planned]
    assert coeffs == [[1.0], [20.0]]
    assert not (tmp_path / "s").exists()  # planning writes nothing


@pytest.mark.parametrize("drop", [-1.0, float("nan"), 1.5])
def test_max_general_drop_out_of_range(drop, tmp_path):
    from wmdp.sweep import run_sweep

    with pytest.raises(WmdpError, match="--max-general-drop is"):
        run_sweep(load_run_config(None), {"alpha": [10, 100]}, tmp_path / "sweep",
                  forget_metric="sandbox_forget", general_metric="sandbox_general",
                  max_general_drop=drop)
    assert not (tmp_path / "sweep").exists()


# -- wmdp sandbox path -----------------------------------------------------------------------
def test_sandbox_path_prints_the_cached_build_and_builds_nothing(tmp_path, capsys, monkeypatch):
    import shutil
    from pathlib import Path

    from wmdp.sandbox.build import fingerprint, sandbox_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, err = run_cli(["sandbox", "path", "--preset", "small"], capsys)
    assert code == 2 and "no small sandbox with seed 0 is built" in err and "wmdp run" in err
    assert not (tmp_path / "cache").exists()
    # the directory `wmdp run --set sandbox.preset=small` builds, named independently here
    where = (tmp_path / "cache" / "wmdp" / "sandbox"
             / f"small-seed0-{fingerprint(sandbox_config('small', 0))[:10]}")
    shutil.copytree(Path(__file__).parent / "fixtures" / "sandbox-small", where)
    assert main(["sandbox", "path", "--preset", "small"]) == 0
    assert capsys.readouterr().out == f"{where}\n"
    code, err = run_cli(["sandbox", "path", "--preset", "small", "--seed", "1"], capsys)
    assert code == 2 and "seed 1" in err


MODEL_CONFIGS = ("wmdp.evaluate:EvalConfig", "wmdp.chat.run:ChatEvalConfig",
                 "wmdp.unlearn.loop:UnlearnConfig", "wmdp.audit.run:AuditConfig",
                 "wmdp.pipeline:RunConfig")


def _config_class(spec: str) -> type:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("spec", MODEL_CONFIGS)
def test_every_config_takes_its_model_fields_from_one_spec(spec):
    """The five configs share ModelSpec's fields: the same names, defaults (but `model`, which
    eval and chat default to "<in-memory>" and a run to the sandbox's), and flag help."""
    import argparse
    import dataclasses

    from wmdp.config import cli_flags
    from wmdp.model_spec import ModelSpec

    cls = _config_class(spec)
    assert issubclass(cls, ModelSpec)
    methods = [n for n, v in vars(ModelSpec).items() if callable(v) and not n.startswith("_")]
    assert methods and all(callable(getattr(cls(), n)) for n in methods)  # no field shadows one
    own = {f.name: f.default for f in dataclasses.fields(cls)}
    shared = [f for f in dataclasses.fields(ModelSpec) if f.name != "model"]
    assert {f.name: own[f.name] for f in shared} == {f.name: f.default for f in shared}
    helps = {}
    for klass in (ModelSpec, cls):
        parser = argparse.ArgumentParser()
        cli_flags(parser, klass)
        helps[klass] = {a.dest: a.help for a in parser._actions if a.dest in own}
    redefined = set(cls.__dict__.get("__annotations__", {}))  # audit: "of the unlearned model"
    for f in shared:  # the help of an inherited field is the spec's comment, not empty
        if f.name not in redefined:
            assert helps[cls][f.name] == helps[ModelSpec][f.name]
        assert len(helps[cls][f.name]) > len("(default: None)") + 5


def test_the_run_model_fields_reach_every_stage(tmp_path, monkeypatch):
    """A run's dtype, device_map and trust_remote_code reach the evaluation, unlearning, audit
    and chat settings (before: chat was given dtype and device only); the revision pins the
    base model only."""
    import wmdp.evaluate

    cfg = load_run_config(None, [f"output={tmp_path / 'run'}", "dtype=bfloat16",
                                 "trust_remote_code=true", "device_map=auto", "revision=abc",
                                 "chat.settings={judge: 'openai:gpt-4o'}"])
    pipe = Pipeline(cfg, create=False)
    pipe.sandbox_dir = tmp_path / "sandbox"
    want = {"dtype": "bfloat16", "trust_remote_code": True, "device_map": "auto"}
    seen = []
    monkeypatch.setattr(wmdp.evaluate, "run_eval", lambda config, *a, **k: seen.append(config))
    pipe.evaluate("base-dir", "eval_base")
    pipe.evaluate("unlearned-dir", "eval_unlearned")
    _, _, unlearn = pipe.unlearn_settings()
    audit = pipe.audit_settings(tasks=["sandbox_bio"])
    import wmdp.chat.run

    chats = []
    monkeypatch.setattr(wmdp.chat.run, "run_chat_eval", lambda c, *a, **k: chats.append(c))
    pipe.chat()
    for config in (*seen, unlearn, audit, *chats):
        assert {k: getattr(config, k) for k in want} == want, type(config).__name__
    assert [c.revision for c in seen] == ["abc", None] == [c.revision for c in chats]
    assert unlearn.revision == "abc" and audit.base_revision == "abc" and audit.revision is None

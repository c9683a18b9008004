"""Silently wrong values and malformed inputs (issue 22, sections 3 and 4): each ends in one
line on stderr, `wmdp: ...`, exit code 2, every input byte-identical, nothing in the output.

One table per class: checkpoints (a tiny Llama saved by conftest's `save_tiny_model`, then
corrupted), data files, settings, and numbers. Each row is a command line whose placeholders
name the files of a world built once per module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FIXTURES, char_tokenizer, save_tiny_model, write_mcq_jsonl
from wmdp.cli import main

SANDBOX = FIXTURES / "sandbox-small"
DOWN = "model.layers.1.mlp.down_proj.weight"  # the tensor the checkpoint cases corrupt
PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[")  # a tqdm bar is no message


# --- the world ---------------------------------------------------------------------------------

def _variant(good: Path, root: Path, name: str) -> Path:
    path = root / name
    shutil.copytree(good, path)
    return path


def _resave(path: Path, change) -> None:
    """Rewrite the model's safetensors file with `change(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _checkpoints(root: Path) -> dict[str, str]:
    good = save_tiny_model(root / "good", "llama", tokenizer=char_tokenizer(), layers=4)
    w = {"m": str(good)}
    renamed = _variant(good, root, "renamed")
    _resave(renamed, lambda t: t.update({DOWN + "_renamed": t.pop(DOWN)}))
    missing = _variant(good, root, "missing")
    _resave(missing, lambda t: t.pop(DOWN))
    shape = _variant(good, root, "shape")
    _resave(shape, lambda t: t.update({DOWN: t[DOWN][:, :10].contiguous()}))
    zero_layers = _variant(good, root, "zero-layers")
    _edit_config(zero_layers, num_hidden_layers=0)
    data = (good / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    truncated = _variant(good, root, "truncated")
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    garbage = _variant(good, root, "garbage")
    (garbage / "model.safetensors").write_bytes(data[:8] + b"\x00" * n + data[8 + n:])
    huge = _variant(good, root, "huge-header")
    (huge / "model.safetensors").write_bytes((2 ** 62).to_bytes(8, "little") + data[8:])
    remote = _variant(good, root, "remote-code")
    _edit_config(remote, model_type="not_in_transformers",
                 auto_map={"AutoConfig": "shipped.Config", "AutoModelForCausalLM": "shipped.LM"})
    (remote / "shipped.py").write_text("raise SystemExit('shipped code ran')\n")
    w.update(renamed=str(renamed), missing=str(missing), shape=str(shape),
             zero_layers=str(zero_layers), truncated=str(truncated), garbage=str(garbage),
             huge=str(huge), remote=str(remote))
    return w


def _manifest(root: Path, name: str, spec: str) -> str:
    """A data dir holding one question file and `spec` as its tasks.json."""
    d = root / name
    d.mkdir()
    write_mcq_jsonl(d / "q.jsonl", 4)
    (d / "tasks.json").write_text(spec)
    return str(d)


def _results(root: Path, name: str, change) -> str:
    good = json.loads((SANDBOX / "eval" / "results.json").read_text())
    change(good)
    d = root / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(good))  # NaN and Infinity as JSON writes them
    return str(d)


LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                 for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("values")
    w: dict = {"root": str(root), **_checkpoints(root)}
    w["q"] = str(write_mcq_jsonl(root / "q.jsonl", 4))
    w["q2"] = str(write_mcq_jsonl(root / "q2.jsonl", 4, seed=1))
    d = SANDBOX / "data"
    w.update(sm=str(shutil.copytree(SANDBOX / "model", root / "sandbox-model")),
             forget=str(shutil.copy(d / "forget_bio.jsonl", root / "forget.jsonl")),
             retain=str(shutil.copy(d / "retain_botany.jsonl", root / "retain.jsonl")))
    task = '{"file": "q.jsonl"}'
    w["tasks_list"] = _manifest(root, "tasks-list", f"[{task}]")
    w["tasks_cycle"] = _manifest(root, "tasks-cycle", json.dumps(
        {"tasks": {"x": {"file": "q.jsonl"}}, "groups": {"g1": ["x", "g2"], "g2": ["g1"]}}))
    w["tasks_dup"] = _manifest(root, "tasks-dup", f'{{"tasks": {{"x": {task}, "x": {task}}}}}')
    w["tasks_cloze"] = _manifest(root, "tasks-cloze", json.dumps({"tasks": {"x": {
        "file": "q.jsonl", "format": "cloze", "cloze_template": "{question} {answer}"}}}))
    (root / "recursive.yaml").write_text("output: &o [*o]\n")
    (root / "laughs.yaml").write_text(f"a: &a [{', '.join(['lol'] * 9)}]\n" + LAUGHS)
    (root / "dup-key.yaml").write_text("output: a\noutput: b\n")
    w.update(recursive=str(root / "recursive.yaml"), laughs=str(root / "laughs.yaml"),
             dup_key=str(root / "dup-key.yaml"))
    run = {"output": str(root / "never"), "model": w["sm"],
           "eval": {"tasks": ["x"], "forget": ["x"], "near": [], "task_files": {"x": w["q"]},
                    "limit": 4, "batch_size": "8"},
           "unlearn": {"method": "rmu", "preset": "sandbox", "settings": {
               "forget_corpora": [w["forget"]], "retain_corpora": [w["retain"]],
               "max_num_batches": 1}}}
    (root / "run.yaml").write_text(json.dumps(run))  # JSON is YAML
    w["run"] = str(root / "run.yaml")

    def acc(value):
        return lambda r: r["results"]["sandbox_bio"].update(acc=value)

    w.update(res_nan=_results(root, "res-nan", acc(math.nan)),
             res_inf=_results(root, "res-inf", acc(math.inf)),
             res_neg=_results(root, "res-neg", acc(-0.25)),
             res_big=_results(root, "res-big", acc(1.5)),
             res_entry=_results(root, "res-entry", lambda r: r["results"].update(sandbox_bio={})),
             res_empty=_results(root, "res-empty", lambda r: r.update(results={}, groups={})))
    return w


# --- the tables ----------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    argv: str                # {placeholders} from the world; {o}: a fresh output directory
    expect: tuple[str, ...]  # words of the one line (lower case); "a|b": either


EVAL = "eval --task x={q} --tasks x --output {o} --device cpu --model "
RMU = ("unlearn rmu --output {o} --forget-corpora {forget} --retain-corpora {retain} "
       "--layer-id 1 --layer-ids 1 --max-num-batches 1 --device cpu")
TENSORS = ("tensors do not match", "allow_mismatched_weights")

CHECKPOINTS = [
    Case("renamed-tensor", EVAL + "{renamed}",
         (*TENSORS, "1 missing", DOWN, "1 in the checkpoint but not in the model",
          DOWN + "_renamed")),
    Case("missing-tensor", EVAL + "{missing}", (*TENSORS, "1 missing", DOWN)),
    Case("shape-mismatch", EVAL + "{shape}", (*TENSORS, DOWN, "[32, 10]", "[32, 64]")),
    Case("zero-layers-config", EVAL + "{zero_layers}",
         (*TENSORS, "in the checkpoint but not in the model", "model.layers.0.")),
    Case("truncated", EVAL + "{truncated}", ("{truncated}/model.safetensors", "truncated")),
    Case("garbage-header", EVAL + "{garbage}", ("model.safetensors", "header is not json")),
    Case("header-length-2e62", EVAL + "{huge}",
         ("model.safetensors", "header length 4611686018427387904")),
    Case("remote-code-config", EVAL + "{remote}",
         ("{remote}", "code shipped", "trust_remote_code")),
    # the prefix loader (RMU reads blocks 0..layer_id alone) checks as the full loader does
    Case("prefix-renamed-tensor", RMU + " --model {renamed}", (*TENSORS, DOWN)),
    Case("prefix-shape-mismatch", RMU + " --model {shape}", (*TENSORS, "[32, 10]")),
    Case("prefix-zero-layers", RMU + " --model {zero_layers}",
         (*TENSORS, "in the checkpoint but not in the model", "model.layers.0.")),
    Case("prefix-truncated", RMU + " --model {truncated}", ("truncated",)),
    Case("prefix-garbage-header", RMU + " --model {garbage}", ("header is not json",)),
    Case("prefix-header-length-2e62", RMU + " --model {huge}", ("header length",)),
    Case("prefix-remote-code-config", RMU + " --model {remote}", ("trust_remote_code",)),
]

DATA = [
    Case("tasks-json-list", "eval --model {m} --data-dir {tasks_list} --tasks x --output {o}",
         ("tasks.json", "json array")),
    Case("tasks-json-group-cycle", "eval --model {m} --data-dir {tasks_cycle} --tasks g1 "
         "--output {o}", ("tasks.json", "cycle", "g1 -> g2 -> g1")),
    Case("tasks-json-duplicate-key", "eval --model {m} --data-dir {tasks_dup} --tasks x "
         "--output {o}", ("tasks.json", "'x' is given twice")),
    Case("cloze-template-unknown-field", "eval --model {m} --data-dir {tasks_cloze} "
         "--tasks x --output {o}", ("tasks.json", "cloze_template", "{{answer}}")),
]

SETTINGS = [
    Case("device-tpu-eval", EVAL + "{m} --device tpu", ("device 'tpu'",)),
    Case("device-tpu-unlearn", RMU + " --model {m} --device tpu", ("device 'tpu'",)),
    Case("audit-lr-nan", "audit --model {sm} --base {sm} --task x={q} --tasks x --attacks "
         "relearn --forget-corpora {forget} --retain-corpora {retain} --output {o} "
         "--set relearn.lr=.nan", ("relearn.lr", "nan", "finite")),
    Case("sandbox-lr-nan", "sandbox build --preset small --output {o} train.lr=.nan",
         ("train.lr", "nan", "finite")),
    Case("yaml-recursive-alias", "run {recursive}", ("{recursive}", "recursive")),
    Case("yaml-billion-laughs", "run {laughs}", ("{laughs}", "aliases")),
    Case("yaml-duplicate-key", "run {dup_key}", ("{dup_key}", "line 2", "'output'", "twice")),
]

NUMBERS = [
    Case("unlearn-alpha-negative", RMU + " --model {m} --alpha -5", ("rmu.alpha", "-5")),
    Case("run-alpha-negative", "run {run} --set output={o} "
         "--set unlearn.settings.rmu.alpha=[-5]", ("rmu.alpha", "-5")),
    Case("frozen-forget-every-negative", RMU + " --model {m} --frozen-forget-every -1",
         ("frozen_forget_every", "-1")),
    Case("run-steering-coeff-nan", "run {run} --set output={o} "
         "--set unlearn.settings.rmu.steering_coeffs=[.nan]", ("steering_coeffs", "nan")),
    Case("audit-limit-0", "audit --model {sm} --base {sm} --task x={q} --tasks x "
         "--attacks probe --output {o} --limit 0", ("limit", "0", "at least 1")),
    Case("compare-acc-nan", "compare {res_nan} --output {o}",
         ("{res_nan}", "results.sandbox_bio.acc", "nan")),
    Case("compare-acc-inf", "compare {res_inf} --output {o}", ("results.sandbox_bio.acc", "inf")),
    Case("compare-acc-negative", "compare {res_neg} --output {o}",
         ("results.sandbox_bio.acc", "-0.25")),
    Case("compare-acc-above-1", "compare {res_big} --output {o}",
         ("results.sandbox_bio.acc", "1.5")),
    Case("compare-empty-entry", "compare {res_entry} --output {o}",
         ("results.sandbox_bio", "no metric")),
    Case("compare-no-results", "compare {res_empty} --output {o}", ("results", "no task")),
]


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file of the world (the output directories aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _check(case: Case, world: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # locks and sandbox cache
    out = tmp_path / "out"
    before = _digest(Path(world["root"]))
    argv = case.argv.format(**world, o=out).split()
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [line.strip() for line in re.split(r"[\r\n]", err)
             if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("wmdp: "), err[-3000:]
    for words in case.expect:
        options = [a.format(**world).lower() for a in words.split("|")]
        assert any(a in lines[0].lower() for a in options), (words, lines[0])
    assert code == 2
    assert _digest(Path(world["root"])) == before, "an input changed"
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert seconds < 30, f"refused after {seconds:.0f} s"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CHECKPOINTS])
def test_malformed_checkpoint(case, world, tmp_path, capsys, monkeypatch):
    _check(case, world, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DATA])
def test_malformed_data(case, world, tmp_path, capsys, monkeypatch):
    _check(case, world, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SETTINGS])
def test_bad_setting(case, world, tmp_path, capsys, monkeypatch):
    _check(case, world, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in NUMBERS])
def test_bad_number(case, world, tmp_path, capsys, monkeypatch):
    _check(case, world, tmp_path, capsys, monkeypatch)


# --- what the checks let through ----------------------------------------------------------------

def test_allow_mismatched_weights_loads_the_missing_tensor_at_random(world, capsys):
    """Asked for, the partial checkpoint loads: every tensor it has is the file's, the missing
    one is initialised (not the good model's), and a warning names it."""
    from safetensors.torch import load_file

    from wmdp.models import load_model

    model, _ = load_model(world["missing"], device="cpu", allow_mismatched_weights=True)
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and DOWN in warning[0] and "random" in warning[0], warning
    state = model.state_dict()
    saved = load_file(Path(world["missing"]) / "model.safetensors")
    assert all(state[k].equal(v) for k, v in saved.items())
    good = load_file(Path(world["m"]) / "model.safetensors")[DOWN]
    assert state[DOWN].shape == good.shape and not state[DOWN].equal(good)


def test_intact_checkpoint_loads_by_both_paths(world):
    """The checks refuse nothing whole: the full loader and the prefix loader read the good
    model, and the prefix's tensors are the full model's."""
    from wmdp.models import load_model
    from wmdp.prefix import load_prefix

    full, _ = load_model(world["m"], device="cpu")
    prefix, _, plan = load_prefix(world["m"], 1, device="cpu")
    state = full.state_dict()
    assert plan.loaded and all(prefix.get_parameter(n).equal(state[n]) for n in plan.loaded)


def test_task_given_twice_on_the_command_line_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", world["m"], "--task", f"quiz={world['q']}",
            "--task", f"quiz={world['q']}.other", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wmdp: --task quiz is given twice ({world['q']} and "
                   f"{world['q']}.other); give it once"]
    assert not out.exists()


def test_allow_mismatched_weights_flag_reaches_the_loader(world, tmp_path, capsys):
    """eval refuses the partial checkpoint, and with the flag scores it (the flag is passed)."""
    args = ["eval", "--model", world["missing"], "--task", f"quiz={world['q']}",
            "--device", "cpu", "--batch-size", "4"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 2
    assert DOWN in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "b"), "--allow-mismatched-weights"]) == 0
    record = json.loads((tmp_path / "b" / "results.json").read_text())
    assert record["results"]["quiz"]["n"] > 0


def test_compare_reads_the_infinite_perplexity_wmdp_writes_and_refuses_nan(tmp_path):
    """perplexity._exp writes inf when a collapsed model's exp() overflows: compare shows it;
    NaN (and inf accuracy) stay refused."""
    from wmdp.compare import load_runs
    from wmdp.errors import DataError

    def results(value, key="word_perplexity"):
        d = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(  # json writes inf as Infinity, as wmdp does
            {"results": {"ppl_retain": {key: value, "n": 3}, "quiz": {"acc": 0.5, "n": 4}}}))
        return d

    assert len(load_runs([results(math.inf)])) == 1
    for bad in (math.nan, -1.0):
        with pytest.raises(DataError, match="word_perplexity"):
            load_runs([results(bad)])
    with pytest.raises(DataError, match="acc"):
        load_runs([results(math.inf, key="acc")])


def test_data_revision_naming_a_dataset_no_task_reads_is_refused():
    from wmdp.errors import WmdpError
    from wmdp.tasks import Registry

    reg = Registry.build(data_revision="cais/wmdp@8b85378")
    assert reg.tasks["wmdp_bio"].revision == "8b85378" and reg.tasks["mmlu_virology"].revision is None
    with pytest.raises(WmdpError, match="no task reads 'cais/wmpd'"):
        Registry.build(data_revision="cais/wmpd@8b85378")


def test_run_record_masks_url_credentials():
    from wmdp.pipeline import _redacted

    stored = _redacted({"chat": {"settings": {"judge": {
        "base_url": "https://user:s3cret@judge.example/v1", "model": "m"}}}, "sizes": [1, 2]})
    assert "s3cret" not in json.dumps(stored)
    assert stored["chat"]["settings"]["judge"]["base_url"] == "https://***@judge.example/v1"
    assert stored["sizes"] == [1, 2]

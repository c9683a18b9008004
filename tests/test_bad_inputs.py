"""Every bad input of the trust issue (sections 3 and 4) and of the second campaign (inputs
lost, malformed data, late failures): one line on stderr, `wmdp: ...`, exit code 2, every input
byte-identical afterwards, and nothing left in the output directory (or, where it held the
user's files, the output as it was).

One table, `CASES`; each row is a command line with placeholders for the files of a world
built once per module (a copy of the small sandbox, since it is an input, and bad files).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import FIXTURES
from wmdp.cli import main

SANDBOX = FIXTURES / "sandbox-small"
REPO = Path(__file__).resolve().parents[1]


# --- the world the cases read ---------------------------------------------------------------

def _nan_model(path: Path) -> Path:
    """The sandbox model with NaN weights: every log-likelihood it gives is NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(SANDBOX / "model", path)
    weights = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
               for k, v in load_file(path / "model.safetensors").items()}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _config(path: Path, w: dict, **extra) -> Path:
    """A run config on the copied sandbox model and data: small enough to run if not refused."""
    import yaml

    cfg = {"output": str(w["root"] / "run-never"), "model": w["m"],
           "eval": {"tasks": ["sandbox_bio"], "forget": ["sandbox_bio"], "near": [],
                    "data_dir": w["d"], "limit": 4, "batch_size": "8"},
           "unlearn": {"method": "rmu", "preset": "sandbox", "settings": {
               "forget_corpora": [w["forget_bio"], w["forget_cyber"]],
               "retain_corpora": [w["retain_a"], w["retain_b"]], "max_num_batches": 2,
               "epochs": 1}}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _results_dir(path: Path, results: bytes) -> str:
    path.mkdir()
    (path / "results.json").write_bytes(results)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    w: dict = {"root": root}
    w["m"] = str(shutil.copytree(SANDBOX / "model", root / "model"))
    w["d"] = str(shutil.copytree(SANDBOX / "data", root / "data"))
    d = Path(w["d"])
    w.update(forget_bio=str(d / "forget_bio.jsonl"), forget_cyber=str(d / "forget_cyber.jsonl"),
             retain_a=str(d / "retain_botany.jsonl"), retain_b=str(d / "retain_software.jsonl"),
             mcq=str(d / "sandbox_bio.jsonl"))
    # P holds the model at P/model, as an unlearning output does
    w["p"] = str(root / "p")
    shutil.copytree(SANDBOX / "model", root / "p" / "model")
    w["pm"] = str(root / "p" / "model")
    os.symlink(w["m"], root / "model-link")
    w["link"] = str(root / "model-link")
    w["nan_model"] = str(_nan_model(root / "nan-model"))
    latin1 = "caf\xe9 \xff\n".encode("latin-1")
    (root / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "' + latin1[:-1] + b'"}\n')
    w["latin1_jsonl"] = str(root / "latin1.jsonl")
    (root / "latin1_mcq.jsonl").write_bytes(
        b'{"question": "q\xe9", "choices": ["a", "b", "c", "d"], "answer": 0}\n')
    w["latin1_mcq"] = str(root / "latin1_mcq.jsonl")
    (root / "latin1.yaml").write_bytes(b"output: runs/x\n# r\xe9sum\xe9\n")
    w["latin1_yaml"] = str(root / "latin1.yaml")
    (root / "latin1_q.jsonl").write_bytes(
        b'{"question_id": 1, "category": "writing", "turns": ["caf\xe9"]}\n')
    w["latin1_questions"] = str(root / "latin1_q.jsonl")
    (root / "questions.jsonl").write_text(json.dumps(
        {"question_id": 1, "category": "writing", "turns": ["Write a haiku."]}) + "\n")
    w["questions"] = str(root / "questions.jsonl")
    good = json.loads((SANDBOX / "eval" / "results.json").read_text())
    w["run_ok"] = _results_dir(root / "run-ok", json.dumps(good).encode())
    w["run_latin1"] = _results_dir(root / "run-latin1",
                                   json.dumps(good).encode()[:-1] + b', "note": "\xe9"}')
    typed = json.loads(json.dumps(good))
    typed["results"]["sandbox_bio"]["acc"] = "high"
    w["run_types"] = _results_dir(root / "run-types", json.dumps(typed).encode())
    w["cfg"] = str(_config(root / "run.yaml", w))
    (root / "template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w["tpl"] = str(root / "template.jinja")
    _malformed(root, w)
    return w


DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit for json.loads


def _malformed(root: Path, w: dict) -> None:
    """Files no reader can take: JSON nested 100,000 deep, a CSV field over csv's limit."""
    (root / "deep.json").write_text(DEEP)
    w["deep_json"] = str(root / "deep.json")
    (root / "deep.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + DEEP + "\n")
    w["deep_jsonl"] = str(root / "deep.jsonl")
    w["run_deep"] = _results_dir(root / "run-deep", DEEP.encode())
    deep_dir = root / "deep-data"
    deep_dir.mkdir()
    (deep_dir / "tasks.json").write_text(DEEP)
    w["deep_dir"] = str(deep_dir)
    big = "x" * 200_000  # csv.field_size_limit() is 131,072
    (root / "big.csv").write_text(f"question,A,B,C,D,answer\n{big},a,b,c,d,A\n")
    w["big_csv"] = str(root / "big.csv")


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path`), symlinks as their targets."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# a tqdm bar ("100%|###| 3/3 [00:01<...]") or wmdp.progress's plain line in a log
# ("unlearn (rmu): 1/1 step (100%), 0:00:00 elapsed, 0:00:00 left")
PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|: \d+(/\d+)? \S+( \(\d+%\))?, \d+:\d\d:\d\d elapsed")


def _error_lines(err: str) -> list[str]:
    """stderr without progress bars (they are not messages; tqdm ends them with \\r)."""
    parts = (p.strip() for p in re.split(r"[\r\n]", err))
    return [p for p in parts if p and not PROGRESS.search(p)]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: its error already printed
        code = e.code
    return code, capsys.readouterr().err


# --- the table --------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    argv: str                  # {placeholders} from the world, {o}: a fresh output directory
    expect: tuple[str, ...]    # words of the one line (lower case), any of alternatives "a|b"
    setup: Callable[[Path, dict], None] | None = None   # prepares {o} (a resume, a clash)
    output_kept: bool = False  # {o} held something before: it must be unchanged, not empty
    subprocess: bool = False   # could hang if not refused: run with a timeout
    owner: str = ""            # whose code refuses it, where that is not io.py or cli.py


UNLEARN = ("unlearn rmu --preset sandbox --model {m} --output {o} --forget-corpora "
           "{forget_bio},{forget_cyber} --retain-corpora {retain_a},{retain_b} "
           "--max-num-batches 2 --epochs 1 --device cpu")
NPO = ("unlearn npo --model {m} --output {o} --forget-corpora {forget_bio},{forget_cyber} "
       "--retain-corpora {retain_a},{retain_b} --max-num-batches 2 --device cpu")
RESUME = UNLEARN + " --checkpoint-every 1"
EVAL = "eval --model {m} --data-dir {d} --tasks sandbox_bio --output {o} --device cpu"
CHAT = ("chat-eval --model {m} --chat-template {tpl} --output {o} --limit 1 --max-new-tokens 2 "
        "--device cpu")
AUDIT = "audit --model {m} --base {m} --data-dir {d} --tasks sandbox_bio --output {o}"


def _finished_unlearning(out: Path, w: dict, payload: bytes) -> None:
    """An unlearning run interrupted after a checkpoint, whose checkpoint is `payload`."""
    argv = RESUME.format(**w, o=out).split()
    assert main(argv) == 0
    from wmdp.unlearn.loop import CHECKPOINT, FINAL_RECORD

    (out / FINAL_RECORD).unlink()  # not finished: the rerun resumes from the checkpoint
    (out / CHECKPOINT).parent.mkdir(exist_ok=True)
    (out / CHECKPOINT).write_bytes(payload)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/wmdp-pwned",))


def _truncated_checkpoint(out: Path, w: dict) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"tensors": [torch.zeros(1000)], "next_step": 1}, buf)
    _finished_unlearning(out, w, buf.getvalue()[:300])


def _malicious_checkpoint(out: Path, w: dict) -> None:
    _finished_unlearning(out, w, pickle.dumps({"tensors": _Exploit()}, protocol=2))


def _keep_file(out: Path, w: dict) -> None:
    out.mkdir()
    (out / "mine.txt").write_text("the user's notes")


def _inputs_inside(out: Path, w: dict) -> None:
    """The output directory holds inputs: a corpus (c.jsonl) and a model (teacher/)."""
    out.mkdir()
    shutil.copy(w["forget_bio"], out / "c.jsonl")
    shutil.copytree(w["m"], out / "teacher")


def _link_to_inputs(out: Path, w: dict) -> None:
    """The output is a link to a directory that holds a corpus."""
    target = out.parent / "elsewhere"
    target.mkdir()
    shutil.copy(w["forget_bio"], target / "c.jsonl")
    out.symlink_to(target)


CASES = [
    # -- 3: an output that is, holds or lies inside an input is refused before anything --
    Case("eval-output-is-model", "eval --model {m} --data-dir {d} --tasks sandbox_bio "
         "--output {m} --overwrite", ("is the input", "{m}")),
    Case("eval-output-is-data-dir", "eval --model {m} --data-dir {d} --tasks sandbox_bio "
         "--output {d}", ("is the input", "--data-dir")),
    Case("eval-output-inside-data-dir", "eval --model {m} --data-dir {d} --tasks sandbox_bio "
         "--output {d}/results --overwrite", ("lies inside", "{d}")),
    Case("eval-output-symlink-to-model", "eval --model {m} --data-dir {d} --tasks sandbox_bio "
         "--output {link} --overwrite", ("is the input",)),
    Case("eval-task-file-inside-output", "eval --model {m} --task x={mcq} --tasks x "
         "--output {root} --overwrite", ("holds the input",)),
    Case("audit-output-is-base", "audit --model {m} --base {pm} --data-dir {d} "
         "--tasks sandbox_bio --attacks probe --output {pm} --overwrite",
         ("is the input", "--base")),
    Case("unlearn-output-holds-model", "unlearn rmu --preset sandbox --model {pm} --output {p} "
         "--forget-corpora {forget_bio},{forget_cyber} --retain-corpora {retain_a},{retain_b} "
         "--overwrite", ("holds the input", "{pm}")),
    Case("unlearn-output-holds-corpus", "unlearn rmu --preset sandbox --model {m} --output {d} "
         "--forget-corpora {forget_bio},{forget_cyber} --retain-corpora {retain_a},{retain_b} "
         "--overwrite", ("is the input|holds the input",)),
    Case("chat-output-holds-questions", "chat-eval --model {m} --chat-template {tpl} "
         "--judge none --questions {questions} --output {root} --overwrite",
         ("holds the input",)),
    Case("run-output-holds-config", "run {cfg} --set output={root} --overwrite",
         ("holds the input", "config")),
    Case("sweep-output-holds-config", "sweep {cfg} --grid alpha=10,100 --output {root} "
         "--overwrite", ("holds the input", "config")),
    Case("compare-output-inside-run", "compare {run_ok} --output {run_ok}/cmp",
         ("lies inside", "{run_ok}")),
    Case("sandbox-output-holds-config", "sandbox build --preset small --config {latin1_yaml} "
         "--output {root} --overwrite", ("holds the input", "config")),
    # -- 22.1: an input inside the output, however it is spelled: --overwrite deletes nothing --
    Case("eval-ppl-task-inside-output", "eval --model {m} --tasks ppl:{o}/c.jsonl "
         "--output {o} --overwrite --device cpu", ("holds the input", "--tasks"),
         setup=_inputs_inside, output_kept=True),
    Case("eval-ppl-raw-dotdot-inside-output", "eval --model {m} --tasks "
         "ppl:raw:{o}/teacher/../c.jsonl --output {o} --overwrite", ("holds the input",),
         setup=_inputs_inside, output_kept=True),
    Case("eval-task-file-inside-output-dir", "eval --model {m} --task ppl_c={o}/c.jsonl "
         "--tasks ppl_c --output {o} --overwrite", ("holds the input", "--task ppl_c"),
         setup=_inputs_inside, output_kept=True),
    Case("eval-output-link-holds-corpus", "eval --model {m} --tasks ppl:{o}/../elsewhere/c.jsonl "
         "--output {o} --overwrite", ("holds the input",), setup=_link_to_inputs,
         output_kept=True),
    Case("run-corpus-inside-output", "run {cfg} --set output={o} --set "
         "unlearn.settings.forget_corpora=[{o}/c.jsonl,{forget_cyber}] --overwrite",
         ("holds the input", "unlearn.settings.forget_corpora"), setup=_inputs_inside,
         output_kept=True),
    Case("sweep-corpus-inside-output", "sweep {cfg} --grid alpha=10,100 --output {o} --set "
         "unlearn.settings.retain_corpora=[raw:{o}/c.jsonl,{retain_b}] --overwrite",
         ("holds the input", "unlearn.settings.retain_corpora"), setup=_inputs_inside,
         output_kept=True),
    Case("undo-teacher-inside-output", "unlearn undo --model {m} --output {o} --teacher "
         "{o}/teacher --forget-corpora {forget_bio},{forget_cyber} --retain-corpora "
         "{retain_a},{retain_b} --overwrite", ("holds the input", "--teacher"),
         setup=_inputs_inside, output_kept=True),
    Case("undo-distill-corpus-inside-output", "unlearn undo --model {m} --output {o} "
         "--distill-corpora {o}/c.jsonl --forget-corpora {forget_bio},{forget_cyber} "
         "--retain-corpora {retain_a},{retain_b} --overwrite",
         ("holds the input", "--distill-corpora"), setup=_inputs_inside, output_kept=True),
    Case("audit-raw-corpus-inside-output", "audit --model {m} --base {m} --data-dir {d} "
         "--tasks sandbox_bio --attacks relearn --forget-corpora raw:{o}/c.jsonl "
         "--retain-corpora {retain_a} --output {o} --overwrite",
         ("holds the input", "--forget-corpora"), setup=_inputs_inside, output_kept=True),
    Case("chat-judge-cache-in-model", CHAT + " --judge openai:j --judge-cache {m}/config.json",
         ("judge cache lies inside the input", "--model")),
    Case("chat-judge-cache-is-questions", CHAT + " --judge openai:j --questions {questions} "
         "--judge-cache {questions}", ("judge cache is the input", "--questions")),
    Case("chat-judge-hf-inside-output", CHAT + " --judge hf:{o}/teacher --overwrite",
         ("holds the input", "--judge"), setup=_inputs_inside, output_kept=True),
    # -- 22.4: data no reader can take -----------------------------------------------------
    Case("deep-json-data", "eval --model {m} --task x={deep_json} --tasks x --output {o}",
         ("{deep_json}", "nested too deeply")),
    Case("deep-json-manifest", "eval --model {m} --data-dir {deep_dir} --tasks sandbox_bio "
         "--output {o}", ("tasks.json", "nested too deeply")),
    Case("deep-json-corpus", "unlearn rmu --preset sandbox --model {m} --output {o} "
         "--forget-corpora {deep_jsonl},{forget_cyber} --retain-corpora {retain_a},{retain_b}",
         ("{deep_jsonl}", "line 2", "nested too deeply")),
    Case("deep-json-results", "compare {run_deep} --output {o}",
         ("{run_deep}", "nested too deeply")),
    Case("csv-field-over-limit", "eval --model {m} --task x={big_csv} --tasks x --output {o}",
         ("{big_csv}", "field larger than field limit")),
    # -- 22.5: a failure found late leaves the output as it was found ----------------------
    Case("run-late-layer-id", "run {cfg} --set output={o} --set unlearn.settings.rmu.layer_id=99",
         ("layer",), owner="pipeline/RMU"),
    # -- 3: NaN weights are never saved, NaN log-likelihoods never reported ---------------
    Case("unlearn-lr-1e30", UNLEARN + " --lr 1e30 --max-num-batches 1",
         ("nan|finite|inf",), owner="RMU/unlearning"),
    Case("eval-nan-loglikelihoods", "eval --model {nan_model} --data-dir {d} "
         "--tasks sandbox_bio --limit 4 --output {o} --device cpu", ("nan",),
         owner="evaluation"),
    # -- 3: compare never overwrites without --overwrite; validation leaves nothing -----
    Case("compare-non-empty-output", "compare {run_ok} --output {o}", ("not empty",),
         setup=_keep_file, output_kept=True),
    Case("run-unknown-method", "run {cfg} --set output={o} --set unlearn.method=nope",
         ("nope",), owner="pipeline"),
    # -- 4: files that are not UTF-8 -----------------------------------------------------
    Case("non-utf8-data", "eval --model {m} --task x={latin1_mcq} --tasks x --output {o}",
         ("{latin1_mcq}", "utf-8")),
    Case("non-utf8-corpus", "unlearn rmu --preset sandbox --model {m} --output {o} "
         "--forget-corpora {latin1_jsonl},{forget_cyber} --retain-corpora {retain_a},{retain_b}",
         ("{latin1_jsonl}", "line 2", "utf-8")),
    Case("non-utf8-config", "run {latin1_yaml} --set output={o}", ("{latin1_yaml}", "utf-8")),
    Case("non-utf8-results", "compare {run_latin1} --output {o}", ("{run_latin1}", "utf-8")),
    Case("non-utf8-questions", CHAT + " --judge none --questions {latin1_questions}",
         ("{latin1_questions}", "utf-8")),
    # -- 4: checkpoints that cannot be trusted ------------------------------------------
    Case("truncated-checkpoint", RESUME, ("last.pt", "truncated or damaged"),
         setup=_truncated_checkpoint, output_kept=True),
    Case("malicious-checkpoint", RESUME, ("last.pt", "objects other than tensors"),
         setup=_malicious_checkpoint, output_kept=True),
    # -- 4: numbers out of range ----------------------------------------------------------
    Case("perplexity-max-length-neg", "eval --model {m} --task ppl_r={retain_a} --tasks ppl_r "
         "--max-length -5 --output {o} --device cpu", ("--max-length", "-5"), subprocess=True,
         owner="evaluation"),
    Case("npo-max-length-neg", NPO + " --max-length -1", ("max", "-1"),
         owner="RMU/unlearning"),
    Case("judge-timeout-nan", CHAT + " --judge openai:j --judge-timeout nan",
         ("--judge-timeout", "nan")),
    Case("judge-timeout-inf", CHAT + " --judge openai:j --judge-timeout inf",
         ("--judge-timeout", "inf")),
    Case("judge-base-url", CHAT + " --judge openai:j --judge-base-url notaurl",
         ("--judge-base-url", "notaurl")),
    Case("max-new-tokens-neg", CHAT + " --judge none --max-new-tokens -1",
         ("--max-new-tokens", "-1")),
    Case("limit-zero", EVAL + " --limit 0", ("--limit", "0"), owner="evaluation"),
    Case("limit-neg", EVAL + " --limit -3", ("--limit", "-3"), owner="evaluation"),
    Case("tasks-comma", "eval --model {m} --data-dir {d} --tasks , --output {o}", ("tasks",),
         owner="evaluation"),
    Case("steering-coeffs-count", "unlearn rmu --model {m} --output {o} --forget-corpora "
         "{forget_bio},{forget_cyber} --retain-corpora {retain_a},{retain_b} --layer-id 2 "
         "--layer-ids 1,2 --steering-coeffs 1,2,3 --max-num-batches 2 --device cpu",
         ("steering",), owner="RMU/unlearning"),
    Case("checkpoint-every-neg", UNLEARN + " --checkpoint-every -1",
         ("--checkpoint-every", "-1")),
    Case("max-general-drop-neg", "sweep {cfg} --grid alpha=10,100 --output {o} "
         "--max-general-drop -1", ("--max-general-drop", "-1")),
    Case("max-general-drop-nan", "sweep {cfg} --grid alpha=10,100 --output {o} "
         "--max-general-drop nan", ("--max-general-drop", "nan")),
    Case("sweep-duplicate-values", "sweep {cfg} --grid alpha=10,10 --output {o}", ("10",),
         owner="pipeline"),
    Case("sandbox-hidden-size", "sandbox build --preset small --output {o} "
         "model.hidden_size=30", ("hidden_size", "num_attention_heads")),
    Case("compare-wrong-types", "compare {run_types} --output {o}",
         ("{run_types}", "results.sandbox_bio.acc", "number")),
    Case("argparse-one-line", "eval --model {m} --tasks x --output {o} --limit many",
         ("eval:", "--limit", "many")),
    Case("argparse-missing-required", "unlearn rmu --bogus-flag", ("unlearn rmu:", "bogus")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # locks and sandbox cache
    out = tmp_path / "out"
    if case.setup is not None:
        case.setup(out, world)
        capsys.readouterr()
    argv = case.argv.format(**world, o=out).split()
    inputs = [Path(world[k]) for k in ("m", "d", "p", "nan_model", "latin1_jsonl", "latin1_mcq",
                                       "latin1_yaml", "latin1_questions", "run_ok",
                                       "run_latin1", "run_types", "cfg", "tpl", "questions",
                                       "deep_json", "deep_jsonl", "run_deep", "deep_dir",
                                       "big_csv")]
    before = [_digest(p) for p in inputs]
    out_before = _digest(out) if out.exists() else None
    if case.subprocess:
        code, err = _run_subprocess(argv, tmp_path)
    else:
        code, err = _run(argv, capsys)
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wmdp: "), err[-2000:]
    for words in case.expect:
        alternatives = [a.format(**world, o=out).lower() for a in words.split("|")]
        assert any(a in lines[0].lower() for a in alternatives), (words, lines[0])
    assert code == 2
    assert [_digest(p) for p in inputs] == before, "an input changed"
    if case.output_kept:
        assert _digest(out) == out_before, "the output directory changed"
    else:
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert not Path("/tmp/wmdp-pwned").exists()


def _run_subprocess(argv: list[str], tmp_path: Path, timeout: float = 60.0) -> tuple[int, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "wmdp", *argv], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wmdp {' '.join(argv)} ran past {timeout:.0f} s")
    return p.returncode, p.stderr


# --- an output directory is written by one run at a time --------------------------------------

HOLD = """
import sys, time
from wmdp.io import prepare_output_dir
prepare_output_dir(sys.argv[1], overwrite=False)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_second_run_into_a_locked_directory_fails_at_once(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        code, err = _run(["compare", world["run_ok"], "--output", str(out)], capsys)
        assert time.perf_counter() - t0 < 10  # at once, not after a wait
        assert code == 2 and err.count("\n") == 1
        assert err.startswith(f"wmdp: {out}: another wmdp run is writing this directory (lock ")
        lock_file = Path(err.rsplit("(lock ", 1)[1].rstrip(")\n"))
        assert lock_file.is_file() and out not in lock_file.parents
        assert not any(out.iterdir())  # the holder made it; the refused run wrote nothing
    finally:
        holder.kill()  # killed, not released: the OS drops its lock
        holder.wait()
    code, err = _run(["compare", world["run_ok"], "--output", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]


def test_one_process_may_write_inside_its_own_locked_directory(tmp_path, monkeypatch):
    from wmdp.io import prepare_output_dir, release_output_locks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        prepare_output_dir(tmp_path / "run", overwrite=False)
        prepare_output_dir(tmp_path / "run", overwrite=False)  # the same process: allowed
        prepare_output_dir(tmp_path / "run" / "eval_base", overwrite=False)
    finally:
        release_output_locks()


# --- a read-only output directory -------------------------------------------------------------

def test_read_only_output_directory(world):
    """Run as an unprivileged user where the tests run as root (root writes anywhere)."""
    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"wmdp-ro-{os.getpid()}"
    shared.mkdir(mode=0o755)
    try:
        ro = shared / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        run = shutil.copytree(world["run_ok"], shared / "run-ok")  # readable by that user
        (shared / "cache").mkdir()
        (shared / "cache").chmod(0o777)
        cmd = [sys.executable, "-m", "wmdp", "compare", str(run), "--output", str(ro)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("root, and no setpriv to drop privileges")
            for p in (run, *run.rglob("*")):
                p.chmod(0o755 if p.is_dir() else 0o644)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "XDG_CACHE_HOME": str(shared / "cache"), "HOME": str(shared),
               "PYTHONPATH": str(REPO / "src")}
        probe = subprocess.run(cmd[:cmd.index("-m")] + ["-c", "import wmdp.cli"],
                               capture_output=True, text=True, timeout=120, env=env, cwd=shared)
        if probe.returncode != 0:  # the environment, not wmdp: that user cannot read the venv
            pytest.skip(f"the unprivileged user cannot import wmdp: {probe.stderr[-300:]}")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                           cwd=shared)
        assert p.returncode == 2, p.stderr[-2000:]
        assert p.stderr == f"wmdp: {ro}: output directory is not writable (Permission denied)\n"
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(shared, ignore_errors=True)

"""`wmdp eval` from the command line: results on disk, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wmdp.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_writes_results_and_table(capsys, llama_mistral_tok, mcq_file, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--model", llama_mistral_tok, "--task",
                             f"mine={mcq_file}", "--tasks", "mine", "--output", tmp_path / "o",
                             "--dtype", "float32", "--batch-size", "8")
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["results"]["mine"]["n"] == 40
    assert "| mine | 40 |" in out


def _valid_line() -> str:
    return json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0})


@pytest.mark.parametrize("content,expected", [
    ('{"question": "q", "choices": ["a","b","c","d"]}', 'line 1: field "answer" is missing'),
    ('{"question": "q", "choices": ["a","b","c","d"], "answer": 7}', 'field "answer" is 7, expected 0-3'),
    ('{"question": "q", "choices": ["a","b","c"], "answer": 1}', 'field "choices" has 3 items, expected 4'),
    ("", "file is empty"),
    ("{not json", "line 1: invalid JSON"),
])
def test_bad_data_one_line_exit_2(capsys, llama_mistral_tok, tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    code, _, err = run_cli(capsys, "eval", "--model", llama_mistral_tok, "--task", f"x={p}",
                           "--tasks", "x", "--output", tmp_path / "o")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"wmdp: {p}") and expected in err


def test_model_and_task_errors(capsys, tmp_path, mcq_file):
    missing = tmp_path / "nope"
    code, _, err = run_cli(capsys, "eval", "--model", missing, "--task", f"x={mcq_file}",
                           "--tasks", "x", "--output", tmp_path / "o")
    assert code == 2 and err == f"wmdp: {missing}: model directory not found\n"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a tensor file")
    code, _, err = run_cli(capsys, "eval", "--model", broken, "--task", f"x={mcq_file}",
                           "--tasks", "x", "--output", tmp_path / "o")
    last = err.strip().splitlines()[-1]  # transformers may draw a loading bar first
    assert code == 2 and last.startswith(f"wmdp: {broken}")  # the directory or its weights

    code, _, err = run_cli(capsys, "eval", "--model", broken, "--tasks", "wmdp_nope",
                           "--output", tmp_path / "o")
    assert code == 2 and "unknown task 'wmdp_nope'" in err


def test_output_dir_with_other_content_refused(capsys, llama_mistral_tok, mcq_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    args = ["eval", "--model", llama_mistral_tok, "--task", f"x={mcq_file}", "--tasks", "x",
            "--output", out, "--limit", "3"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and not (out / "precious.txt").exists()
    # a finished run with other settings is not silently mixed with this one
    code, _, err = run_cli(capsys, *args[:-1], "4")
    assert code == 2 and "different configuration" in err


def test_console_script_exit_code(tmp_path):
    """The installed entry point itself: no traceback, exit 2."""
    exe = os.path.join(os.path.dirname(sys.executable), "wmdp")
    r = subprocess.run([exe, "eval", "--model", str(tmp_path / "none"), "--tasks", "wmdp_bio",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"wmdp: {tmp_path / 'none'}: model directory not found"


# --- argparse's errors, outputs apart from inputs, one writer per output ------------------------

@pytest.mark.parametrize("argv,expected", [
    (["eval", "--limit", "x"], "wmdp: eval: argument --limit: invalid int value: 'x' "
                               "(see wmdp eval --help)"),
    (["unlearn", "rmu", "--no-such-flag"], "wmdp: unlearn rmu: unrecognized arguments: "
                                           "--no-such-flag (see wmdp unlearn rmu --help)"),
    (["sandbox", "build", "--output", "o", "--preset", "huge"],
     "wmdp: sandbox build: argument --preset: invalid choice: 'huge' (choose from 'default', "
     "'small') (see wmdp sandbox build --help)"),
    (["sweep", "--grid", "alpha=1", "--output", "o", "--max-general-drop", "nan"],
     "wmdp: sweep: argument --max-general-drop: expected a number in 0-1, got nan"),
    (["nope"], "wmdp: argument command: invalid choice: 'nope'"),
])
def test_argparse_errors_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(expected), err


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0 and "usage: wmdp eval" in capsys.readouterr().out


def test_check_apart(tmp_path):
    from wmdp.errors import WmdpError
    from wmdp.io import check_apart

    model = tmp_path / "p" / "model"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    check_apart(tmp_path / "out", {"--model": model})
    check_apart(tmp_path / "p" / "model-2", {"--model": model})  # a sibling, not inside
    check_apart(model, {"--model": "org/model", "--data-dir": None})  # a hub id is no path
    for out, relation in ((model, "is"), (tmp_path / "p", "holds"), (tmp_path, "holds"),
                          (model / "sub", "lies inside"), (tmp_path / "link", "is"),
                          (tmp_path / "link" / "x", "lies inside")):
        with pytest.raises(WmdpError) as e:
            check_apart(out, {"--model": model})
        assert str(e.value) == (f"{out}: the output directory {relation} the input {model} "
                                "(--model); choose another output directory")


def test_compare_overwrite(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(
        {"results": {"t": {"acc": 0.5, "acc_stderr": 0.1, "n": 4}}, "groups": {}}))
    out = tmp_path / "cmp"
    assert main(["compare", str(run), "--output", str(out)]) == 0
    first = (out / "compare.json").read_text()
    capsys.readouterr()
    assert main(["compare", str(run), "--output", str(out)]) == 2  # its own earlier output too
    assert "not empty" in capsys.readouterr().err
    (out / "mine.txt").write_text("keep")
    assert main(["compare", str(run), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    assert (out / "compare.json").read_text() == first


def test_read_text_names_the_line_of_a_bad_byte(tmp_path):
    from wmdp.errors import DataError
    from wmdp.io import jsonl_records, read_json

    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xe9"}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 2: not UTF-8 text \(byte 0xe9\)"):
        list(jsonl_records(p))
    j = tmp_path / "x.json"
    j.write_bytes(b'{\n "a": "\xff"}')
    with pytest.raises(DataError, match=r"x.json line 2: not UTF-8 text \(byte 0xff\)"):
        read_json(j)


def test_default_threads_one_on_two_cpus_unless_set():
    from wmdp.cli import default_threads

    env: dict = {}
    default_threads(env, cpus=2)
    assert env == {"OMP_NUM_THREADS": "1"}
    env = {"OMP_NUM_THREADS": "4"}
    default_threads(env, cpus=2)
    assert env == {"OMP_NUM_THREADS": "4"}  # the user's choice wins
    env = {}
    default_threads(env, cpus=16)
    assert env == {}  # torch's default on a larger machine


def test_sandbox_general_qa_writes_the_general_domains_questions(capsys, tmp_path):
    """`wmdp sandbox general-qa`: exactly the training QA lines that ask a general domain's seen
    question (checked against the question files, not the code's forget filter); refuses an
    output inside the sandbox, an existing one without --overwrite, and a directory that is no
    sandbox, each with one line and exit 2, leaving the sandbox's files as they were."""
    import re

    from conftest import FIXTURES

    sandbox = FIXTURES / "sandbox-small"
    data = sandbox / "data"
    general = {json.loads(line)["question"] for d in ("botany", "software", "geography")
               for line in (data / f"sandbox_{d}_seen.jsonl").read_text().splitlines()}
    out = tmp_path / "general_qa.jsonl"
    code, stdout, _ = run_cli(capsys, "sandbox", "general-qa", sandbox, "--output", out)
    assert code == 0 and "90 general-domain QA lines" in stdout
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    asked = [re.search(r"Question: (.*)\n", t).group(1) for t in texts]
    assert sorted(asked) == sorted(general)  # each general seen question once, nothing else
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in data.iterdir())
    for argv, expected in (
            ([sandbox, "--output", data / "g.jsonl"], "lies inside the input"),
            ([sandbox, "--output", out], "exists (use --overwrite"),
            ([tmp_path, "--output", tmp_path / "x.jsonl"], "not a built sandbox")):
        code, _, err = run_cli(capsys, "sandbox", "general-qa", *argv)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert sorted((p.name, p.stat().st_mtime_ns) for p in data.iterdir()) == listing
    assert run_cli(capsys, "sandbox", "general-qa", sandbox, "--output", out, "--overwrite")[0] == 0

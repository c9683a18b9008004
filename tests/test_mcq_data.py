"""Every file layout parses to the same items; every bad input names file, line and field."""

from __future__ import annotations

import json

import pytest

from wmdp.data.mcq import MCQItem, items_hash, load_mcq_file
from wmdp.errors import DataError, WmdpError
from wmdp.tasks import MMLU_CATEGORIES, MMLU_SUBJECTS, Registry

ITEMS = [MCQItem("What is 2+2?", ("3", "4", "5", "6"), 1),
         MCQItem("Pick, \"quoted\"", ("a,b", "c", "d", "e"), 3)]


def test_layouts_agree(tmp_path):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(i.to_dict()) + "\n" for i in ITEMS))
    (tmp_path / "q.json").write_text(json.dumps([i.to_dict() for i in ITEMS]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"test": [i.to_dict() for i in ITEMS]}))
    import csv

    with open(tmp_path / "orig_test.csv", "w", newline="") as f:  # MMLU release: no header
        w = csv.writer(f)
        for i in ITEMS:
            w.writerow([i.question, *i.choices, "ABCD"[i.answer]])
    with open(tmp_path / "header.csv", "w", newline="") as f:  # header, answer an index
        w = csv.writer(f)
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        for i in ITEMS:
            w.writerow([i.question, *i.choices, i.answer])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([i.to_dict() for i in ITEMS]), tmp_path / "q.parquet")
    for name in ("q.jsonl", "q.json", "wrapped.json", "orig_test.csv", "header.csv", "q.parquet"):
        loaded = load_mcq_file(tmp_path / name)
        assert loaded == ITEMS, name
        assert items_hash(loaded) == items_hash(ITEMS)


BAD = [
    ('{"question": "q", "choices": ["a","b","c","d"]}', 'line 1: field "answer" is missing'),
    ('{"question": "q", "choices": ["a","b","c","d"], "answer": 7}', 'line 1: field "answer" is 7, expected 0-3'),
    ('{"question": "q", "choices": ["a","b","c"], "answer": 0}', 'line 1: field "choices" has 3 items, expected 4'),
    ('{"choices": ["a","b","c","d"], "answer": 0}', 'line 1: field "question" is missing'),
    ('{"question": "q", "choices": ["a","b","c","d"], "answer": 0}\n{"question": ', "line 2: invalid JSON"),
    ('{"question": "", "choices": ["a","b","c","d"], "answer": 0}', 'line 1: field "question" must be a non-empty string'),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_jsonl_named_precisely(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content + "\n")
    with pytest.raises(DataError) as e:
        load_mcq_file(p)
    assert str(e.value).startswith(f"{p} {message}")


def test_empty_and_unknown_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_mcq_file(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="file is empty"):
        load_mcq_file(tmp_path / "blank.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(WmdpError, match="unknown file type"):
        load_mcq_file(tmp_path / "x.txt")
    (tmp_path / "short.csv").write_text("q,a,b,c,D\n")
    with pytest.raises(DataError, match="line 1: has 5 columns, expected 6"):
        load_mcq_file(tmp_path / "short.csv")
    (tmp_path / "j.json").write_text(json.dumps([ITEMS[0].to_dict(), {"question": "x"}]))
    with pytest.raises(DataError, match='item 2: field "choices" is missing'):
        load_mcq_file(tmp_path / "j.json")


GOOD_LINE = json.dumps(ITEMS[0].to_dict())


@pytest.mark.parametrize("name,content,line", [
    ("bad.jsonl", GOOD_LINE + "\n" + GOOD_LINE.replace("2+2", "2\xe9") + "\n", 2),
    ("bad.json", "[\n" + GOOD_LINE + ",\n" + GOOD_LINE.replace("2+2", "2\xe9") + "\n]", 3),
    ("bad_test.csv", "What is 1?,a,b,c,d,A\nQuel \xe9t\xe9?,a,b,c,d,B\n", 2),
])
def test_non_utf8_files_name_file_and_line(tmp_path, name, content, line):
    p = tmp_path / name
    p.write_bytes(content.encode("latin-1"))  # \xe9 is one byte, 0xe9, invalid as UTF-8 here
    with pytest.raises(DataError) as e:
        load_mcq_file(p)
    assert str(e.value).startswith(f"{p} line {line}: not UTF-8 text (byte 0xe9)")


def test_non_utf8_manifest_names_the_file(tmp_path):
    (tmp_path / "tasks.json").write_bytes('{"tasks": {"caf\xe9": {"file": "x.jsonl"}}}'.encode("latin-1"))
    with pytest.raises(DataError, match="line 1: not UTF-8 text") as e:
        Registry.build(data_dir=tmp_path)
    assert str(e.value).startswith(str(tmp_path / "tasks.json"))


def test_mmlu_categories_match_lm_eval():
    """Our subject -> category table against lm-eval's own task files."""
    lm_eval = pytest.importorskip("lm_eval")
    from pathlib import Path

    import yaml

    root = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = {}
    for f in root.glob("mmlu_*.yaml"):
        cfg = yaml.safe_load(f.read_text())
        theirs[cfg["dataset_name"]] = cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    ours = {s: c for c, subs in MMLU_CATEGORIES.items() for s in subs}
    assert ours == theirs
    assert len(MMLU_SUBJECTS) == 57


def test_registry_finds_local_layouts(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "wmdp-bio.parquet").write_bytes(b"")
    reg = Registry.build(data_dir=tmp_path)
    assert reg.tasks["mmlu_virology"].path == tmp_path / "test" / "virology_test.csv"
    assert reg.tasks["wmdp_bio"].path == tmp_path / "wmdp-bio.parquet"
    assert reg.tasks["wmdp_cyber"].hub == ("cais/wmdp", "wmdp-cyber", "test")
    assert len(reg.expand(["mmlu"])) == 57
    assert reg.expand(["wmdp", "wmdp_bio"]) == ["wmdp_bio", "wmdp_chem", "wmdp_cyber"]
    with pytest.raises(WmdpError, match="unknown task 'wmdp_nope'"):
        reg.expand(["wmdp_nope"])


def test_manifest_adds_tasks_and_groups(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({
        "tasks": {"toy_a": {"file": "a.jsonl", "topic": "toys", "format": "cloze"}},
        "groups": {"toys": ["toy_a"]}}))
    reg = Registry.build(data_dir=tmp_path)
    assert reg.expand(["toys"]) == ["toy_a"]
    assert reg.tasks["toy_a"].format == "cloze"
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": {"t": {"file": "a", "fmt": 1}}}))
    with pytest.raises(WmdpError, match="unknown field 'fmt'"):
        Registry.build(data_dir=tmp_path)

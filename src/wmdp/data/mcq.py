"""Multiple-choice items in the WMDP schema, from any file layout or the hub, validated.

Schema: `question: str`, `choices: list[str]` (exactly 4), `answer: int` (0-3), optional
`subject`. Layouts: `.jsonl`, `.json` (a list of objects), `.parquet`, `.csv` (MMLU's original
release: no header, question,A,B,C,D,letter; or a header row question,choice0..3,answer).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from wmdp.data.hub import hub_where, read_hub_split
from wmdp.errors import DataError, WmdpError
from wmdp.io import jsonl_records, read_text, sha256_json

N_CHOICES = 4
LETTERS = "ABCD"
FORMATS = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class MCQItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question": self.question, "choices": list(self.choices),
                             "answer": self.answer}
        if self.subject is not None:
            d["subject"] = self.subject
        return d


def items_hash(items: Iterable[MCQItem]) -> str:
    """A content hash of a question set, the same whichever layout it was read from."""
    return sha256_json([it.to_dict() for it in items])


def _answer(value: Any, path: str | Path, line: int | None, unit: str) -> int:
    where = dict(path=path, line=line, field="answer")
    if isinstance(value, bool) or value is None:
        raise _err(f"is {value!r}, expected 0-3", unit, **where)
    if isinstance(value, str):
        v = value.strip()
        if len(v) == 1 and v.upper() in LETTERS:
            return LETTERS.index(v.upper())
        try:
            value = int(v)
        except ValueError:
            raise _err(f"is {value!r}, expected 0-3 or A-D", unit, **where) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < N_CHOICES:
        raise _err(f"is {value!r}, expected 0-3", unit, **where)
    return value


def _err(message: str, unit: str, path: str | Path, line: int | None,
         field: str | None = None) -> DataError:
    return DataError(path, message, line, field, unit)


def validate_record(rec: Any, path: str | Path, line: int | None, unit: str = "line") -> MCQItem:
    """One record (a dict) to an MCQItem, or a DataError naming file, line and field."""
    if not isinstance(rec, dict):
        raise _err(f"expected a JSON object, found {type(rec).__name__}", unit, path, line)
    for name in ("question", "choices", "answer"):
        if name not in rec:
            raise _err("is missing", unit, path, line, name)
    question = rec["question"]
    if not isinstance(question, str) or not question.strip():
        raise _err("must be a non-empty string", unit, path, line, "question")
    choices = rec["choices"]
    if hasattr(choices, "tolist"):  # numpy array from parquet
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)):
        raise _err(f"must be a list of {N_CHOICES} strings", unit, path, line, "choices")
    if len(choices) != N_CHOICES:
        raise _err(f"has {len(choices)} items, expected {N_CHOICES}", unit, path, line, "choices")
    if not all(isinstance(c, str) for c in choices):
        raise _err("must hold only strings", unit, path, line, "choices")
    subject = rec.get("subject")
    return MCQItem(question, tuple(choices), _answer(rec["answer"], path, line, unit),
                   subject if isinstance(subject, str) else None)


def load_mcq_file(path: str | Path) -> list[MCQItem]:
    """Read and validate a local question file in any supported layout."""
    path = Path(path)
    if not path.is_file():
        raise WmdpError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise WmdpError(f"{path}: unknown file type {suffix!r} (expected {', '.join(FORMATS)})")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (no questions)")
    items = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
             ".csv": _read_csv}[suffix](path)
    if not items:
        raise DataError(path, "file is empty (no questions)")
    return items


def _read_jsonl(path: Path) -> list[MCQItem]:
    return [validate_record(rec, path, lineno) for lineno, rec in jsonl_records(path)]


def _read_json(path: Path) -> list[MCQItem]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e.msg})", e.lineno) from None
    if isinstance(data, dict):  # {"test": [...]} or {"data": [...]}: one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, "expected a list of questions (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, "expected a list of questions")
    return [validate_record(rec, path, i, unit="item") for i, rec in enumerate(data, 1)]


def _read_parquet(path: Path) -> list[MCQItem]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are varied
        raise DataError(path, f"cannot read parquet ({str(e).splitlines()[0]})") from None
    return [validate_record(rec, path, i, unit="item") for i, rec in enumerate(rows, 1)]


def _read_csv(path: Path) -> list[MCQItem]:
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    has_header = bool(header) and header[0] == "question" and "answer" in header
    items = []
    for lineno, row in enumerate(rows, 1):
        if has_header and lineno == 1:
            continue
        if not any(cell.strip() for cell in row):
            continue
        if has_header:
            if len(row) != len(header):
                raise DataError(path, f"has {len(row)} columns, the header has {len(header)}",
                                lineno)
            rec = dict(zip(header, row))
            names = [h for h in header if h not in ("question", "answer", "subject")]
            rec["choices"] = [rec[h] for h in names]
        else:
            if len(row) != 2 + N_CHOICES:
                raise DataError(path, f"has {len(row)} columns, expected 6 "
                                "(question, A, B, C, D, answer)", lineno)
            rec = {"question": row[0], "choices": row[1:5], "answer": row[5]}
        items.append(validate_record(rec, path, lineno))
    return items


def read_hub_mcq(dataset: str, config: str | None, split: str = "test",
                 revision: str | None = None) -> tuple[list[MCQItem], str | None]:
    """A hub question set and the commit it was read at (`revision` None: the default branch)."""
    ds, commit = read_hub_split(dataset, config, split, revision, HUB_FIX)
    where = hub_where(dataset, config, split, revision)
    return [validate_record(rec, where, i, unit="item") for i, rec in enumerate(ds, 1)], commit


HUB_FIX = "point the task at local files with --data-dir or --task NAME=PATH"
MCQ_COLUMNS = ("question", "choices", "answer")

"""Chat questions in MT-Bench's JSONL layout, validated, and the project's default set.

One JSON object per line:

    {"question_id": 101, "category": "reasoning",
     "turns": ["first user message", "second user message"],
     "reference": ["reference answer to turn 1", "reference answer to turn 2"]}

`reference` is optional; the judge sees it for math, reasoning and coding (MT-Bench's
`NEED_REF_CATS`). Other fields are kept but not used, so MT-Bench's own `question.jsonl` loads
as it is. The default set (`resources/chat_questions.jsonl`) holds benign two-turn questions in
MT-Bench's eight categories, written for this project; its scores are comparable across models
and before/after unlearning, not with published MT-Bench scores (those need MT-Bench's own
questions and judge).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from wmdp.errors import DataError, WmdpError
from wmdp.io import jsonl_records, sha256_json

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
              "humanities")
# MT-Bench's sampling temperatures (fastchat/llm_judge/common.py `temperature_config`); a
# category not listed is sampled at 0.7, as MT-Bench's answer generation does.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                        "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
MAX_TURNS = 2  # MT-Bench's judge prompts grade a first turn and a second


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question_id": self.question_id, "category": self.category,
                             "turns": list(self.turns)}
        if self.reference is not None:
            d["reference"] = list(self.reference)
        return d


def default_questions_path() -> Path:
    return Path(str(resources.files("wmdp") / "resources" / "chat_questions.jsonl"))


def questions_hash(questions: list[Question]) -> str:
    return sha256_json([q.to_dict() for q in questions])


def _strings(value: Any, path: Path, line: int, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(path, "must be a non-empty list of strings", line, field)
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise DataError(path, f"item {i} must be a non-empty string", line, field)
    return tuple(value)


def validate_question(rec: Any, path: Path, line: int) -> Question:
    """One JSON record to a Question, or a DataError naming file, line and field."""
    if not isinstance(rec, dict):
        raise DataError(path, f"expected a JSON object, found {type(rec).__name__}", line)
    for name in ("question_id", "category", "turns"):
        if name not in rec:
            raise DataError(path, "is missing", line, name)
    qid = rec["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise DataError(path, f"is {qid!r}, expected an integer or a non-empty string", line,
                        "question_id")
    category = rec["category"]
    if not isinstance(category, str) or not category.strip():
        raise DataError(path, "must be a non-empty string", line, "category")
    turns = _strings(rec["turns"], path, line, "turns")
    if len(turns) > MAX_TURNS:
        raise DataError(path, f"has {len(turns)} turns, at most {MAX_TURNS} can be judged "
                        "(MT-Bench's prompts grade turn 1 and turn 2)", line, "turns")
    reference = rec.get("reference")
    if reference is not None:
        reference = _strings(reference, path, line, "reference")
        if len(reference) < len(turns):
            raise DataError(path, f"has {len(reference)} answers for {len(turns)} turns", line,
                            "reference")
    return Question(qid, category.strip(), turns, reference)


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read and validate a question file (the default set when `path` is None)."""
    path = Path(path) if path is not None else default_questions_path()
    if not path.is_file():
        raise WmdpError(f"{path}: questions file not found")
    questions: list[Question] = []
    seen: dict[Any, int] = {}
    for lineno, rec in jsonl_records(path):
        q = validate_question(rec, path, lineno)
        if q.question_id in seen:
            raise DataError(path, f"is {q.question_id!r}, already used on line "
                            f"{seen[q.question_id]}", lineno, "question_id")
        seen[q.question_id] = lineno
        questions.append(q)
    if not questions:
        raise DataError(path, "file is empty (no questions)")
    return questions


def load_references(path: str | Path, questions: list[Question]) -> list[Question]:
    """`questions` with their references replaced from an answer file in MT-Bench's layout
    (`question_id`, `choices[0].turns`), e.g. MT-Bench's `reference_answer/gpt-4.jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise WmdpError(f"{path}: reference answers file not found")
    refs: dict[Any, tuple[str, ...]] = {}
    for lineno, rec in jsonl_records(path):
        qid, turns = answer_turns(rec, path, lineno)
        refs[qid] = _strings(turns, path, lineno, "choices")
    return [replace(q, reference=refs.get(q.question_id, q.reference)) for q in questions]


def answer_turns(rec: Any, path: Path, line: int) -> tuple[Any, Any]:
    """(question_id, turns) of an answer record in MT-Bench's layout (`choices[0].turns`)."""
    try:
        return rec["question_id"], rec["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise DataError(path, "expected question_id and choices[0].turns", line) from None


def temperature_for(question: Question, override: float | None = None) -> float:
    if override is not None:
        return override
    return CATEGORY_TEMPERATURE.get(question.category, DEFAULT_TEMPERATURE)

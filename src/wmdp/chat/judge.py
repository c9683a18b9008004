"""Judge every turn of every answer, MT-Bench's single-answer way, and average the ratings.

Turn 1 is graded with `single-v1` (or `single-math-v1` with the reference, for math, reasoning
and coding), turn 2 with the `-multi-turn` prompt that shows the whole conversation. A judgment
is `ok` (a rating in 1-10), `unparseable` (the judge answered without one) or `failed` (no
answer after the retries); averages are over `ok` judgments, and the other two are counted at
every level, never silently dropped.
"""

from __future__ import annotations

import math
import os
import threading
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from wmdp.progress import tqdm

from wmdp.chat.backends import Judge, JudgmentCache
from wmdp.chat.endpoint import check_api_key, redact_url
from wmdp.chat.prompts import judge_messages, parse_rating
from wmdp.chat.questions import CATEGORIES, Question
from wmdp.errors import WmdpError

JUDGE_BACKENDS = ("openai", "hf", "none")
OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass
class JudgeConfig:
    """Who judges, and how it is called; recorded in chat_results.json (the key never is)."""

    backend: str = "openai"      # "openai": any OpenAI-compatible endpoint; "hf": a local model
    model: str | None = None     # endpoint model name, or hub id / directory for "hf"
    base_url: str = OPENAI_BASE_URL
    api_key_env: str | None = None  # NAME of the variable holding the key; None: OPENAI_API_KEY
                                    # for OpenAI's URL, no key elsewhere (a key goes nowhere unasked)
    timeout: float = 120.0       # seconds for a whole request (connect to last byte, redirects)
    max_retries: int = 5         # retries of a transient failure, backoff doubling each time
    backoff: float = 2.0         # seconds before the first retry
    concurrency: int = 8         # requests in flight at once
    max_tokens: int = 2048       # MT-Bench's judge budget
    temperature: float = 0.0     # MT-Bench's
    cache: str | None = None     # judgment cache file; None: <output>/judge_cache.jsonl
    dtype: str = "auto"          # "hf" judge only
    batch_size: int = 8          # "hf" judge only

    def check(self) -> None:
        if self.backend not in JUDGE_BACKENDS:
            raise WmdpError(f"judge backend {self.backend!r} is not one of "
                            f"{', '.join(JUDGE_BACKENDS)}")
        if self.backend != "none" and not self.model:
            raise WmdpError("no judge model given (--judge openai:MODEL, hf:MODEL or none)")
        for name in ("timeout", "concurrency", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # NaN compares false to everything
                raise WmdpError(f"--judge-{name.replace('_', '-')} is {value}, expected a "
                                "positive finite number")
        if not (self.max_retries >= 0 and 0 <= self.backoff < math.inf):
            raise WmdpError("judge retries and backoff cannot be negative")
        if self.backend == "openai":
            self._check_endpoint()

    def _check_endpoint(self) -> None:
        """The URL and the key, in messages that show neither's secret."""
        shown = redact_url(self.base_url)
        try:
            url = urllib.parse.urlsplit(self.base_url)
            scheme, host, userinfo = url.scheme, url.hostname, url.username or url.password
        except ValueError:  # e.g. an unclosed IPv6 bracket
            scheme, host, userinfo = "", None, None
        if scheme not in ("http", "https") or not host or any(
                not "!" <= c <= "~" for c in self.base_url):
            raise WmdpError(f"--judge-base-url {shown!r} is not an http(s) URL "
                            "(e.g. https://api.openai.com/v1)")
        if userinfo and self.api_key_env:
            raise WmdpError(f"--judge-base-url {shown!r} holds credentials (user:key@) and "
                            f"--judge-api-key-env names ${self.api_key_env}: give one of them")
        name = self.key_env()
        key = os.environ.get(name) if name else None
        if self.api_key_env and not key:
            raise WmdpError(f"judge API key: ${self.api_key_env} is not set")
        if name and key:
            check_api_key(name, key)

    def key_env(self) -> str | None:
        if self.api_key_env:
            return self.api_key_env
        return "OPENAI_API_KEY" if self.base_url.rstrip("/") == OPENAI_BASE_URL else None

    def record(self) -> dict[str, Any]:
        rec = asdict(self)  # the variable's name, and whether it held a key; never the key
        rec["base_url"] = redact_url(self.base_url)  # nor a key in the URL's userinfo
        rec["api_key_env"] = self.key_env() if self.backend == "openai" else None
        rec["api_key_set"] = bool(rec["api_key_env"] and os.environ.get(rec["api_key_env"]))
        return rec


def judge_spec(spec: str) -> tuple[str, str | None]:
    """`openai:MODEL`, `hf:MODEL`, `none`, or a bare MODEL (an endpoint's model name)."""
    if spec == "none":
        return "none", None
    backend, sep, model = spec.partition(":")
    if sep and backend in ("openai", "hf"):
        if not model:
            raise WmdpError(f"--judge {spec}: name a model after '{backend}:'")
        return backend, model
    return "openai", spec


@dataclass(frozen=True)
class _Request:
    question: Question
    turn: int              # 1 or 2
    prompt_name: str
    system: str
    user: str
    key: str


def judge_answers(questions: Sequence[Question], answers: dict[Any, dict], judge: Judge,
                  cache: JudgmentCache, progress: bool = True) -> list[dict]:
    """One judgment record per (question, turn), in question order; cached ones not re-asked."""
    requests = []
    for q in questions:
        turns = answers[q.question_id]["choices"][0]["turns"]
        for turn in range(1, len(q.turns) + 1):
            name, system, user = judge_messages(q, turns, turn)
            requests.append(_Request(q, turn, name, system, user,
                                     cache.key(judge.name, system, user, judge.settings)))
    judgments: list[str | None] = [cache.get(r.key) for r in requests]
    cached = [j is not None for j in judgments]
    errors: list[str | None] = [None] * len(requests)
    todo = [i for i, j in enumerate(judgments) if j is None]
    bar = tqdm(total=len(todo), desc=f"judging ({judge.name})", unit="judgment",
               disable=not progress or not todo, leave=False)
    lock = threading.Lock()

    def on_result(k: int, text: str | None, error: str | None) -> None:
        i = todo[k]
        with lock:
            judgments[i], errors[i] = text, error
            bar.update(1)
        if text is not None and _rating(text) is not _UNREADABLE:  # never cache a crash
            cache.put(requests[i].key, judge.name, text)

    try:
        if todo:
            judge.run([(requests[i].system, requests[i].user) for i in todo], on_result)
    finally:
        bar.close()
    return [_record(r, judgments[i], errors[i], cached[i], judge.name)
            for i, r in enumerate(requests)]


_UNREADABLE = object()


def _rating(judgment: str) -> Any:
    """The rating, None, or _UNREADABLE when reading it raised: a reply the parser cannot take
    counts as unparseable and is not cached, so a rerun asks again instead of failing again."""
    try:
        return parse_rating(judgment)
    except Exception:  # noqa: BLE001 - any parser failure on untrusted text is the same case
        return _UNREADABLE


def _record(r: _Request, judgment: str | None, error: str | None, cached: bool,
            judge: str) -> dict:
    score = _rating(judgment) if judgment is not None else None
    score = None if score is _UNREADABLE else score
    status = "failed" if judgment is None else "ok" if score is not None else "unparseable"
    return {"question_id": r.question.question_id, "category": r.question.category,
            "turn": r.turn, "judge": judge, "prompt_name": r.prompt_name, "score": score,
            "status": status, "error": error if judgment is None else None,
            "judgment": judgment, "cached": cached, "user_prompt": r.user}


def _block(judgments: list[dict]) -> dict[str, Any]:
    scores = [j["score"] for j in judgments if j["status"] == "ok"]
    return {"score": sum(scores) / len(scores) if scores else None, "n": len(scores),
            "failed": sum(j["status"] == "failed" for j in judgments),
            "unparseable": sum(j["status"] == "unparseable" for j in judgments)}


def chat_scores(judgments: list[dict]) -> dict[str, Any]:
    """MT-Bench's averages (over rated judgments) overall, per turn and per category."""
    order = list(CATEGORIES) + sorted({j["category"] for j in judgments} - set(CATEGORIES))
    turns = sorted({j["turn"] for j in judgments})
    categories = {}
    for c in order:
        in_c = [j for j in judgments if j["category"] == c]
        if in_c:
            categories[c] = {**_block(in_c), **{f"turn_{t}": _block(
                [j for j in in_c if j["turn"] == t])["score"] for t in turns}}
    return {**_block(judgments), "judgments": len(judgments),
            "turns": {str(t): _block([j for j in judgments if j["turn"] == t]) for t in turns},
            "categories": categories}


def format_chat_table(scores: dict[str, Any]) -> str:
    """A markdown table: each category's turn averages and score, then the overall line."""
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    turns = sorted(scores["turns"], key=int)
    head = "| category | n | " + " | ".join(f"turn {t}" for t in turns) + " | score |"
    lines = [head, "|---|---:|" + "---:|" * (len(turns) + 1)]
    for c, r in scores["categories"].items():
        lines.append(f"| {c} | {r['n']} | " + " | ".join(num(r[f'turn_{t}']) for t in turns)
                     + f" | {num(r['score'])} |")
    lines.append(f"| **overall** | {scores['n']} | " + " | ".join(
        num(scores["turns"][t]["score"]) for t in turns) + f" | {num(scores['score'])} |")
    lines.append(f"\n{scores['judgments']} judgments: {scores['n']} rated, "
                 f"{scores['failed']} failed, {scores['unparseable']} unparseable")
    return "\n".join(lines)

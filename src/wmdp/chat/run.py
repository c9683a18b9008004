"""`wmdp chat-eval`: a model answers chat questions, a judge grades them (MT-Bench's way).

    wmdp chat-eval --model HuggingFaceH4/zephyr-7b-beta --judge openai:gpt-4o \\
        --judge-api-key-env OPENAI_API_KEY --output runs/zephyr/chat

The output directory holds:
- answers.jsonl: one line per question, MT-Bench's answer layout (`choices[0].turns`);
- judgments.jsonl: one line per (question, turn): prompt, judgment text, score, status;
- judge_cache.jsonl: every judgment received, keyed by judge model, prompt and settings;
- chat_results.json: averages per turn, per category and overall, the failed and unparseable
  counts, the questions' hash and the full configuration (the API key's variable name only).

A rerun of the same command resumes: saved answers are reused (only missing ones are
generated) and cached judgments are not asked again, so it costs nothing once complete.
Changing only the judge re-judges the saved answers; changing what shapes an answer (model,
questions, template, temperatures, seed, max_new_tokens) needs --overwrite or another --output.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wmdp.chat.backends import ChatCompletionsJudge, Judge, JudgmentCache, LocalJudge
from wmdp.chat.generate import check_chat_renders, generate_answers, read_chat_template
from wmdp.chat.judge import JudgeConfig, chat_scores, judge_answers, judge_spec
from wmdp.chat.questions import (CATEGORY_TEMPERATURE, Question, answer_turns,
                                 default_questions_path, load_questions, load_references,
                                 questions_hash)
from wmdp.config import from_dict, to_dict
from wmdp.errors import DataError, WmdpError
from wmdp.io import (check_apart, jsonl_records, library_versions, prepare_output_dir,
                     read_json, sha256_json, write_json, write_jsonl)
from wmdp.model_spec import ModelSpec
from wmdp.models import check_model_source, load_model, load_tokenizer

ANSWERS, JUDGMENTS, JUDGE_CACHE, CHAT_RESULTS = (
    "answers.jsonl", "judgments.jsonl", "judge_cache.jsonl", "chat_results.json")


@dataclass
class ChatEvalConfig(ModelSpec):
    """Everything that can change an answer or a score, recorded in chat_results.json (the
    model fields are ModelSpec's)."""

    model: str = "<in-memory>"         # hub id or local directory ("<in-memory>": passed in code)
    questions: str | None = None       # MT-Bench-layout JSONL; None: the bundled default set
    references: str | None = None      # reference answers (MT-Bench's reference_answer layout)
    limit: int | None = None           # first N questions
    chat_template: str | None = None   # Jinja file, for a tokenizer without a chat template
    system_prompt: str | None = None   # none by default, as the model's template has it
    max_new_tokens: int = 1024         # FastChat's default for MT-Bench answers
    batch_size: int = 8                # conversations generated together
    seed: int = 42                     # batch i is sampled after torch.manual_seed(seed + i)
    temperature: float | None = None   # one for every category; None: MT-Bench's per category
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def fingerprint(self, questions: list[Question], chat_template: str | None) -> str:
        """A hash of what shapes the answers (not the judge: a new judge re-judges them)."""
        keys = ("model", "revision", "dtype", "system_prompt", "max_new_tokens", "seed",
                "temperature", "batch_size")  # batch i samples after manual_seed(seed + i)
        return sha256_json({**{k: getattr(self, k) for k in keys},
                            "questions": questions_hash(questions),
                            "chat_template": chat_template})

    def check(self) -> None:
        """Counts that must be positive; the judge's settings."""
        for flag, value in (("--max-new-tokens", self.max_new_tokens),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise WmdpError(f"{flag} is {value}, expected at least 1")
        if self.limit is not None and self.limit < 1:
            raise WmdpError(f"--limit is {self.limit}, expected at least 1")
        if self.temperature is not None and not (math.isfinite(self.temperature)
                                                 and self.temperature >= 0):
            raise WmdpError(f"--temperature is {self.temperature}, expected 0 or more")
        self.judge.check()

    def inputs(self) -> dict[str, str | None]:
        """Local files this run reads: no output may be, hold or lie inside one."""
        local_model = None if self.model == "<in-memory>" else self.model
        judge = self.judge.model if self.judge.backend == "hf" else None
        return {"--model": local_model, "--questions": self.questions,
                "--references": self.references, "--chat-template": self.chat_template,
                "the hf judge": judge}


def chat_config(settings: dict[str, Any], where: str = "chat") -> ChatEvalConfig:
    """A ChatEvalConfig from plain settings (a YAML section); unknown keys are errors.

    `judge` is a mapping of JudgeConfig fields or a spec string (`openai:gpt-4o`, `hf:DIR`).
    """
    settings = dict(settings)
    if isinstance(settings.get("judge"), str):
        backend, model = judge_spec(settings["judge"])
        settings["judge"] = {"backend": backend, "model": model}
    return from_dict(ChatEvalConfig, settings, where)


def _read_answers(path: Path, questions: list[Question]) -> dict[Any, dict]:
    """Answers a previous run saved, checked against the questions they answer."""
    if not path.is_file():
        return {}
    by_id = {q.question_id: q for q in questions}
    answers = {}
    for lineno, rec in jsonl_records(path):
        qid, turns = answer_turns(rec, path, lineno)
        if qid in by_id and len(turns) != len(by_id[qid].turns):
            raise DataError(path, f"has {len(turns)} answers for {len(by_id[qid].turns)} turns",
                            lineno, "choices")
        if qid in by_id:
            answers[qid] = rec
    return answers


def _free_memory() -> None:
    """Give back a model's memory once the caller has dropped its references."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_record(model: Any, tokenizer: Any) -> dict[str, Any]:
    params = next(model.parameters())
    return {"model_dtype": str(params.dtype).removeprefix("torch."),
            "model_type": getattr(model.config, "model_type", None),
            "commit_hash": getattr(model.config, "_commit_hash", None),
            "device_used": str(params.device), "padding_side": "left",
            "generation_config": model.generation_config.to_diff_dict(),
            "tokenizer_chat_template_sha256": sha256_json(getattr(tokenizer, "chat_template", None))}


def _endpoint_judge(config: ChatEvalConfig) -> ChatCompletionsJudge:
    j = config.judge
    return ChatCompletionsJudge(j.model or "", j.base_url, j.key_env(), timeout=j.timeout,
                                max_retries=j.max_retries, backoff=j.backoff,
                                concurrency=j.concurrency, max_tokens=j.max_tokens,
                                temperature=j.temperature)


def _local_judge(config: ChatEvalConfig) -> tuple[Judge, Any]:
    """The local judge, and its model to free afterwards."""
    j = config.judge
    model, tokenizer = load_model(j.model or "", dtype=j.dtype, device=config.device,
                                  device_map=config.device_map,
                                  trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise WmdpError(f"judge {j.model}: the tokenizer has no chat template; a judge must be "
                        "an instruction-tuned chat model")
    return LocalJudge(model, tokenizer, j.model or "", max_new_tokens=j.max_tokens,
                      batch_size=j.batch_size), model


def _check_cache(config: ChatEvalConfig, output: Path) -> Path | None:
    """The judge cache (None without a judge), checked before anything is written: an output,
    it is never an input nor another of the run's files, and it can be read and appended to."""
    if config.judge.backend == "none":
        return None
    cache = Path(config.judge.cache) if config.judge.cache else output / JUDGE_CACHE
    check_apart(cache, config.inputs(), kind="judge cache")
    own = {(output / name).absolute().resolve() for name in (ANSWERS, JUDGMENTS, CHAT_RESULTS)}
    if cache.absolute().resolve() in own:
        raise WmdpError(f"--judge-cache {cache} is one of the run's own files; give another file")
    JudgmentCache.check(cache)
    return cache


def run_chat_eval(config: ChatEvalConfig, output: str | Path, overwrite: bool = False,
                  progress: bool = True, model: Any = None, tokenizer: Any = None) -> dict:
    """Answer (or resume), judge, write the files; returns chat_results.json's content.

    `model`/`tokenizer`: a model already in memory (the pipeline's); else `config.model` loads.
    What can fail on the settings, the files, the chat template or the judge's key fails
    before anything is written.
    """
    config.check()
    questions = load_questions(config.questions)
    questions = questions[:config.limit] if config.limit is not None else questions
    judged = load_references(config.references, questions) if config.references else questions
    template = read_chat_template(config.chat_template) if config.chat_template else None
    if config.judge.backend == "hf":
        check_model_source(config.judge.model or "")
    if model is None:  # a model that cannot chat fails before anything is written or loaded
        check_model_source(config.model)
    renders_with = tokenizer if model is not None else load_tokenizer(
        config.model, config.revision, config.trust_remote_code)
    check_chat_renders(renders_with, questions, template, config.system_prompt, config.model)
    output = Path(output)
    cache = _check_cache(config, output)
    endpoint = _endpoint_judge(config) if config.judge.backend == "openai" else None
    try:
        if endpoint is not None and (overwrite or not (output / CHAT_RESULTS).is_file()):
            endpoint.check_access()  # a refused key stops a fresh run before it writes
        return _run(config, output, overwrite, progress, model, tokenizer, questions, judged,
                    template, cache, endpoint)
    finally:
        if endpoint is not None:
            endpoint.close()


def _run(config: ChatEvalConfig, output: Path, overwrite: bool, progress: bool, model: Any,
         tokenizer: Any, questions: list[Question], judged: list[Question],
         template: str | None, cache: Path | None,
         endpoint: ChatCompletionsJudge | None) -> dict:
    fingerprint = config.fingerprint(questions, template)
    out = prepare_output_dir(output, overwrite, CHAT_RESULTS, fingerprint, inputs=config.inputs())
    record = {"config": {**to_dict(config), "judge": config.judge.record()},
              "questions": {"source": config.questions or str(default_questions_path()),
                            "sha256": questions_hash(questions), "n": len(questions),
                            "with_references_sha256": questions_hash(judged)},
              "fingerprint": fingerprint}
    previous = read_json(out / CHAT_RESULTS) if (out / CHAT_RESULTS).is_file() else {}
    if not previous:  # the marker that lets an interrupted run resume
        write_json(out / CHAT_RESULTS, {**record, "complete": False})
    answers = _read_answers(out / ANSWERS, questions)
    generation = previous.get("generation", {})
    if any(q.question_id not in answers for q in questions):
        generation = _answer(config, questions, answers, template, out, progress, model, tokenizer)
    summary: dict[str, Any] = {"score": None}
    if cache is not None:
        summary.update(_judge(config, judged, answers, out, cache, endpoint, progress))
    summary.update(record, generation=generation, complete=True, versions=library_versions())
    write_json(out / CHAT_RESULTS, summary)
    if summary.get("failed"):  # complete, but its score is not: say so
        print(f"wmdp: chat-eval: {summary['failed']} of {summary['judgments']} judgments "
              f"failed (first: {summary['judging']['first_failure']}); rerun the same command "
              "to ask them again", file=sys.stderr)
    return summary


def _judge(config: ChatEvalConfig, questions: list[Question], answers: dict[Any, dict],
           out: Path, cache: Path, endpoint: ChatCompletionsJudge | None,
           progress: bool) -> dict[str, Any]:
    """Judge every turn (cached judgments are not asked again); the scores and a record."""
    t0 = time.perf_counter()
    judge, judge_model = (endpoint, None) if endpoint is not None else _local_judge(config)
    judgments = judge_answers(questions, answers, judge, JudgmentCache(cache), progress)
    requests_sent = getattr(judge, "requests_sent", None)
    if judge_model is not None:
        judge = judge_model = None  # type: ignore[assignment]
        _free_memory()
    write_jsonl(out / JUDGMENTS, judgments)
    return {**chat_scores(judgments),
            "judging": {"seconds": round(time.perf_counter() - t0, 3),
                        "cached": sum(j["cached"] for j in judgments),
                        "requests_sent": requests_sent,
                        "first_failure": next((j["error"] for j in judgments
                                               if j["status"] == "failed"), None)}}


def _answer(config: ChatEvalConfig, questions: list[Question], answers: dict[Any, dict],
            template: str | None, out: Path, progress: bool, model: Any,
            tokenizer: Any) -> dict[str, Any]:
    """Generate the missing answers, saving each batch as it finishes; the generation record."""
    loaded = model is None
    if loaded:
        model, tokenizer = config.load_model()
    t0 = time.perf_counter()

    def save(records: list[dict]) -> None:
        answers.update((r["question_id"], r) for r in records)
        write_jsonl(out / ANSWERS, [answers[q.question_id] for q in questions
                                    if q.question_id in answers])

    generate_answers(model, tokenizer, questions, model_id=config.model,
                     max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                     seed=config.seed, temperature=config.temperature, chat_template=template,
                     system_prompt=config.system_prompt, done=answers, progress=progress,
                     on_batch=save)
    generation = {**_model_record(model, tokenizer),
                  "temperatures": {"override": config.temperature, **CATEGORY_TEMPERATURE},
                  "seconds": round(time.perf_counter() - t0, 3)}
    if loaded:
        model = tokenizer = None
        _free_memory()
    return generation

"""MT-Bench's single-answer grading: the judge's prompts and how its rating is read.

The four prompts are MT-Bench's own (FastChat, `fastchat/llm_judge/data/judge_prompts.jsonl`,
Apache-2.0), word for word, so that a rating means what it means in MT-Bench:
`single-v1` grades turn 1; `single-v1-multi-turn` grades turn 2 seeing the whole conversation;
the `-math-` variants add the reference answer(s) for math, reasoning and coding. The judge is
asked for "[[rating]]" on a 1-10 scale; `parse_rating` reads it as FastChat does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from wmdp.chat.questions import NEED_REF_CATEGORIES, Question

_RATE = ('After providing your explanation, you must rate the response on a scale of 1 to 10 by '
         'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".')
_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n"
                 "{question_1}\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n"
                 "### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's Conversation with "
                 "User|>")
_REFERENCES = ("<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n"
               "### Reference answer:\n{ref_answer_1}\n\n### User:\n{question_2}\n\n"
               "### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n")


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str


JUDGE_PROMPTS = {p.name: p for p in (
    JudgePrompt(
        "single-v1", "You are a helpful assistant.",
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
        "provided by an AI assistant to the user question displayed below. Your evaluation should "
        "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and "
        "level of detail of the response. Begin your evaluation by providing a short explanation. "
        f"Be as objective as possible. {_RATE}\n\n[Question]\n{{question}}\n\n"
        "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"),
    JudgePrompt(
        "single-math-v1", "You are a helpful assistant.",
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
        "provided by an AI assistant to the user question displayed below. Your evaluation should "
        "consider correctness and helpfulness. You will be given a reference answer and the "
        "assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
        "reference answer. Identify and correct any mistakes. Be as objective as possible. "
        f"{_RATE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n"
        "{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n"
        "{answer}\n[The End of Assistant's Answer]"),
    JudgePrompt(
        "single-v1-multi-turn",
        "Please act as an impartial judge and evaluate the quality of the response provided by an "
        "AI assistant to the user question displayed below. Your evaluation should consider "
        "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of "
        "detail of the response. You evaluation should focus on the assistant's answer to the "
        "second user question. Begin your evaluation by providing a short explanation. Be as "
        f"objective as possible. {_RATE}\n\n",
        _CONVERSATION),
    JudgePrompt(
        "single-math-v1-multi-turn",
        "Please act as an impartial judge and evaluate the quality of the response provided by an "
        "AI assistant to the user question. Your evaluation should consider correctness and "
        "helpfulness. You will be given a reference answer and the assistant's answer. You "
        "evaluation should focus on the assistant's answer to the second question. Begin your "
        "evaluation by comparing the assistant's answer with the reference answer. Identify and "
        f"correct any mistakes. Be as objective as possible. {_RATE}\n\n",
        _REFERENCES + _CONVERSATION),
)}

# FastChat's `one_score_pattern` and its fallback `one_score_pattern_backup`
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
RATING_RANGE = (1.0, 10.0)


def parse_rating(judgment: str) -> float | None:
    """The judge's rating: the first `[[N]]` (`[[8.5]]`, `Rating: [[7]]`), else the first `[N]`;
    None when there is none, or when it lies outside 1-10 (FastChat would average it in)."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if match is None:
        return None
    try:  # float(), not int(): a 5,000-digit "rating" is inf here, not a ValueError
        rating = float(match.group(1))
    except (ValueError, OverflowError):
        return None
    return rating if RATING_RANGE[0] <= rating <= RATING_RANGE[1] else None


def judge_messages(question: Question, answers: Sequence[str],
                   turn: int) -> tuple[str, str, str]:
    """(prompt name, system message, user message) grading `turn` (1 or 2) of one answer."""
    use_ref = question.category in NEED_REF_CATEGORIES and question.reference is not None
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    prompt = JUDGE_PROMPTS[name]
    ref = question.reference or ()
    fields = {"ref_answer_1": ref[0] if ref else "", "ref_answer_2": ref[1] if len(ref) > 1 else ""}
    if turn == 1:
        fields.update(question=question.turns[0], answer=answers[0])
    else:
        fields.update(question_1=question.turns[0], question_2=question.turns[1],
                      answer_1=answers[0], answer_2=answers[1])
    return name, prompt.system_prompt, prompt.prompt_template.format(**fields)

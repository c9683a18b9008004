"""Judged chat, MT-Bench's way: a model answers two-turn questions, a judge rates each turn.

    from wmdp.chat import ChatEvalConfig, JudgeConfig, run_chat_eval
    cfg = ChatEvalConfig(model="HuggingFaceH4/zephyr-7b-beta",
                         judge=JudgeConfig(backend="openai", model="gpt-4o"))
    run_chat_eval(cfg, "runs/zephyr/chat")["score"]

Modules: questions (MT-Bench's layout, the default set), generate (chat-template generation),
prompts (MT-Bench's judge prompts, the rating parser), backends (endpoint and local judges,
the judgment cache), endpoint (the judge endpoint's HTTP: redirects that keep credentials
at home, a bounded request, masking), judge (grading and averages), run (`wmdp chat-eval`).
"""

from wmdp.chat.backends import ChatCompletionsJudge, JudgmentCache, LocalJudge
from wmdp.chat.generate import generate_answers
from wmdp.chat.judge import JudgeConfig, chat_scores, format_chat_table, judge_answers
from wmdp.chat.prompts import parse_rating
from wmdp.chat.questions import Question, load_questions
from wmdp.chat.run import ChatEvalConfig, run_chat_eval

__all__ = ["ChatEvalConfig", "JudgeConfig", "run_chat_eval", "Question", "load_questions",
           "generate_answers", "judge_answers", "chat_scores", "format_chat_table",
           "parse_rating", "ChatCompletionsJudge", "LocalJudge", "JudgmentCache"]

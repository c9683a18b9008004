"""Answers to multi-turn questions, generated with the model's chat template, turn by turn.

Turn 2's prompt holds turn 1's question and the model's own answer to it, as MT-Bench's
answer generation builds the conversation. Questions are batched (left padding, an attention
mask) within one sampling temperature: MT-Bench's per category (0.0 is greedy decoding, as
FastChat's `temperature < 1e-4`), other sampling settings from the model's generation config.
Each batch is seeded from `seed` and its position in a fixed order, so a resumed run samples
what an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from wmdp.progress import tqdm

from wmdp.chat.questions import Question, temperature_for
from wmdp.errors import WmdpError
from wmdp.models import input_device

GREEDY_BELOW = 1e-4  # FastChat: do_sample = temperature >= 1e-4


def read_chat_template(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise WmdpError(f"{path}: chat template file not found")
    return path.read_text(encoding="utf-8")


def check_chat_template(tokenizer: Any, chat_template: str | None, where: str) -> None:
    """Fail before any generation when there is no template to render a conversation with."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise WmdpError(f"{where}: the tokenizer has no chat template (a base model?); give one "
                        "with --chat-template FILE (a Jinja template)")


def check_chat_renders(tokenizer: Any, questions: Sequence[Question],
                       chat_template: str | None, system_prompt: str | None, where: str) -> None:
    """Fail before anything is generated or written when a conversation cannot be rendered:
    each question at each turn, a placeholder standing in for the answers not yet made."""
    check_chat_template(tokenizer, chat_template, where)
    for q in questions:
        for turn in range(len(q.turns)):
            try:
                render_prompt(tokenizer, conversation(q, ["(answer)"] * turn, turn, system_prompt),
                              chat_template)
            except WmdpError as e:
                raise WmdpError(f"{where}: question {q.question_id}, turn {turn + 1}: "
                                f"{e}") from None


def render_prompt(tokenizer: Any, messages: list[dict[str, str]],
                  chat_template: str | None = None) -> str:
    """The conversation as text, ending where the assistant's next reply begins."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template)
    except Exception as e:  # noqa: BLE001 - jinja2 raises many types; show one line
        raise WmdpError("cannot render the chat template: "
                        f"{' '.join(str(e).split())[:300]}") from e


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-turn tokens: the generation config's EOS ids (e.g. <|eot_id|>) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *,
                   temperature: float, max_new_tokens: int) -> list[tuple[str, int, bool]]:
    """(reply, new tokens, truncated) for each prompt: one left-padded `generate` call.

    The prompts are rendered chat templates, which hold their own BOS where the model wants
    one, so nothing is added in tokenising (as `apply_chat_template(tokenize=True)` does).
    """
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, ids in enumerate(encoded):  # left padding: every row's last token is at -1
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention_mask[b, width - len(ids):] = 1
    sample = temperature >= GREEDY_BELOW
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sample,
                                  pad_token_id=pad, eos_token_id=stops or None)
    if sample:
        kwargs["temperature"] = temperature
    else:  # unset the config's sampling knobs: greedy decoding ignores them anyway
        kwargs.update(temperature=None, top_p=None, top_k=None)
    device = input_device(model)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         **kwargs)[:, width:]                                  # (B, new)
    replies = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        new = row[:end] if end is not None else row
        replies.append((tokenizer.decode(new, skip_special_tokens=True).strip(), len(new),
                        end is None))
    return replies


def conversation(question: Question, answers: Sequence[str], turn: int,
                 system_prompt: str | None = None) -> list[dict[str, str]]:
    """Messages up to the user's message of `turn` (0-based), with the earlier answers."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for t in range(turn):
        messages += [{"role": "user", "content": question.turns[t]},
                     {"role": "assistant", "content": answers[t]}]
    return messages + [{"role": "user", "content": question.turns[turn]}]


def answer_batches(questions: Sequence[Question], batch_size: int,
                   temperature: float | None = None) -> list[tuple[float, list[Question]]]:
    """A fixed order of batches, each of one temperature (its seed is its position)."""
    by_temp: dict[float, list[Question]] = {}
    for q in questions:
        by_temp.setdefault(temperature_for(q, temperature), []).append(q)
    return [(t, qs[i:i + batch_size]) for t, qs in by_temp.items()
            for i in range(0, len(qs), batch_size)]


def generate_answers(model: nn.Module, tokenizer: Any, questions: Sequence[Question], *,
                     model_id: str, max_new_tokens: int = 1024, batch_size: int = 8,
                     seed: int = 42, temperature: float | None = None,
                     chat_template: str | None = None, system_prompt: str | None = None,
                     done: dict[Any, dict] | None = None, progress: bool = True,
                     on_batch: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Answer records (MT-Bench's layout: `choices[0].turns`) for every question, in order.

    `done` maps question ids to answers already made (a resumed run): their batches are skipped.
    `on_batch` receives each new batch's records as it finishes, to save them.
    """
    if batch_size < 1:
        raise WmdpError(f"batch size {batch_size} is not a positive integer")
    check_chat_template(tokenizer, chat_template, model_id)
    done = dict(done or {})
    batches = answer_batches(questions, batch_size, temperature)
    todo = [(i, t, qs) for i, (t, qs) in enumerate(batches)
            if not all(q.question_id in done for q in qs)]
    bar = tqdm(total=sum(len(q.turns) for _, _, qs in todo for q in qs), desc="answers",
               unit="turn", disable=not progress, leave=False)
    for index, temp, qs in todo:
        torch.manual_seed(seed + index)
        answers: list[list[str]] = [[] for _ in qs]
        new_tokens: list[list[int]] = [[] for _ in qs]
        truncated: list[list[bool]] = [[] for _ in qs]
        for turn in range(max(len(q.turns) for q in qs)):
            rows = [b for b, q in enumerate(qs) if turn < len(q.turns)]
            prompts = [render_prompt(tokenizer, conversation(qs[b], answers[b], turn,
                                                             system_prompt), chat_template)
                       for b in rows]
            replies = generate_batch(model, tokenizer, prompts, temperature=temp,
                                     max_new_tokens=max_new_tokens)
            for b, (text, n, cut) in zip(rows, replies):
                answers[b].append(text)
                new_tokens[b].append(n)
                truncated[b].append(cut)
            bar.update(len(rows))
        records = [{"question_id": q.question_id, "category": q.category, "model_id": model_id,
                    "temperature": temp, "choices": [{"index": 0, "turns": answers[b]}],
                    "new_tokens": new_tokens[b], "truncated": truncated[b]}
                   for b, q in enumerate(qs)]
        for r in records:
            done[r["question_id"]] = r
        if on_batch is not None:
            on_batch(records)
    bar.close()
    return [done[q.question_id] for q in questions]

"""Perplexity of a causal LM on text: rolling log-likelihood, as lm-eval's wikitext task scores it.

    wmdp eval --model M --tasks wikitext,ppl:data/retain.jsonl --output DIR

In Python, on a model already in memory:

    lls = rolling_loglikelihoods(model, tokenizer, texts)      # [(loglikelihood, tokens), ...]
    perplexity_metrics(texts, lls)["word_perplexity"]

Each text is scored whole, none of it truncated: its tokens are cut into windows of at most
`max_length` (the model's context, lm-eval's default) predicted tokens. The first window predicts
every token from a prefix token (current lm-eval: BOS, else EOS; lm-eval 0.4.2, the paper's
version: EOS, its `eot_token_id`); each later window predicts the next
`max_length` tokens conditioned on the tokens just before them, so every prediction sees a full
window (lm-eval's `get_rolling_token_windows` with `context_len=1`, then `make_disjoint_window`).
Metrics are lm-eval's (`weighted_perplexity`, `bits_per_byte`) over the corpus:

    token_perplexity = exp(-sum(ll) / sum(tokens))
    word_perplexity  = exp(-sum(ll) / sum(words))    words = len(re.split(r"\\s+", text))
    byte_perplexity  = exp(-sum(ll) / sum(bytes))    bytes = len(text.encode("utf-8"))
    bits_per_byte    = -sum(ll) / sum(bytes) / ln 2
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from torch import nn

from wmdp.errors import WmdpError
from wmdp.models import model_max_length
# one scoring kernel for MCQs and text: the batch forward and its OOM back-off live in scoring.py
from wmdp.scoring import encode_texts, Row, score_rows


PREFIX_RULES = ("bos", "eos")


def prefix_token_id(tokenizer: Any, rule: str = "bos") -> int:
    """What the first token is predicted from. "bos": BOS, else EOS (current lm-eval's
    `prefix_token_id`); "eos": EOS (lm-eval 0.4.2's `loglikelihood_rolling`, `eot_token_id`)."""
    if rule not in PREFIX_RULES:
        raise WmdpError(f"prefix rule {rule!r} is not one of {', '.join(PREFIX_RULES)}")
    order = (tokenizer.bos_token_id, tokenizer.eos_token_id) if rule == "bos" else \
        (tokenizer.eos_token_id,)
    for token_id in order:
        if token_id is not None:
            return int(token_id)
    raise WmdpError("the tokenizer has no " + ("BOS or EOS" if rule == "bos" else "EOS") +
                    " token to predict the first token of a text from")


def rolling_windows(tokens: Sequence[int], prefix_token: int,
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, predicted tokens) windows covering `tokens`, each prediction made once."""
    if max_length < 1:  # a window that predicts nothing would never finish
        raise WmdpError(f"max length is {max_length}, expected a positive number of tokens")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]  # context: the prefix alone (made disjoint)
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        context = tokens[end - max_length - 1:end - 1]       # max_length tokens before `end`
        windows.append((context[:len(context) - (n - 1)], tokens[end - n:end]))
        predicted = end
    return windows


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def rolling_loglikelihoods(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                           batch_size: int | str = "auto", add_special_tokens: bool | None = None,
                           max_length: int | None = None, progress: bool | str = True,
                           on_batch_size: Callable[[int], None] | None = None,
                           prefix: str = "bos") -> list[tuple[float, int, int]]:
    """(summed log-likelihood, tokens scored, windows) of each text.

    `add_special_tokens`: None encodes as the tokenizer does by default (current lm-eval: a BOS
    tokenizer adds BOS, which is then predicted from the BOS prefix), False never adds one
    (lm-eval 0.4.2). `prefix`: the rule of `prefix_token_id` ("eos" for lm-eval 0.4.2).
    """
    max_length = _max_length(model, tokenizer, max_length)
    prefix_id = prefix_token_id(tokenizer, prefix)
    token_lists = encode_texts(tokenizer, list(texts), add_special_tokens)
    rows: list[Row] = []
    for i, tokens in enumerate(token_lists):
        for context, targets in rolling_windows(tokens, prefix_id, max_length):
            row = (context + targets)[-(max_length + 1):][:-1]  # lm-eval's model input
            rows.append(Row(i, tuple(row), ((0, len(row) - len(targets), tuple(targets)),)))
    totals = [0.0] * len(token_lists)
    scores = score_rows(model, rows, batch_size=batch_size,
                        progress=progress if isinstance(progress, str) or not progress
                        else "perplexity", on_batch_size=on_batch_size)
    for r, (ll,) in zip(rows, scores):
        totals[r.request] += ll
    windows = [0] * len(token_lists)
    for r in rows:
        windows[r.request] += 1
    return [(ll, len(toks), w) for ll, toks, w in zip(totals, token_lists, windows)]


def _max_length(model: nn.Module, tokenizer: Any, max_length: int | None) -> int:
    """The window: as given (a positive number), else the model's context length."""
    if max_length is None:
        return model_max_length(model, tokenizer)
    if max_length < 1:
        raise WmdpError(f"max length is {max_length}, expected a positive number of tokens")
    return max_length


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity_metrics(loglikelihood: float, tokens: int, words: int, n_bytes: int) -> dict:
    """lm-eval's corpus-level metrics from summed log-likelihood and counts."""
    return {"token_perplexity": _exp(-loglikelihood / tokens) if tokens else None,
            "word_perplexity": _exp(-loglikelihood / words),
            "byte_perplexity": _exp(-loglikelihood / n_bytes),
            "bits_per_byte": -loglikelihood / n_bytes / math.log(2)}


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's wikitext detokenizer: undo wikitext's spacing before a document is scored."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                 (" " + chr(176) + " ", chr(176)), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "),
                 (" 's", "'s")):
        s = s.replace(a, b)
    return s


DETOKENIZERS: dict[str, Callable[[str], str]] = {"wikitext": wikitext_detokenizer}


def score_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                batch_size: int | str = "auto", add_special_tokens: bool | None = None,
                max_length: int | None = None, progress: bool | str = True,
                stats: dict | None = None,
                detokenize: Callable[[str], str] | None = None,
                prefix: str = "bos") -> tuple[dict, list[dict]]:
    """Corpus metrics and per-text samples (doc_id, loglikelihood, token/word/byte counts).

    With `detokenize`, the detokenized text is scored while words and bytes are counted on the
    original (as lm-eval's wikitext task does). `prefix`: see `rolling_loglikelihoods`.
    """
    max_length = _max_length(model, tokenizer, max_length)
    scored = [detokenize(t) for t in texts] if detokenize is not None else texts
    lls = rolling_loglikelihoods(
        model, tokenizer, scored, batch_size=batch_size, add_special_tokens=add_special_tokens,
        max_length=max_length, progress=progress, prefix=prefix,
        on_batch_size=(lambda bs: stats.__setitem__("batch_size", bs)) if stats is not None else None)
    samples = [{"doc_id": i, "loglikelihood": ll, "tokens": n_tokens, "words": count_words(text),
                "bytes": count_bytes(text), "windows": windows}
               for i, (text, (ll, n_tokens, windows)) in enumerate(zip(texts, lls))]
    totals = {k: sum(s[k] for s in samples) for k in ("loglikelihood", "tokens", "words", "bytes",
                                                      "windows")}
    metrics = {**perplexity_metrics(totals["loglikelihood"], totals["tokens"], totals["words"],
                                    totals["bytes"]),
               **totals, "max_length": max_length, "prefix_token_id": prefix_token_id(tokenizer, prefix),
               "n": len(samples)}
    return metrics, samples


__all__ = ["rolling_windows", "rolling_loglikelihoods", "perplexity_metrics", "score_texts",
           "prefix_token_id", "count_words", "count_bytes"]

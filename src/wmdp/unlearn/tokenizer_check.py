"""What the run's tokenizer is, and where it splits the run's texts unlike the reference's.

The RMU reference loads the slow (sentencepiece) tokenizer (`use_fast=False`); transformers 5
has only fast tokenizers, and a fast tokenizer can split some texts differently: under
`legacy: false` a text that starts with a space (every wikitext line does) loses the extra
"▁" piece sentencepiece gives it. The run record counts, per corpus, the texts of the schedule
whose token ids differ from the sentencepiece model's own encoding
(`SentencePieceProcessor.encode`, the slow tokenizer's split of a plain text), so a user can
tell whether a published run is reproduced token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wmdp.unlearn.batches import TopicBatches


def _sentencepiece(tokenizer: Any) -> tuple[Any, str]:
    """The tokenizer's sentencepiece model, or None and why not."""
    vocab = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if not vocab or not str(vocab).endswith(".model") or not Path(vocab).is_file():
        return None, "no sentencepiece model beside the tokenizer"
    try:
        import sentencepiece
    except ImportError:
        return None, "the sentencepiece package is not installed (pip install sentencepiece)"
    return sentencepiece.SentencePieceProcessor(model_file=str(vocab)), ""


def used_texts(schedule: TopicBatches) -> dict[str, list[str]]:
    """Each corpus's texts that the schedule's steps read, in order."""
    out: dict[str, list[str]] = {}
    for kind, batches in (("forget", schedule.forget), ("retain", schedule.retain)):
        for topic, chunks in enumerate(batches):
            n = -(-(schedule.num_batches - topic) // schedule.n_topics)  # steps of this topic
            out[f"{kind}[{topic}]"] = [t for chunk in chunks[:max(n, 0)] for t in chunk]
    return out


def tokenizer_record(tokenizer: Any, schedule: TopicBatches) -> dict:
    record: dict[str, Any] = {
        "class": type(tokenizer).__name__, "is_fast": bool(getattr(tokenizer, "is_fast", False)),
        "configured_padding_side": tokenizer.padding_side,
        "own_pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
        "legacy": tokenizer.init_kwargs.get("legacy")}
    sp, why = _sentencepiece(tokenizer)
    if sp is None:
        record["sentencepiece_check"] = f"not run: {why}"
        return record
    differ = {}
    for name, texts in used_texts(schedule).items():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        differ[name] = {"texts": len(texts),
                        "differ": sum(a != b for a, b in zip(ids, sp.encode(texts)))}
    record["sentencepiece_check"] = differ
    return record

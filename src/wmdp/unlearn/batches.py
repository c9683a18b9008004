"""Forget/retain batching shared by every unlearning method, as the RMU reference batches.

Each corpus is a list of texts; consecutive chunks of `batch_size` texts are its batches (no
shuffling; the last chunk may be short). Step `idx` uses topic `idx % n_topics` and batch
`idx // n_topics` of that topic's forget corpus and of its retain corpus, and the run has
`min(max_num_batches, shortest forget, shortest retain)` steps (counted in batches), repeated
`epochs` times (the reference runs one epoch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from wmdp.data.corpus import Corpus
from wmdp.errors import WmdpError


def chunk(texts: list[str], batch_size: int) -> list[list[str]]:
    return [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]


@dataclass(frozen=True)
class Step:
    idx: int
    topic: int
    forget: list[str]
    retain: list[str]


class TopicBatches:
    """The step schedule of an unlearning run over paired forget/retain corpora."""

    def __init__(self, forget: list[Corpus], retain: list[Corpus], batch_size: int,
                 max_num_batches: int, epochs: int = 1) -> None:
        if not forget:
            raise WmdpError("no forget corpus given")
        if len(retain) != len(forget):
            raise WmdpError(f"{len(forget)} forget corpora but {len(retain)} retain corpora: "
                            "give one retain corpus per forget corpus")
        if batch_size < 1 or max_num_batches < 1 or epochs < 1:
            raise WmdpError("batch_size, max_num_batches and epochs must be positive")
        self.forget = [chunk(c.texts, batch_size) for c in forget]
        self.retain = [chunk(c.texts, batch_size) for c in retain]
        self.n_topics = len(forget)
        self.num_batches = min(max_num_batches, *(len(b) for b in self.forget),
                               *(len(b) for b in self.retain))
        self.epochs = epochs

    def __len__(self) -> int:
        return self.num_batches * self.epochs

    def __getitem__(self, idx: int) -> Step:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        i = idx % self.num_batches  # the position within the epoch picks topic and batch
        topic, b = i % self.n_topics, i // self.n_topics
        return Step(idx, topic, self.forget[topic][b], self.retain[topic][b])


def training_tokenizer(tokenizer: Any) -> Any:
    """A copy for the baselines and the audit: the tokenizer's own pad token (EOS where it has
    none) on the left, truncation on the right; `tokenize` gives each row its own positions.
    (RMU encodes as its reference does: `reference_tokenizer`, `reference_batch`.)

    The caller's tokenizer (and so the one saved with the unlearned model) is left as it was.
    """
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.truncation_side = "right"
    return tok


def tokenize(tokenizer: Any, texts: list[str], max_length: int,
             device: torch.device | str) -> dict[str, torch.Tensor]:
    """A padded batch (input_ids, attention_mask, position_ids) on `device`.

    With left padding a row's first real token must sit at position 0, as it would alone: the
    model computes positions from 0 at the first column unless told, which shifts every padded
    row (harmless under RoPE, where only relative positions count; wrong for GPT-2's learned
    absolute positions).
    """
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return left_padded(enc["input_ids"], tokenizer.pad_token_id, device)


def reference_tokenizer(tokenizer: Any, padding_side: str) -> Any:
    """A copy set up as the RMU reference's `load_model` sets its tokenizer: EOS as the pad token
    (always, even where the tokenizer has a pad token of its own), padding on `padding_side`
    ("left", the reference's `tokenizer.padding_side = "left"`; "right"; or "tokenizer": as the
    tokenizer is configured), truncation on the right (`run_rmu` sets it)."""
    if padding_side not in PADDING_SIDES:
        raise WmdpError(f"padding_side {padding_side!r} is not one of {', '.join(PADDING_SIDES)}")
    tok = copy.deepcopy(tokenizer)
    if tok.eos_token is None:
        if tok.pad_token is None:
            raise WmdpError("the tokenizer has neither an EOS nor a pad token to pad with")
    else:
        tok.pad_token = tok.eos_token
    if padding_side != "tokenizer":
        tok.padding_side = padding_side
    tok.truncation_side = "right"
    return tok


PADDING_SIDES = ("left", "right", "tokenizer")
POSITION_IDS = ("default", "per_row")


def reference_batch(tokenizer: Any, texts: list[str], max_length: int, device: torch.device | str,
                    position_ids: str = "default") -> dict[str, torch.Tensor]:
    """One batch as the reference encodes it: `tokenizer(texts, return_tensors="pt",
    padding=True, truncation=True, max_length=max_length)`, so input_ids and attention_mask only.

    `position_ids="default"` passes none (the model numbers columns 0..T-1 in every row, whatever
    the padding: the reference's behaviour; harmless for real tokens under RoPE, and the pad
    positions, which the reference's unmasked loss includes, get the positions it gives them).
    "per_row" starts each row's positions at its first real token (for learned absolute positions,
    e.g. GPT-2, under left padding).
    """
    if position_ids not in POSITION_IDS:
        raise WmdpError(f"position_ids {position_ids!r} is not one of {', '.join(POSITION_IDS)}")
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
    batch = {"input_ids": enc["input_ids"].to(device),
             "attention_mask": enc["attention_mask"].to(device)}
    if position_ids == "per_row":
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


PADS = ("faithful", "clean")
# The rule transformers 4.38.2 (the reference's pin) used, under SDPA, for a query row that sees
# only padding: mistral, mixtral and qwen2 build the mask with
# `_prepare_4d_causal_attention_mask_for_sdpa`, whose `AttentionMaskConverter._unmask_unattended`
# zeroes rows 0..f-1 of a row whose first real token is at f > 0 ("before_first_real"); llama and
# gemma build it in `_update_causal_mask`, which zeroes every row that is entirely masked
# ("fully_masked"; it also builds the 4D mask when nothing is padded). The two differ only on a
# text with no token at all.
SDPA_4_38_RULES = {"mistral": "before_first_real", "mixtral": "before_first_real",
                   "qwen2": "before_first_real", "llama": "fully_masked", "gemma": "fully_masked"}


def sdpa_mask_4_38(attention_mask: torch.Tensor, dtype: torch.dtype,
                   rule: str) -> torch.Tensor:
    """The attention mask transformers 4.38.2's SDPA path gives a batch without a cache: a
    (B, 1, T, T) float mask, 0 where a query attends and `torch.finfo(dtype).min` where it does
    not (causal, and padded keys), with the rows `rule` names set to 0: they attend to every
    position, later ones included. Where 4.38.2 passed no mask (`before_first_real`, nothing
    padded: SDPA's `is_causal`), the 2D mask comes back as it was: the installed transformers
    then takes the same path. Any transformers that passes a 4D mask through to SDPA unchanged
    (4.38.2's own, and 5.x's `masking_utils`) computes with exactly this mask.
    """
    if rule not in ("before_first_real", "fully_masked"):
        raise WmdpError(f"no transformers 4.38.2 mask rule {rule!r}")
    if rule == "before_first_real" and bool((attention_mask == 1).all()):
        return attention_mask
    b, t = attention_mask.shape
    lowest = torch.finfo(dtype).min
    cols = torch.arange(t, device=attention_mask.device)
    causal = torch.full((t, t), lowest, device=attention_mask.device)
    causal.masked_fill_(cols < (cols + 1).view(t, 1), 0)  # (T, T): 0 on and below the diagonal
    pad_keys = (attention_mask == 0)[:, None, None, :]    # (B, 1, 1, T)
    mask = causal.to(dtype)[None, None].expand(b, 1, t, t).masked_fill(pad_keys, lowest)
    if rule == "fully_masked":
        return mask * ~(mask == lowest).all(-1, keepdim=True)  # (B, 1, T, T)
    # the first real column of each row (argmax of mask x [T..1]); 0 for a row with no token
    first = (attention_mask.cpu() * torch.arange(t, 0, -1)).argmax(-1)  # (B,)
    for row, f in enumerate(first.tolist()):
        mask[row, 0, :f] = 0.0
    return mask


def left_padded(seqs: list[list[int]], pad_id: int,
                device: torch.device | str) -> dict[str, torch.Tensor]:
    """Token lists as one left-padded batch: input_ids, attention_mask, and position_ids that
    start at 0 on each row's first real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device)}

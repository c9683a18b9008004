"""Batched log-likelihood scoring of (context, continuations) requests, as lm-eval scores them.

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, `whole = enc(context + continuation)`, `ctx = enc(context)`, and the continuation
tokens are `whole[len(ctx):]`. The model sees `(ctx + cont)[-(max_length + 1):][:-1]`.

What is faster than lm-eval, with the same numbers:
- one forward pass per question when every continuation is one token (` A`..` D`): the four
  log-probabilities are read from the log-softmax at the last context position. A question with
  any longer continuation falls back to one row per choice, exactly as lm-eval scores it;
- the LM head runs only on the positions a row reads (its input is gathered before it runs),
  not on every position of every row;
- rows are sorted by length and right-padded without an attention mask: a causal model never
  attends forward, so padding cannot change a score;
- tokenisation is batched in the tokenizer's native code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from wmdp.progress import tqdm

from wmdp.distributed import all_gather, is_sharded, rank_world
from wmdp.errors import WmdpError
from wmdp.models import input_device, model_max_length


@dataclass(frozen=True)
class Request:
    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    request: int                      # index of the request this row serves
    tokens: tuple[int, ...]           # model input
    reads: tuple[tuple[int, int, tuple[int, ...]], ...]  # (choice, first position, targets)


def encode_requests(tokenizer: Any, requests: Sequence[Request],
                    add_special_tokens: bool | None) -> list[tuple[list[int], list[list[int]]]]:
    """(context tokens, [continuation tokens per choice]) for each request, lm-eval's way."""
    contexts, wholes, shape = [], [], []
    for r in requests:
        ctx = r.context
        n_spaces = len(ctx) - len(ctx.rstrip())
        conts = [ctx[len(ctx) - n_spaces:] + c for c in r.continuations] if n_spaces else \
            list(r.continuations)
        ctx = ctx[:len(ctx) - n_spaces] if n_spaces else ctx
        contexts.append(ctx)
        wholes.extend(ctx + c for c in conts)
        shape.append(len(conts))
    ctx_ids = encode_texts(tokenizer, contexts, add_special_tokens)
    whole_ids = encode_texts(tokenizer, wholes, add_special_tokens)
    out, k = [], 0
    for c, n in zip(ctx_ids, shape):
        out.append((c, [w[len(c):] for w in whole_ids[k:k + n]]))
        k += n
    return out


def encode_texts(tokenizer: Any, strings: list[str], add_special_tokens: bool | None) -> list[list[int]]:
    if not strings:
        return []
    bos = getattr(tokenizer, "bos_token", None)
    if add_special_tokens is None:
        # the tokenizer's default, except where the text already starts with BOS (lm-eval)
        starts_bos = [bool(bos) and s.startswith(bos) for s in strings]
        if any(starts_bos):
            return [tokenizer.encode(s, add_special_tokens=not b) for s, b in zip(strings, starts_bos)]
        return tokenizer(strings)["input_ids"]
    return tokenizer(strings, add_special_tokens=add_special_tokens)["input_ids"]


def build_rows(encoded: list[tuple[list[int], list[list[int]]]], max_length: int) -> list[Row]:
    """The model inputs that score encoded requests: one row per question when every
    continuation is one token, else one per choice; inputs cut to `max_length` as lm-eval does."""
    rows = []
    for i, (ctx, conts) in enumerate(encoded):
        if not ctx:
            raise WmdpError("a prompt encoded to no tokens")
        if all(len(c) == 1 for c in conts):  # one forward serves every choice
            toks = ctx[-max_length:]
            rows.append(Row(i, tuple(toks), tuple((j, len(toks) - 1, (c[0],))
                                                  for j, c in enumerate(conts))))
            continue
        for j, cont in enumerate(conts):  # exact per-choice scoring, lm-eval's arithmetic
            if len(cont) > max_length:
                raise WmdpError(f"a continuation of {len(cont)} tokens does not fit the "
                                f"context length {max_length}")
            if not cont:
                rows.append(Row(i, tuple(ctx[-max_length:]), ((j, -1, ()),)))
                continue
            toks = (ctx + cont)[-(max_length + 1):][:-1]
            rows.append(Row(i, tuple(toks), ((j, len(toks) - len(cont), tuple(cont)),)))
    return rows


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def _score_batch(model: nn.Module, batch: list[Row]) -> list[list[float]]:
    """Summed continuation log-likelihoods for each read of each row of one batch."""
    width = max(len(r.tokens) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, :len(r.tokens)] = torch.tensor(r.tokens)
    # The positions each row reads, (B, K); the LM head runs on these alone.
    spans = [sorted({start + k for _, start, t in r.reads for k in range(len(t))}) or [0]
             for r in batch]
    k_max = max(len(s) for s in spans)
    positions = torch.tensor([s + [s[-1]] * (k_max - len(s)) for s in spans])
    logits = logits_at(model, ids.to(input_device(model)), positions)  # (B, K, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # one gather for every (row, position, target token); sums per (row, read)
    rows, ks, toks, slots = [], [], [], []
    n_reads = max(len(r.reads) for r in batch)
    for b, (r, span) in enumerate(zip(batch, spans)):
        where = {p: k for k, p in enumerate(span)}
        for slot, (_, start, targets) in enumerate(r.reads):
            for offset, t in enumerate(targets):
                rows.append(b)
                ks.append(where[start + offset])
                toks.append(t)
                slots.append(b * n_reads + slot)
    dev = logprobs.device
    vals = logprobs[torch.tensor(rows, device=dev), torch.tensor(ks, device=dev),
                    torch.tensor(toks, device=dev)]
    sums = torch.zeros(len(batch) * n_reads, dtype=torch.float64, device=dev)
    sums.index_add_(0, torch.tensor(slots, device=dev), vals.double())
    sums = sums.view(len(batch), n_reads).tolist()
    return [sums[b][:len(r.reads)] for b, r in enumerate(batch)]


def logits_at(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at `positions` (B, K) only: the LM head's input is gathered before it runs.

    A pre-hook on the output embedding picks the wanted positions, so the head (and any
    elementwise post-processing a model applies, like Gemma's soft-capping) sees (B, K, d).
    A model whose forward bypasses its output module falls back to gathering full logits.
    """
    head = model.get_output_embeddings()
    pos = positions.to(ids.device)
    fired = []

    def gather(module: nn.Module, args: tuple) -> tuple:
        h = args[0]
        fired.append(True)
        idx = pos.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return (torch.gather(h, 1, idx), *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if fired:
        return logits
    idx = pos.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def loglikelihoods(model: nn.Module, tokenizer: Any, requests: Sequence[Request], *,
                   batch_size: int | str = "auto", add_special_tokens: bool | None = None,
                   max_length: int | None = None, progress: bool | str = True,
                   on_batch_size: Callable[[int], None] | None = None) -> list[list[float]]:
    """Summed log-likelihood of each continuation of each request: `out[i][j]`."""
    if max_length is not None and max_length < 1:
        raise WmdpError(f"max length is {max_length}, expected a positive number of tokens")
    max_length = max_length or model_max_length(model, tokenizer)
    encoded = encode_requests(tokenizer, requests, add_special_tokens)
    rows = build_rows(encoded, max_length)
    results: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
    for r, lls in zip(rows, score_rows(model, rows, batch_size=batch_size, progress=progress,
                                       on_batch_size=on_batch_size)):
        for (choice, _, _), ll in zip(r.reads, lls):
            results[r.request][choice] = ll
    return results


def score_rows(model: nn.Module, rows: list[Row], *, batch_size: int | str = "auto",
               progress: bool | str = True,
               on_batch_size: Callable[[int], None] | None = None) -> list[list[float]]:
    """Each row's summed log-likelihood per read, in the order given.

    Rows run longest first (an out-of-memory shows at once), in batches that halve and retry
    on out-of-memory; `on_batch_size` hears the batch size that worked. Under torch.distributed
    each process scores every N-th row and all get every score. A model sharded over the
    processes (FSDP: every forward is collective) runs the same number of forwards on every
    rank: a rank with fewer batches scores its last row again, and discards it; an
    out-of-memory is then an error (one rank cannot back off alone).
    """
    rank, world = rank_world()
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), rows[i].tokens))
    order = order[rank::world]
    out: list[list[float]] = [[] for _ in rows]
    bs = initial_batch_size(batch_size, model)
    sharded = world > 1 and _sharded(model)
    if sharded:  # the most batches any rank runs: rank 0's share is the largest
        forwards = math.ceil(math.ceil(len(rows) / world) / bs)
    bar = tqdm(total=len(order), desc=progress if isinstance(progress, str) else "scoring",
               disable=not progress or rank != 0, leave=False, unit="row")
    i = 0
    while i < len(order):
        idx = order[i:i + bs]
        try:
            scores = _score_batch(model, [rows[j] for j in idx])
        except RuntimeError as e:
            if not is_oom(e) or bs == 1 or sharded:
                raise
            bs = max(1, bs // 2)  # back off and retry the same rows
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for j, lls in zip(idx, scores):
            out[j] = lls
        i += len(idx)
        bar.update(len(idx))
        if sharded:
            forwards -= 1
    bar.close()
    while sharded and forwards > 0:  # this rank's share ran out first: keep step with the rest
        _score_batch(model, [rows[order[-1] if order else 0]])
        forwards -= 1
    if world > 1:
        for share in all_gather({j: out[j] for j in order}):
            for j, lls in share.items():
                out[j] = lls
    if on_batch_size is not None:
        on_batch_size(bs)
    return out


def _sharded(model: nn.Module) -> bool:
    return is_sharded(next(model.parameters()))


def initial_batch_size(batch_size: int | str, model: nn.Module) -> int:
    """A batch size as given, or for "auto" 256 rows on a GPU (halved on out-of-memory), 16 on
    a CPU; anything else is a one-line error."""
    if batch_size == "auto":
        return 256 if input_device(model).type == "cuda" else 16
    try:
        bs = int(batch_size)
    except (TypeError, ValueError):
        raise WmdpError(f"batch size {batch_size!r} is not a positive integer or 'auto'") from None
    if bs < 1:
        raise WmdpError(f"batch size {batch_size!r} is not a positive integer or 'auto'")
    return bs

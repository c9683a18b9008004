"""The fine-tuning attack loop (`wmdp.audit.attack.finetune`) against a fine-tuning loop written
out by hand: the same losses step by step, the same model at every checkpoint, the model put
back after; and its settings refused in one line."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from conftest import GPT2_TOK, tiny_config
from wmdp.audit.attack import FinetuneSettings, finetune
from wmdp.errors import WmdpError

WORDS = "the a of host server module patch protein route cell byte kernel flaw marsh".split()


@pytest.fixture(scope="module")
def tiny():
    """A random-init 2-layer Llama (GPT-2 tokenizer) in eval mode, and texts of 3-29 words (so
    every batch is left-padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOK)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).eval()
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 29))) for _ in range(6)]
    return model, tok, texts


def _naive(model, tok, texts, lr, settings: FinetuneSettings, seed, steps, probe):
    """Fine-tuning written out: a copy of the model, AdamW, a seeded permutation per pass cut
    into batches, rows left-padded by hand, the loss summed token by token over the targets
    predicted from a real token (never from padding), the rate set by hand each step."""
    model = copy.deepcopy(model).eval().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    warm = math.ceil(settings.warmup_ratio * steps)
    rng, queue, losses, at = random.Random(seed), [], [], {}
    for k in range(steps):
        if not queue:
            order = rng.sample(texts, len(texts))
            step = settings.batch_size
            queue = [order[i:i + step] for i in range(0, len(order), step)]
        rows = [tok(t, truncation=True, max_length=settings.max_length)["input_ids"]
                for t in queue.pop(0)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.eos_token_id)
        mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
            pos[b, width - len(r):] = torch.arange(len(r))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=pos).logits, -1)
        total, count = 0.0, 0
        for b, r in enumerate(rows):
            first = width - len(r)  # row b's first real token
            for t in range(len(r) - 1):
                total = total - logp[b, first + t, r[t + 1]]
                count += 1
        loss = total / count
        factor = 1.0 if settings.lr_schedule == "constant" else \
            (k / warm if k < warm else (steps - k) / (steps - warm))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            at[k + 1] = probe(model)
    return losses, at


def _probe(model) -> float:
    """A figure of the model's weights as they are: its mean logit on a fixed input."""
    return model(input_ids=torch.tensor([[5, 17, 300, 9]])).logits.double().mean().item()


@pytest.mark.parametrize("schedule,warmup,weight_decay", [("constant", 0.0, 0.0),
                                                          ("linear", 0.25, 0.1)])
def test_finetune_is_a_hand_written_fine_tuning_loop(tiny, schedule, warmup, weight_decay):
    model, tok, texts = tiny
    settings = FinetuneSettings(batch_size=4, max_length=24, weight_decay=weight_decay,
                                lr_schedule=schedule, warmup_ratio=warmup)
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    curve = finetune(model, tok, texts, settings, method="full", lr=3e-3, seed=4,
                     checkpoints=[3, 8, 5], evaluate=lambda m: {"probe": _probe(m)})
    losses, at = _naive(model, tok, texts, 3e-3, settings, seed=4, steps=8, probe=_probe)
    assert [p["step"] for p in curve] == [3, 5, 8]  # two passes of two batches, and more
    for point, (lo, hi) in zip(curve, [(0, 3), (3, 5), (5, 8)]):
        assert point["loss"] == pytest.approx(sum(losses[lo:hi]) / (hi - lo), abs=1e-5)
        assert point["probe"] == pytest.approx(at[point["step"]], rel=1e-4)
    assert losses[-1] < losses[0]  # it learns the texts
    after = model.state_dict()  # put back: weights, frozen flags, eval mode
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)


def test_lora_trains_only_adapters_and_unloads_them(tiny):
    model, tok, texts = tiny
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    seen = []
    curve = finetune(model, tok, texts, FinetuneSettings(batch_size=3), method="lora", lr=1e-2,
                     seed=0, checkpoints=[2, 4],
                     evaluate=lambda m: seen.append(_probe(m)) or {})
    assert [p["step"] for p in curve] == [2, 4] and seen[0] != seen[1] != _probe(model)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("change,message", [
    ({"weight_decay": -0.1}, r"demo.weight_decay is -0.1, expected a number >= 0"),
    ({"lr_schedule": "cosine"}, r"demo.lr_schedule is 'cosine', expected constant or linear"),
    ({"warmup_ratio": 1.5}, r"demo.warmup_ratio is 1.5, expected a fraction"),
    ({"batch_size": 0}, r"demo.batch_size is 0, expected a positive integer"),
])
def test_bad_settings_are_one_line(change, message):
    with pytest.raises(WmdpError, match=message):
        FinetuneSettings(**change).check_finetune("demo")


def test_an_unknown_method_and_no_checkpoint_are_refused(tiny):
    model, tok, texts = tiny
    with pytest.raises(WmdpError, match="method 'qlora' is not one of full, lora"):
        finetune(model, tok, texts, FinetuneSettings(), method="qlora", lr=1e-3, seed=0,
                 checkpoints=[1], evaluate=lambda m: {})
    with pytest.raises(WmdpError, match="positive checkpoints"):
        finetune(model, tok, texts, FinetuneSettings(), method="full", lr=1e-3, seed=0,
                 checkpoints=[], evaluate=lambda m: {})


def test_too_few_texts_name_the_setting():
    from wmdp.audit.attack import select_texts
    from wmdp.data.corpus import Corpus

    with pytest.raises(WmdpError, match=r"^3 texts in f, fewer than relearn.num_texts=8$"):
        select_texts([Corpus("f", ["a b c", "d e f", "g h i"], "t")], 8, [], True,
                     "relearn.num_texts")

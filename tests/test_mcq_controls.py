"""The MCQ controls flag a model that "forgets" by answering one letter, and not the oracle.

The letter-answering model is made here, by construction: the sandbox model with its (untied)
LM head given a large bias towards the letter A, so it answers A to every letter-format
question whatever it knows. The small sandbox models pick one letter of their own (they never
learned the letter format), so the flag is a letter bias beyond the base model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wmdp.audit.common import AuditContext, Subject, pooled, recovered_fraction, task_accuracy
from wmdp.audit.mcq_controls import (MCQControlsConfig, mcq_controls_text, run_mcq_controls,
                                     shifted)
from wmdp.data.mcq import MCQItem
from wmdp.errors import WmdpError
from wmdp.models import load_model
from wmdp.tasks import PROMPT_STYLES, Registry

FIXTURES = Path(__file__).parent / "fixtures"
SANDBOX, ORACLE = FIXTURES / "sandbox-small", FIXTURES / "sandbox-small-oracle" / "model"
LETTER, CLOZE = ("sandbox_bio_letter", "sandbox_cyber_letter"), ("sandbox_bio",)
BIAS = 50.0  # added to the letter A's logit: far above any gap between the letters' logits


def _letter_a(base, tok):
    """The base with an untied LM head that favours every token of " A" (the sandbox tokenizer
    spells it as two, a space and the letter, where " B" is one)."""
    a_ids = tok(" A")["input_ids"]
    model = copy.deepcopy(base)
    head = nn.Linear(base.lm_head.in_features, base.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight)
        head.bias.zero_()
        head.bias[a_ids] = BIAS
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def ctx():
    reg = Registry.build(data_dir=SANDBOX / "data")
    tasks = {n: reg.tasks[n] for n in LETTER + CLOZE}
    items = {n: t.load_items() for n, t in tasks.items()}
    base, tok = load_model(str(SANDBOX / "model"), dtype="float32", device="cpu")
    oracle, otok = load_model(str(ORACLE), dtype="float32", device="cpu")
    models = {"base": (base, tok), "unlearned": (_letter_a(base, tok), tok),
              "oracle": (oracle, otok)}
    reference = {r: {t: f["correct"] for t, f in
                     task_accuracy(m, k, tasks, items, "lmeval", 32).items()}
                 for r, (m, k) in models.items()}
    return AuditContext({r: Subject(r, m, k) for r, (m, k) in models.items()}, tasks, items,
                        PROMPT_STYLES["lmeval"], reference, progress=False, batch_size=32)


def test_shifted_moves_the_answer_with_its_text():
    item = MCQItem("q?", ("w", "x", "y", "z"), 2)
    for s in range(4):
        moved = shifted(item, s)
        assert moved.choices[moved.answer] == "y"
    assert shifted(item, 1).choices == ("x", "y", "z", "w")


def test_letter_bias_is_flagged_and_the_oracle_is_not(ctx):
    result = run_mcq_controls(ctx, MCQControlsConfig())
    for t in LETTER:
        fig, rec = result["tasks"][t], result["recovery"][t]
        answers = np.array([i.answer for i in ctx.items[t]])
        hider = fig["unlearned"]["permutation"]
        assert hider["top_position"] == 0 and hider["positions"][0]["share"] == 1.0
        # always A: right exactly where the shifted answer is A (hand-computed per shift)
        want = [float(np.mean((answers - s) % 4 == 0)) for s in range(4)]
        assert hider["acc"] == pytest.approx(want)
        assert fig["unlearned"]["choices_only"]["acc"] == pytest.approx(np.mean(answers == 0))
        assert rec["position_bias"] == {"base": False, "unlearned": True, "oracle": False}
        # shift 0 is the plain prompt: the evaluator's accuracy, for every model
        for role in ctx.subjects:
            assert fig[role]["permutation"]["acc"][0] == pytest.approx(
                np.mean(ctx.reference[role][t]))
        best = result["tasks"][t]["chosen"]["unlearned"]["in_sample_shift"]
        assert rec["attacked_in_sample"] == pytest.approx(  # the in-sample best, labelled
            fig["unlearned"]["permutation"]["acc"][best])
    assert "answers by position on sandbox_bio_letter" in result_text(result)
    # cloze: each continuation is scored alone, so each position gets exactly its share
    for role in ctx.subjects:
        perm = result["tasks"]["sandbox_bio"][role]["permutation"]
        assert [p["share"] for p in perm["positions"]] == [0.25] * 4
        assert perm["spread"] == 0.0 and not perm["beyond_base"]


def result_text(result):
    """The verdict's sentence from the question-weighted pooled figures, as the audit pools."""
    entries = result["recovery"]
    fig = {k: pooled(entries, k) for k in ("unlearned", "base", "attacked")}
    fig["recovered_fraction"] = recovered_fraction(fig["attacked"], fig["unlearned"], fig["base"])
    return mcq_controls_text(fig, result)


def test_questions_with_unequal_choices_are_refused(ctx):
    bad = copy.copy(ctx)
    bad.tasks = {"sandbox_bio": ctx.tasks["sandbox_bio"]}
    bad.items = {"sandbox_bio": [MCQItem("q?", ("a", "b"), 0), MCQItem("r?", ("a", "b", "c"), 1)]}
    with pytest.raises(WmdpError, match="sandbox_bio"):
        run_mcq_controls(bad, MCQControlsConfig())

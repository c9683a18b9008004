"""Item-by-item agreement with lm-evaluation-harness itself, run on the same model and file."""

from __future__ import annotations

import pytest

from conftest import write_mcq_jsonl
from wmdp.evaluate import EvalConfig, evaluate_model
from wmdp.models import load_model
from wmdp.tasks import PROMPT_STYLES, Registry, Task

pytest.importorskip("lm_eval")
from wmdp.lmeval_bridge import lmeval_loglikelihoods  # noqa: E402

CASES = [("lmeval", "letter"), ("lmeval-0.4.2", "letter"), ("lmeval", "cloze")]


@pytest.mark.parametrize("style,fmt", CASES, ids=[f"{s}-{f}" for s, f in CASES])
@pytest.mark.parametrize("fixture", ["llama_mistral_tok", "gpt2_tiny"])
def test_same_numbers_as_lm_eval(request, tmp_path, fixture, style, fmt):
    model, tok = load_model(request.getfixturevalue(fixture), dtype="float32", device="cpu")
    path = write_mcq_jsonl(tmp_path / "q.jsonl", 30)
    task = Task("agree", "biology", path=path, format=fmt)
    reg = Registry.build()
    reg.tasks["agree"] = task
    ours = evaluate_model(model, tok, ["agree"], reg, progress=False,
                          config=EvalConfig(prompt_style=style, batch_size=7))
    ref_lls, ref_metrics = lmeval_loglikelihoods(model, tok, task, path, PROMPT_STYLES[style])
    samples = ours["samples"]["agree"]
    for s, ref in zip(samples, ref_lls, strict=True):
        assert s["loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        assert s["pred"] == max(range(4), key=lambda j: ref[j])
    r = ours["results"]["agree"]
    assert r["acc"] == pytest.approx(ref_metrics["acc"], abs=1e-12)
    assert r["acc_stderr"] == pytest.approx(ref_metrics["acc_stderr"], abs=1e-12)
    if fmt == "cloze":
        assert r["acc_norm"] == pytest.approx(ref_metrics["acc_norm"], abs=1e-12)

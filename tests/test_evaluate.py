"""The evaluator against a naive reference: each continuation scored by its own forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import GPT2_TOK, MISTRAL_TOK, char_tokenizer, save_tiny_model, write_mcq_jsonl
from wmdp.data.mcq import load_mcq_file
from wmdp.evaluate import EvalConfig, evaluate_model, mean_stderr, pooled_stderr
from wmdp.models import load_model
from wmdp.tasks import PROMPT_STYLES, Registry, Task, build_prompt


def naive_loglikelihoods(model, tok, context: str, continuations: list[str],
                         add_special_tokens: bool | None) -> list[float]:
    """lm-eval's arithmetic, one full forward per (context, continuation)."""
    def enc(s):
        return tok.encode(s) if add_special_tokens is None else \
            tok.encode(s, add_special_tokens=add_special_tokens)

    out = []
    for cont in continuations:
        ctx_ids = enc(context)
        cont_ids = enc(context + cont)[len(ctx_ids):]
        with torch.no_grad():
            logp = model(torch.tensor([(ctx_ids + cont_ids)[:-1]])).logits.float().log_softmax(-1)[0]
        out.append(float(sum(logp[len(ctx_ids) - 1 + k, t] for k, t in enumerate(cont_ids))))
    return out


def check_against_naive(model, tok, task: Task, path, style_name: str, batch_size) -> dict:
    style = PROMPT_STYLES[style_name]
    reg = Registry.build(task_files={task.name: str(path)})
    reg.tasks[task.name] = Task(task.name, task.topic, path=path, format=task.format)
    res = evaluate_model(model, tok, [task.name], reg, progress=False,
                         config=EvalConfig(batch_size=batch_size, prompt_style=style_name))
    samples = res["samples"][task.name]
    items = load_mcq_file(path)
    add = None if style.add_bos is None else style.add_bos
    for item, s in zip(items, samples, strict=True):
        context, conts = build_prompt(item, reg.tasks[task.name], style)
        ref = naive_loglikelihoods(model, tok, context, conts, add)
        assert s["loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        assert s["pred"] == max(range(4), key=lambda j: ref[j])
    return res


ARCH_TOKENIZERS = [("llama", MISTRAL_TOK), ("mistral", MISTRAL_TOK), ("qwen2", GPT2_TOK),
                   ("gpt2", GPT2_TOK), ("gpt_neox", GPT2_TOK)]


@pytest.mark.parametrize("arch,tok_dir", ARCH_TOKENIZERS, ids=[a for a, _ in ARCH_TOKENIZERS])
def test_letter_format_matches_naive_reference(tmp_path, arch, tok_dir):
    path = save_tiny_model(tmp_path / arch, arch, tok_dir)
    model, tok = load_model(path, dtype="float32", device="cpu")
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 24)
    task = Task("custom", "testing")
    r1 = check_against_naive(model, tok, task, qs, "lmeval", 1)
    r16 = check_against_naive(model, tok, task, qs, "lmeval", 16)
    assert [s["pred"] for s in r1["samples"]["custom"]] == [s["pred"] for s in r16["samples"]["custom"]]


def test_prompt_style_042_drops_bos_and_blank_line(llama_mistral_tok, tmp_path):
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 8)
    task = Task("custom", "biology")
    check_against_naive(model, tok, task, qs, "lmeval-0.4.2", 4)
    item = load_mcq_file(qs)[0]
    now, _ = build_prompt(item, task, PROMPT_STYLES["lmeval"])
    old, _ = build_prompt(item, task, PROMPT_STYLES["lmeval-0.4.2"])
    assert now.startswith("The following are multiple choice questions (with answers) about biology.\n\n")
    assert old == now.replace("biology.\n\n", "biology.\n", 1)
    # the two styles give different numbers on a BOS tokenizer: the style matters and is recorded
    a = evaluate_model(model, tok, ["custom"], Registry.build(task_files={"custom": str(qs)}),
                       progress=False, config=EvalConfig(prompt_style="lmeval"))
    b = evaluate_model(model, tok, ["custom"], Registry.build(task_files={"custom": str(qs)}),
                       progress=False, config=EvalConfig(prompt_style="lmeval-0.4.2"))
    assert a["samples"]["custom"][0]["loglikelihoods"] != b["samples"]["custom"][0]["loglikelihoods"]
    assert b["config"]["prompt_style"] == "lmeval-0.4.2"


def test_multi_token_letters_fall_back_to_exact_scoring(tmp_path):
    tok = char_tokenizer()
    assert len(tok.encode("Answer: A")) - len(tok.encode("Answer:")) == 2
    path = save_tiny_model(tmp_path / "char", "llama", tokenizer=tok)
    model, tok = load_model(path, dtype="float32", device="cpu")
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 10)
    for bs in (1, 16):
        check_against_naive(model, tok, Task("custom", "testing"), qs, "lmeval", bs)


def test_cloze_format_matches_naive_reference(llama_mistral_tok, tmp_path):
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 12)
    res = check_against_naive(model, tok, Task("custom", "testing", format="cloze"), qs, "lmeval", 5)
    samples = res["samples"]["custom"]
    items = load_mcq_file(qs)
    for item, s in zip(items, samples):  # acc_norm: divide by characters, as lm-eval
        norm = [ll / len(c) for ll, c in zip(s["loglikelihoods"], item.choices)]
        assert s["pred_norm"] == max(range(4), key=lambda j: norm[j])
    r = res["results"]["custom"]
    assert r["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in samples) / len(samples))


def test_stderr_formulas_hand_computed():
    # mean 0.75; squared deviations 3 * 0.0625 + 0.5625 = 0.75; / (n-1) = 0.25; sqrt 0.5; / 2
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    # pooled stderr of two groups equals the stderr of all items together when means match
    a, b = [1, 0] * 10, [1, 0] * 30
    pooled = pooled_stderr([mean_stderr(a), mean_stderr(b)], [len(a), len(b)])
    assert pooled == pytest.approx(mean_stderr(a + b), rel=2e-2)
    assert mean_stderr([1.0]) is None


def test_groups_are_size_weighted(llama_mistral_tok, tmp_path):
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    d = tmp_path / "data"
    d.mkdir()
    write_mcq_jsonl(d / "wmdp_bio.jsonl", 9, seed=1)
    write_mcq_jsonl(d / "wmdp-cyber.jsonl", 5, seed=2)
    write_mcq_jsonl(d / "wmdp_chem.jsonl", 3, seed=3)
    res = evaluate_model(model, tok, ["wmdp"], Registry.build(data_dir=d), progress=False)
    r = res["results"]
    g = res["groups"]["wmdp"]
    assert list(r) == ["wmdp_bio", "wmdp_chem", "wmdp_cyber"]
    all_acc = [s["acc"] for t in r for s in res["samples"][t]]
    assert g["acc"] == pytest.approx(sum(all_acc) / len(all_acc))
    assert g["n"] == 17
    assert res["sources"]["wmdp_cyber"]["source"].endswith("wmdp-cyber.jsonl")


def test_results_record_what_changes_numbers(llama_mistral_tok, mcq_file, tmp_path):
    from wmdp.evaluate import run_eval

    cfg = EvalConfig(model=str(llama_mistral_tok), dtype="float32", device="cpu", batch_size=4,
                     task_files={"custom": str(mcq_file)}, limit=7)
    run_eval(cfg, ["custom"], tmp_path / "out", progress=False)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    c = res["config"]
    for key in ("model", "revision", "dtype", "batch_size", "padding_side", "device_count",
                "prompt_style", "versions", "seed", "prompt_template"):
        assert key in c
    assert c["versions"]["torch"] == torch.__version__.split("+")[0] or c["versions"]["torch"]
    assert res["results"]["custom"]["n"] == 7
    assert len(res["sources"]["custom"]["sha256"]) == 64
    lines = (tmp_path / "out" / "samples_custom.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert set(json.loads(lines[0])) >= {"doc_id", "gold", "pred", "loglikelihoods"}


def test_rerun_skips_finished_tasks(llama_mistral_tok, tmp_path, monkeypatch):
    from wmdp import evaluate as ev

    qs = {n: write_mcq_jsonl(tmp_path / f"{n}.jsonl", 6, seed=i) for i, n in enumerate("ab")}
    cfg = EvalConfig(model=str(llama_mistral_tok), dtype="float32", device="cpu",
                     task_files={k: str(v) for k, v in qs.items()})
    ev.run_eval(cfg, ["a"], tmp_path / "out", progress=False)
    scored = []
    real = ev.score_task
    monkeypatch.setattr(ev, "score_task", lambda m, t, task, *a, **k: scored.append(task.name)
                        or real(m, t, task, *a, **k))
    res = ev.run_eval(cfg, ["a", "b"], tmp_path / "out", progress=False)
    assert scored == ["b"]
    assert set(res["results"]) == {"a", "b"}


def test_fewshot_and_system_prompt_layout():
    from wmdp.data.mcq import MCQItem

    ex = MCQItem("Which is red?", ("sky", "blood", "grass", "snow"), 1)
    q = MCQItem(" What is 2+2? ", ("3", "4", "5", "6"), 1)
    ctx, conts = build_prompt(q, Task("t", "math"), PROMPT_STYLES["lmeval"], fewshot=[ex],
                              system="You are an expert.")
    assert ctx == ("You are an expert.\n\nThe following are multiple choice questions (with answers) "
                   "about math.\n\nWhich is red?\nA. sky\nB. blood\nC. grass\nD. snow\nAnswer: B"
                   "\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert conts == [" A", " B", " C", " D"]
    ctx, conts = build_prompt(q, Task("t", "math", format="cloze"), PROMPT_STYLES["lmeval"], fewshot=[ex])
    assert ctx.endswith("Question: Which is red?\nAnswer: blood\n\nQuestion: What is 2+2?\nAnswer:")
    assert conts == [" 3", " 4", " 5", " 6"]


def test_out_of_memory_halves_the_batch_and_keeps_every_score(llama_mistral_tok, tmp_path, monkeypatch):
    from wmdp import scoring

    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 20)
    reg = Registry.build(task_files={"q": str(qs)})
    ref = evaluate_model(model, tok, ["q"], reg, progress=False, config=EvalConfig(batch_size=1))
    real = scoring._score_batch
    sizes = []

    def small_memory(m, batch):
        sizes.append(len(batch))
        if len(batch) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(m, batch)

    monkeypatch.setattr(scoring, "_score_batch", small_memory)
    res = evaluate_model(model, tok, ["q"], reg, progress=False, config=EvalConfig(batch_size=16))
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 2
    assert res["config"]["batch_size_used"] == 2
    for a, b in zip(ref["samples"]["q"], res["samples"]["q"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_device_map_auto_loads_through_accelerate_and_scores_the_same(llama_mistral_tok, tmp_path):
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 10)
    reg = Registry.build(task_files={"q": str(qs)})
    plain = evaluate_model(*load_model(llama_mistral_tok, dtype="float32", device="cpu"), ["q"], reg,
                           progress=False)
    model, tok = load_model(llama_mistral_tok, dtype="float32", device_map="auto")
    sharded = evaluate_model(model, tok, ["q"], reg, progress=False)
    for a, b in zip(plain["samples"]["q"], sharded["samples"]["q"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_a_continuation_longer_than_the_context_is_a_clear_error():
    from wmdp.errors import WmdpError
    from wmdp.scoring import build_rows

    assert build_rows([([1, 2, 3], [[4, 5]])], max_length=2)[0].reads == ((0, 0, (4, 5)),)
    with pytest.raises(WmdpError, match="continuation of 3 tokens does not fit the context length 2"):
        build_rows([([1, 2], [[4, 5, 6]])], max_length=2)

"""The robustness audit: probes with known answers, relearning, GCG, few-shot, activation norms,
the audit directory (every figure on disk, resume), and the command line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from conftest import FIXTURES, GPT2_TOK, save_tiny_model, write_mcq_jsonl
from wmdp.audit.activations import ActivationsConfig, mean_norms
from wmdp.audit.common import (AuditContext, Subject, recovered_fraction, resolve_layers,
                               wilson_interval)
from wmdp.audit.fewshot import FewshotConfig, run_fewshot
from wmdp.audit.gcg import (GCGConfig, encode_question, objective_gradient, objectives,
                            optimise_suffix, retokenizing)
from wmdp.audit.probe import ProbeConfig, cross_validated, run_probe
from wmdp.audit.relearn import RelearnConfig, relearn_curve, run_relearn, select_texts
from wmdp.audit.run import AuditConfig, audit_config, reference_accuracy, run_audit
from wmdp.cli import main
from wmdp.data.corpus import Corpus
from wmdp.data.mcq import MCQItem
from wmdp.errors import WmdpError
from wmdp.models import load_model
from wmdp.scoring import Request, loglikelihoods
from wmdp.tasks import PROMPT_STYLES, Registry, build_prompt

SANDBOX = FIXTURES / "sandbox-small"
needs_sandbox = pytest.mark.skipif(not (SANDBOX / "model" / "config.json").is_file(),
                                   reason="the trained sandbox fixture is not built")
WORDS = "the a of host server module patch protein route cell byte kernel flaw marsh".split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two random-init 3-layer Llamas (GPT-2 tokenizer): 'base' and 'unlearned'."""
    d = tmp_path_factory.mktemp("audit-models")
    return (save_tiny_model(d / "base", "llama", GPT2_TOK, seed=0, layers=3),
            save_tiny_model(d / "unlearned", "llama", GPT2_TOK, seed=1, layers=3))


def make_ctx(paths, registry: Registry, names: list[str], forget=(), retain=()) -> AuditContext:
    tasks = {n: registry.tasks[n] for n in names}
    items = {n: t.load_items() for n, t in tasks.items()}
    subjects = {r: Subject(r, *load_model(p, dtype="float32", device="cpu"))
                for r, p in zip(("base", "unlearned"), paths)}
    ref = reference_accuracy(subjects, tasks, items, AuditConfig(batch_size=16), progress=False)
    return AuditContext(subjects, tasks, items, PROMPT_STYLES["lmeval"],
                        {r: {t: v["correct"] for t, v in ref[r].items()} for r in ref},
                        list(forget), list(retain), seed=0, batch_size=16, progress=False)


@pytest.fixture
def quiz_ctx(tiny_pair, tmp_path):
    reg = Registry.build(task_files={"quiz": str(write_mcq_jsonl(tmp_path / "q.jsonl", 40))})
    return make_ctx(tiny_pair, reg, ["quiz"], [Corpus("f", texts(12, 1), "t")],
                    [Corpus("r", texts(12, 2), "t")])


# --- arithmetic -------------------------------------------------------------------------------

def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (7, 20), (24, 24), (300, 1273)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_recovered_fraction():
    assert recovered_fraction(0.52, unlearned=0.21, base=0.83) == pytest.approx(0.5)
    assert recovered_fraction(0.21, unlearned=0.21, base=0.83) == 0.0
    assert recovered_fraction(0.5, unlearned=0.80, base=0.82) is None  # no gap to recover


# --- probes: known answers ----------------------------------------------------------------------

def _planted(n: int, d: int, signal: float, seed: int = 0):
    """Features where the answer is (or, at signal 0, is not) linearly written."""
    rng = np.random.default_rng(seed)
    answers = rng.integers(0, 4, n)
    directions = rng.normal(size=(4, d))
    x = signal * directions[answers] + rng.normal(size=(n, d))
    return x, answers, rng


def test_letter_probe_reads_a_planted_answer_and_not_noise():
    x, answers, _ = _planted(200, 32, signal=2.0)
    got = cross_validated("letter", {"base": x, "unlearned": np.random.default_rng(5).normal(
        size=x.shape)}, answers, {}, ProbeConfig(), seed=0, transfer=("base", "unlearned"))
    assert got["base"].mean() > 0.9
    lo, hi = wilson_interval(got["unlearned"].mean(), len(answers))
    assert lo <= 0.25 + 0.03 and got["unlearned"].mean() < 0.4  # noise: at chance
    assert got["base->unlearned"].mean() < 0.4


def test_content_probe_reads_a_planted_answer_embedding():
    n, d = 200, 16
    rng = np.random.default_rng(0)
    choices = rng.normal(size=(n, 4, d))
    answers = rng.integers(0, 4, n)
    mixing = rng.normal(size=(d, 24))
    x = choices[np.arange(n), answers] @ mixing + 0.3 * rng.normal(size=(n, 24))
    noise = rng.normal(size=x.shape)
    cfg = ProbeConfig(ridge_alpha=1.0)
    got = cross_validated("content", {"base": x, "unlearned": noise}, answers,
                          {"base": choices, "unlearned": choices}, cfg, seed=0,
                          transfer=("base", "unlearned"))
    assert got["base"].mean() > 0.9
    assert got["unlearned"].mean() < 0.4
    shuffled = cross_validated("content", {"base": x}, answers, {"base": choices}, cfg, seed=0,
                               shuffle=True)
    assert shuffled["base"].mean() < 0.4  # the control finds nothing


def test_probe_on_random_init_model_stays_at_chance(tiny_pair, tmp_path):
    reg = Registry.build(task_files={"quiz": str(write_mcq_jsonl(tmp_path / "q.jsonl", 120))})
    ctx = make_ctx(tiny_pair, reg, ["quiz"])
    out = run_probe(ctx, ProbeConfig(control_shuffles=1))
    r = out["tasks"]["quiz"]
    assert r["kind"] == "letter" and r["layers"] == [0, 1, 2] and r["n"] == 120
    for role in ("base", "unlearned", "base_to_unlearned"):
        for acc, (lo, hi) in zip(r[role]["acc"], r[role]["ci95"]):
            assert lo <= r["chance"] + 0.02, (role, acc)  # chance is inside the interval
    assert out["recovery"]["quiz"]["chance"] == r["chance"]


@needs_sandbox
def test_content_probe_finds_the_sandbox_facts():
    reg = Registry.build(SANDBOX / "data")
    names = ["sandbox_bio", "sandbox_cyber", "sandbox_bio_seen", "sandbox_cyber_seen"]
    path = SANDBOX / "model"
    ctx = make_ctx((path, path), reg, names)
    out = run_probe(ctx, ProbeConfig(control_shuffles=2))
    pooled = out["pooled"]["content"]
    best = pooled["base"]["best_acc"]
    lo, _ = pooled["base"]["ci95"][pooled["layers"].index(pooled["base"]["best_layer"])]
    assert best > 0.6 and lo > pooled["control"], pooled  # well above chance and the control


# --- relearning ---------------------------------------------------------------------------------

def test_select_texts_prefers_texts_that_never_mention_a_question():
    corpus = Corpus("f", ["Vorkela lives in the marsh.", "Brisk is a server.",
                          "Tamu lives in the sea.", "Vorkela spreads by air."], "t")
    qs = [MCQItem("Where does Vorkela live?", ("a", "b", "c", "d"), 0)]
    chosen, mentioned = select_texts([corpus], 2, qs, disjoint=True)
    assert chosen == ["Brisk is a server.", "Tamu lives in the sea."] and mentioned == [False]
    chosen, mentioned = select_texts([corpus], 2, qs, disjoint=False)
    assert chosen[0].startswith("Vorkela") and mentioned == [True]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_relearn_curve_leaves_the_model_as_it_was(quiz_ctx, method):
    subject = quiz_ctx.subjects["base"]
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    types = [type(m) for m in subject.model.modules()]
    cfg = RelearnConfig(num_texts=4, steps=6, eval_every=4, batch_size=2, lr=1e-2, method=method)
    curve = relearn_curve(subject, texts(4, 3), quiz_ctx, cfg, "test")
    assert [p["step"] for p in curve] == [0, 4, 6]
    assert curve[0]["correct"]["quiz"] == quiz_ctx.reference["base"]["quiz"]
    assert curve[2]["loss"] < curve[1]["loss"]  # it learns the texts (mean loss per segment)
    after = subject.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in subject.model.modules()] == types


@needs_sandbox
def test_relearning_the_base_model_does_not_reduce_its_accuracy():
    reg = Registry.build(SANDBOX / "data")
    path = SANDBOX / "model"
    forget = [Corpus("f", [json.loads(x)["text"] for x in
                           (SANDBOX / "data" / "forget_bio.jsonl").read_text().splitlines()], "f")]
    retain = [Corpus("r", [json.loads(x)["text"] for x in
                           (SANDBOX / "data" / "retain.jsonl").read_text().splitlines()], "r")]
    ctx = make_ctx((path, path), reg, ["sandbox_bio"], forget, retain)
    out = run_relearn(ctx, RelearnConfig(steps=12, eval_every=6))
    for kind in ("forget", "retain"):
        accs = out["tasks"]["sandbox_bio"][f"base_{kind}"]["acc"]
        assert min(accs) >= accs[0] - 0.1, (kind, accs)


# --- GCG ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["letter", "cloze"])
@pytest.mark.parametrize("objective", ["choices", "target"])
def test_gcg_objective_agrees_with_the_evaluators_scoring(tiny_pair, tmp_path, fmt, objective):
    reg = Registry.build(task_files={"quiz": str(write_mcq_jsonl(tmp_path / "q.jsonl", 4))},
                         fmt=fmt)
    model, tok = load_model(tiny_pair[0], dtype="float32", device="cpu")
    task, items = reg.tasks["quiz"], reg.tasks["quiz"].load_items()
    qs = [encode_question(tok, it, task, PROMPT_STYLES["lmeval"], None) for it in items]
    suffix = torch.tensor(tok(" x x x", add_special_tokens=False)["input_ids"])
    _, loss = objective_gradient(model, qs, suffix, objective)
    (by_rows,) = objectives(model, qs, suffix.unsqueeze(0), batch_size=3, objective=objective)
    lls = loglikelihoods(model, tok, [Request(q.prefix_text + " x x x" + q.tail_text,
                                              q.continuations) for q in qs], progress=False)
    own = np.array([ll[q.answer] for ll, q in zip(lls, qs)])
    if objective == "choices":  # the answer's log-softmax among the four choices
        own = own - logsumexp(np.array(lls), axis=1)
    assert loss == pytest.approx(-own.mean(), rel=1e-4)
    assert by_rows == pytest.approx(-own.mean(), rel=1e-4)


def test_gcg_lowers_its_objective_within_a_few_steps(quiz_ctx):
    subject = quiz_ctx.subjects["unlearned"]
    task, items = quiz_ctx.tasks["quiz"], quiz_ctx.items["quiz"][:4]
    qs = [encode_question(subject.tokenizer, it, task, quiz_ctx.style, None) for it in items]
    cfg = GCGConfig(steps=4, suffix_init=" x x x x", search_width=32, topk=16)
    out = optimise_suffix(subject, qs, cfg, seed=0)
    assert len(out["loss"]) == 5 and out["best_loss"] < out["loss"][0] - 0.05
    assert subject.tokenizer(out["suffix"], add_special_tokens=False)["input_ids"] == out["suffix_ids"]
    assert not any(p.requires_grad is False for p in subject.model.parameters())  # flags restored


def test_retokenizing_drops_candidates_that_change_when_re_encoded():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOK)
    good = tok(" x x", add_special_tokens=False)["input_ids"]
    assert len(tok(" there", add_special_tokens=False)["input_ids"]) == 1
    bad = [tok(" the", add_special_tokens=False)["input_ids"][0],
           tok("re", add_special_tokens=False)["input_ids"][0]]  # re-encodes as " there"
    kept = retokenizing(tok, torch.tensor([good, bad, good]))
    assert kept.tolist() == [good]


# --- few-shot and activations ---------------------------------------------------------------------

def test_fewshot_zero_shot_is_the_evaluators_accuracy(quiz_ctx):
    out = run_fewshot(quiz_ctx, FewshotConfig(shots=[0, 1, 3], pool_size=5))
    r = out["tasks"]["quiz"]
    asked = [i for i in range(40) if i not in r["pool"]]
    assert r["n"] == 35 and set(r["contexts"]) == {"0-shot", "1-shot", "3-shot", "expert",
                                                   "expert+3-shot"}
    for role in ("base", "unlearned"):
        assert r["contexts"]["0-shot"][role]["acc"] == pytest.approx(
            quiz_ctx.plain_acc(role, "quiz", asked))
    rec = out["recovery"]["quiz"]
    assert rec["attacked"] == r["contexts"][rec["best_context"]]["unlearned"]["acc"]


def test_fewshot_prompt_holds_k_pool_examples():
    items = [MCQItem(f"Question {i}?", ("a", "b", "c", "d"), i % 4) for i in range(3)]
    reg = Registry.build()
    task = reg.tasks["wmdp_bio"]
    ctx, _ = build_prompt(items[2], task, PROMPT_STYLES["lmeval"], fewshot=items[:2],
                          system="You are an expert.")
    assert ctx.startswith("You are an expert.\n\nThe following are multiple choice")
    assert ctx.count("Answer:") == 3 and "Question 0?" in ctx and ctx.endswith("Answer:")


def test_activation_norms_match_a_naive_per_text_forward(quiz_ctx):
    subject = quiz_ctx.subjects["base"]
    sample = texts(5, 7)
    layers = resolve_layers(subject.model, None)
    got = mean_norms(subject, sample, layers, ActivationsConfig(batch_size=2))
    sums, count = np.zeros(len(layers)), 0
    for t in sample:  # one unpadded text at a time; hidden_states[i + 1] is block i's output
        ids = subject.tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = subject.model(ids, output_hidden_states=True).hidden_states
        sums += [hs[i + 1][0].norm(dim=-1).sum().item() for i in layers]
        count += ids.shape[1]
    naive = sums / count
    assert got[:-1] == pytest.approx(naive[:-1], rel=1e-4)  # the last is after the final norm


# --- the audit directory and the command line -----------------------------------------------------

SMALL = ["probe.folds=4", "probe.control_shuffles=1", "relearn.num_texts=4", "relearn.steps=2",
         "relearn.eval_every=1", "relearn.batch_size=2", "gcg.num_train=4", "gcg.steps=2",
         "gcg.search_width=16", "gcg.topk=8", 'gcg.suffix_init=" x x x"', "fewshot.pool_size=5",
         "fewshot.shots=[0, 2]", "activations.num_texts=4", "activations.batch_size=2"]


def _write_texts(path, rows):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(path)


def _audit_args(tiny_pair, tmp_path, out):
    quiz = write_mcq_jsonl(tmp_path / "quiz.jsonl", 24)
    return {"model": str(tiny_pair[1]), "base": str(tiny_pair[0]), "output": str(out),
            "tasks": ["quiz"], "task_files": {"quiz": str(quiz)}, "dtype": "float32",
            "device": "cpu", "batch_size": 16,
            "forget_corpora": [_write_texts(tmp_path / "f.jsonl", texts(12, 1))],
            "retain_corpora": [_write_texts(tmp_path / "r.jsonl", texts(12, 2))]}


def _numbers(text: str) -> list[float]:
    return [float(x.rstrip("%")) / (100 if x.endswith("%") else 1)
            for x in re.findall(r"-?\d+\.\d+|-?\d+%", text)]


def test_audit_writes_every_figure_and_resumes(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "audit"
    config = audit_config(settings=_audit_args(tiny_pair, tmp_path, out), overrides=SMALL)
    record = run_audit(config, progress=False)
    on_disk = json.loads((out / "audit.json").read_text())
    assert set(on_disk["attacks"]) == {"probe", "relearn", "gcg", "fewshot", "activations"}
    assert on_disk["config"]["gcg"]["steps"] == 2 and on_disk["reference"]["base"]["quiz"]["n"] == 24
    for attack, result in on_disk["attacks"].items():
        assert json.loads((out / f"{attack}.json").read_text()) == result
        assert (out / f"{attack}.png").stat().st_size > 1000
        v = result["verdict"]
        figures = [x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)]
        for x in _numbers(v["text"]):  # every number the sentence states is a stored figure
            assert any(abs(x - f) <= 0.006 or (x == int(x) and x == f) for f in figures), \
                (attack, x, v)
        assert on_disk["verdicts"][attack] == v["text"]
    assert (out / "verdicts.md").read_text().count("\n- ") == 5
    gcg = on_disk["attacks"]["gcg"]  # the suffix is judged on questions it was not trained on
    assert gcg["n_train"] == 4 and gcg["tasks"]["quiz"]["n_held_out"] == 20
    assert gcg["recovery"]["quiz"]["n"] == 20
    assert len(gcg["suffixes"]["unlearned"]["loss"]) == 3
    assert record["attacks"].keys() == on_disk["attacks"].keys()

    calls = []
    monkeypatch.setitem(__import__("wmdp.audit.run", fromlist=["ATTACKS"]).ATTACKS, "gcg",
                        lambda ctx, cfg: calls.append(cfg))
    again = run_audit(config, progress=False)  # a rerun skips finished attacks
    assert calls == [] and again["attacks"]["gcg"] == on_disk["attacks"]["gcg"]

    changed = audit_config(settings=_audit_args(tiny_pair, tmp_path, out),
                           overrides=SMALL + ["gcg.steps=3"])
    with pytest.raises(WmdpError, match="holds gcg results with other gcg settings"):
        run_audit(changed, progress=False)
    other = audit_config(settings={**_audit_args(tiny_pair, tmp_path, out), "seed": 5},
                         overrides=SMALL)
    with pytest.raises(WmdpError, match="different configuration"):
        run_audit(other, progress=False)


def test_audit_adds_attacks_to_an_existing_run(tiny_pair, tmp_path):
    out = tmp_path / "audit"
    args = _audit_args(tiny_pair, tmp_path, out)
    run_audit(audit_config(settings={**args, "attacks": ["fewshot"]}, overrides=SMALL),
              progress=False)
    first = json.loads((out / "audit.json").read_text())["attacks"]["fewshot"]
    record = run_audit(audit_config(settings={**args, "attacks": ["fewshot", "activations"]},
                                    overrides=SMALL), progress=False)
    assert set(record["attacks"]) == {"fewshot", "activations"}
    assert record["attacks"]["fewshot"] == first


def test_cli_audit_runs_and_reports_bad_input_in_one_line(tiny_pair, tmp_path, capsys):
    a = _audit_args(tiny_pair, tmp_path, tmp_path / "out")
    argv = ["audit", "--model", a["model"], "--base", a["base"], "--task",
            f"quiz={a['task_files']['quiz']}", "--tasks", "quiz", "--output", a["output"],
            "--dtype", "float32", "--device", "cpu"]
    assert main(argv + ["--attacks", "fewshot", "--set", "fewshot.pool_size=5"]) == 0
    out = capsys.readouterr().out
    assert "fewshot: the best prompt" in out and "audit.json" in out
    assert main(argv + ["--attacks", "fewshot"]) == 2  # non-empty output, other settings
    assert main(argv[:-6] + ["--output", str(tmp_path / "o2"), "--attacks", "probe,jailbreak"]) == 2
    assert main(argv[:-6] + ["--output", str(tmp_path / "o3"), "--attacks", "relearn"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wmdp: ")]
    assert len(err) == 3
    assert "unknown attack 'jailbreak'" in err[1]
    assert "relearn attack needs --forget-corpora and --retain-corpora" in err[2]


def test_settings_layer_preset_file_flags_and_overrides(tmp_path):
    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("seed: 3\ngcg: {steps: 7}\nrelearn: {lr: 1e-4}\n")
    c = audit_config("gpu", str(cfg_file), {"seed": 5, "limit": None},
                     ["gcg.topk=9", "relearn.lr=2e-4"])
    assert c.gcg.steps == 7 and c.gcg.search_width == 512 and c.gcg.topk == 9  # preset + file
    assert c.relearn.method == "lora" and c.relearn.lr == 2e-4 and c.seed == 5 and c.limit is None
    with pytest.raises(WmdpError, match="unknown key 'stepz'"):
        audit_config(overrides=["gcg.stepz=3"])
    with pytest.raises(WmdpError, match="unknown audit preset"):
        audit_config("tpu")

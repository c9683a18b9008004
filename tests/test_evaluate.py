"""The evaluator against a naive reference: each continuation scored by its own forward pass."""

from __future__ import annotations

import hashlib
import json
import math

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
    # a: n 20, sample variance 5/19, se^2 1/76; b: n 60, variance 15/59, se^2 1/236.
    # pooled (lm-eval): (19 * 20/76 + 59 * 60/236) / (80 - 2) = 20/78, over 80: se^2 = 1/312
    a, b = [1, 0] * 10, [1, 0] * 30
    assert mean_stderr(a) ** 2 == pytest.approx(1 / 76, rel=1e-12)
    pooled = pooled_stderr([mean_stderr(a), mean_stderr(b)], [len(a), len(b)])
    assert pooled == pytest.approx(math.sqrt(1 / 312), rel=1e-12)
    # the alternatives this tolerance rejects: a size-weighted mean of the stderrs (0.0775)
    # and the stderr of all 80 items pooled into one sample (sqrt(1/316), 0.6% off)
    weighted = (20 * math.sqrt(1 / 76) + 60 * math.sqrt(1 / 236)) / 80
    assert pooled != pytest.approx(weighted, rel=1e-3)
    assert pooled != pytest.approx(mean_stderr(a + b), rel=1e-3)
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
    assert c["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert res["results"]["custom"]["n"] == 7
    assert len(res["sources"]["custom"]["sha256"]) == 64
    # what was read: the file's bytes and its question count (all 40, of which 7 were scored)
    assert res["sources"]["custom"]["file_sha256"] == hashlib.sha256(mcq_file.read_bytes()).hexdigest()
    assert res["sources"]["custom"]["questions"] == 40 and res["sources"]["custom"]["n"] == 7
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


class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


class _Model:
    def __init__(self, model_type):
        self.config = _Config(model_type)


def test_042_forces_bos_for_gemma_exactly():
    """lm-eval 0.4.2: `if getattr(self.config, "model_type", None) == "gemma"`, nothing else."""
    from wmdp.evaluate import add_special_tokens_for

    old, now = PROMPT_STYLES["lmeval-0.4.2"], PROMPT_STYLES["lmeval"]
    assert add_special_tokens_for(old, _Model("gemma")) is True
    for other in ("gemma2", "gemma3", "gemma3_text", "recurrent_gemma", "llama", None):
        assert add_special_tokens_for(old, _Model(other)) is False, other
    for any_type in ("gemma", "gemma2", "llama"):
        assert add_special_tokens_for(now, _Model(any_type)) is None  # the tokenizer's default


def test_rerun_with_other_tasks_merges_and_regroups(llama_mistral_tok, tmp_path):
    from wmdp.evaluate import run_eval
    from wmdp.errors import WmdpError

    d = tmp_path / "data"
    d.mkdir()
    for i, (name, n) in enumerate((("wmdp_bio", 9), ("wmdp_chem", 4), ("wmdp_cyber", 6))):
        write_mcq_jsonl(d / f"{name}.jsonl", n, seed=i)
    cfg = EvalConfig(model=str(llama_mistral_tok), dtype="float32", device="cpu", data_dir=str(d))
    out = tmp_path / "out"
    full = run_eval(cfg, ["wmdp"], out, progress=False)
    first = run_eval(cfg, ["wmdp_bio"], tmp_path / "bio_only", progress=False)
    assert "wmdp" not in first["groups"]
    (out / "samples_wmdp_bio.jsonl").unlink()  # wmdp_bio is scored again, the others kept
    again = run_eval(cfg, ["wmdp_bio"], out, progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["results"]) == {"wmdp_bio", "wmdp_chem", "wmdp_cyber"}
    for name in ("wmdp_chem", "wmdp_cyber"):
        assert on_disk["results"][name] == full["results"][name]
    # the group, recomputed from every task present: size-weighted by hand
    r = on_disk["results"]
    assert on_disk["groups"]["wmdp"]["acc"] == pytest.approx(
        sum(r[t]["acc"] * r[t]["n"] for t in r) / 19, rel=1e-12)
    assert again["groups"] == on_disk["groups"]
    # a different configuration (minus the task list) is refused, the results untouched
    before = (out / "results.json").read_bytes()
    with pytest.raises(WmdpError, match="different configuration"):
        run_eval(EvalConfig(**{**cfg.__dict__, "prompt_style": "lmeval-0.4.2"}), ["wmdp_chem"],
                 out, progress=False)
    assert (out / "results.json").read_bytes() == before


def test_nan_loglikelihoods_are_not_an_accuracy(llama_mistral_tok, tmp_path):
    from wmdp.errors import WmdpError

    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    with torch.no_grad():
        model.get_output_embeddings().weight[5].fill_(float("inf"))  # one token: inf - inf = NaN
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 5)
    with pytest.raises(WmdpError, match=r"task q: 5 of 5 questions have non-finite log-likelihoods \(NaN or inf\)"):
        evaluate_model(model, tok, ["q"], Registry.build(task_files={"q": str(qs)}),
                       progress=False)


class _FakeBuilder:
    """What `datasets.load_dataset_builder` returns, for a hub dataset read offline."""

    calls: list = []

    def __init__(self, path, name, revision=None):
        self.hash = "c0ffee" * 6 + "abcd" if revision in (None, "main") else "1234" * 10
        self.rows = 5 if revision is None else 3
        _FakeBuilder.calls.append((path, name, revision))

    def download_and_prepare(self):
        pass

    def as_dataset(self, split):
        assert split == "test"
        return [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
                for i in range(self.rows)]


def test_hub_data_records_the_resolved_commit_and_can_be_pinned(llama_mistral_tok, tmp_path,
                                                                 monkeypatch, capsys):
    import datasets

    from wmdp.cli import main

    monkeypatch.setattr(datasets, "load_dataset_builder", _FakeBuilder)
    _FakeBuilder.calls = []
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    res = evaluate_model(model, tok, ["wmdp_bio"], progress=False)
    assert _FakeBuilder.calls == [("cais/wmdp", "wmdp-bio", None)]
    src = res["sources"]["wmdp_bio"]
    assert src["revision"] == "c0ffee" * 6 + "abcd" and src["revision_requested"] is None
    assert src["questions"] == 5 and res["results"]["wmdp_bio"]["n"] == 5
    # --data-revision reaches the loader (MMLU too), and is part of the configuration
    code = main(["eval", "--model", str(llama_mistral_tok), "--tasks", "wmdp_cyber,mmlu_virology",
                 "--data-revision", "v1", "--output", str(tmp_path / "o"), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    assert _FakeBuilder.calls[1:] == [("cais/wmdp", "wmdp-cyber", "v1"),
                                      ("cais/mmlu", "virology", "v1")]
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk["sources"]["wmdp_cyber"]["revision"] == "1234" * 10
    assert on_disk["sources"]["mmlu_virology"]["revision_requested"] == "v1"
    assert on_disk["sources"]["mmlu_virology"]["questions"] == 3
    assert on_disk["config"]["data_revision"] == "v1"
    assert EvalConfig(data_revision="v1").fingerprint() != EvalConfig().fingerprint()
    assert EvalConfig(data_revision=None).fingerprint() == EvalConfig().fingerprint()


def _eval_cli(capsys, *argv):
    from wmdp.cli import main

    code = main(["eval", *argv])
    err = capsys.readouterr().err
    return code, err.rstrip("\n").split("\n")[-1].split("\r")[-1]


def test_task_file_alone_names_the_tasks(llama_mistral_tok, mcq_file, tmp_path, capsys):
    code, _ = _eval_cli(capsys, "--model", str(llama_mistral_tok), "--task", f"mine={mcq_file}",
                        "--output", str(tmp_path / "o"), "--limit", "2", "--dtype", "float32")
    assert code == 0
    assert list(json.loads((tmp_path / "o" / "results.json").read_text())["results"]) == ["mine"]


@pytest.mark.parametrize("argv,message", [
    (["--tasks", ","], "wmdp: --tasks names no task"),
    ([], "wmdp: eval: give --tasks NAME[,NAME...] (tasks or groups) or --task NAME=PATH"),
    (["--tasks", "x", "--limit", "0"], "wmdp: --limit is 0, expected a positive number"),
    (["--tasks", "x", "--limit", "-3"], "wmdp: --limit is -3, expected a positive number"),
    (["--tasks", "x", "--max-length", "0"], "wmdp: --max-length is 0, expected a positive"),
    (["--tasks", "x", "--batch-size", "0"], "wmdp: --batch-size is '0', expected a positive"),
    (["--tasks", "sandbox_froget"], "wmdp: unknown task 'sandbox_froget'; did you mean "
                                    "'sandbox_forget'"),
    (["--tasks", "wmdp_boi"], "wmdp: unknown task 'wmdp_boi'; did you mean 'wmdp_bio'"),
])
def test_bad_eval_arguments_are_one_line(llama_mistral_tok, tmp_path, capsys, argv, message):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("sandbox_bio", "sandbox_cyber"):
        write_mcq_jsonl(d / f"{name}.jsonl", 3)
    (d / "tasks.json").write_text(json.dumps({
        "tasks": {n: {"file": f"{n}.jsonl"} for n in ("sandbox_bio", "sandbox_cyber")},
        "groups": {"sandbox_forget": ["sandbox_bio", "sandbox_cyber"]}}))
    out = tmp_path / "o"
    code, last = _eval_cli(capsys, "--model", str(llama_mistral_tok), "--data-dir", str(d),
                           "--output", str(out), *argv)
    assert code == 2 and last.startswith(message), last
    if "unknown task" in message:  # the data dir's names are listed, not only the built-ins
        assert "; the data dir and --task give: sandbox_forget, sandbox_bio, sandbox_cyber " \
               "(built in: wmdp," in last
    assert not out.exists()

"""Perplexity: rolling windows against lm-eval's, log-likelihoods against a naive reference and
lm-eval's own `loglikelihood_rolling`, and perplexity tasks in `wmdp eval`."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from wmdp.cli import main
from wmdp.evaluate import EvalConfig, evaluate_model, format_table, results_summary, run_eval
from wmdp.models import load_model
from wmdp.perplexity import rolling_windows, score_texts
from wmdp.tasks import Registry

WORDS = "the cat sat on a mat while quiet rivers ran past old stone walls at dusk".split()


def make_texts(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, max_words)))
            for _ in range(n)]


def write_corpus(path, texts: list[str]):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def naive_rolling_loglikelihood(model, tok, text: str, max_length: int,
                                add_special_tokens: bool | None = None,
                                prefix: int | None = None) -> float:
    """Each token's log-probability by direct forward passes, following lm-eval's window rule:
    tokens 0..L-1 are predicted in one pass from [prefix] + tokens[:L-1]; after that, each block
    of up to L tokens ending at `end` is predicted in one pass over the L tokens before `end`.
    `prefix`: default current lm-eval's `prefix_token_id` (BOS, else EOS)."""
    ids = tok.encode(text) if add_special_tokens is None else \
        tok.encode(text, add_special_tokens=add_special_tokens)
    if prefix is None:
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total, done = 0.0, 0
    while done < len(ids):
        if done == 0:
            n = min(max_length, len(ids))
            inp, first_pos = [prefix] + ids[:n - 1], 0
        else:
            n = min(max_length, len(ids) - done)
            inp = ids[done + n - max_length - 1:done + n - 1]
            first_pos = len(inp) - n
        with torch.no_grad():
            logp = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
        total += sum(float(logp[first_pos + k, ids[done + k]]) for k in range(n))
        done += n
    return total


def test_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for max_length in (1, 2, 3, 7):
        for n in range(0, 25):
            tokens = list(range(100, 100 + n))
            ref = [tuple(map(list, make_disjoint_window(w)))
                   for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
            assert rolling_windows(tokens, 7, max_length) == ref, (max_length, n)


@pytest.mark.parametrize("fixture", ["llama_mistral_tok", "gpt2_tiny"])
def test_rolling_loglikelihood_matches_naive_reference(request, fixture):
    model, tok = load_model(request.getfixturevalue(fixture), dtype="float32", device="cpu")
    texts = make_texts(5, seed=1)
    max_length = 16
    assert max(len(tok.encode(t)) for t in texts) > 3 * max_length  # several windows
    metrics, samples = score_texts(model, tok, texts, max_length=max_length, batch_size=3,
                                   progress=False)
    ref = [naive_rolling_loglikelihood(model, tok, t, max_length) for t in texts]
    assert [s["loglikelihood"] for s in samples] == pytest.approx(ref, abs=1e-3)
    assert [s["tokens"] for s in samples] == [len(tok.encode(t)) for t in texts]
    assert [s["windows"] for s in samples] == [math.ceil(len(tok.encode(t)) / max_length)
                                               for t in texts]
    # corpus metrics by hand, lm-eval's definitions
    ll = sum(ref)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert metrics["token_perplexity"] == pytest.approx(
        math.exp(-ll / sum(s["tokens"] for s in samples)), rel=1e-4)
    # one window longer than every text: a single pass per text, still the same arithmetic
    _, whole = score_texts(model, tok, texts, max_length=512, batch_size=8, progress=False)
    assert [s["loglikelihood"] for s in whole] == pytest.approx(
        [naive_rolling_loglikelihood(model, tok, t, 512) for t in texts], abs=1e-3)


@pytest.mark.parametrize("fixture", ["llama_mistral_tok", "gpt2_tiny"])
def test_same_loglikelihoods_as_lm_eval(request, fixture):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model(request.getfixturevalue(fixture), dtype="float32", device="cpu")
    texts = make_texts(6, seed=2)
    _, ours = score_texts(model, tok, texts, max_length=16, batch_size=5, progress=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=16)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
            for i, t in enumerate(texts)]
    ref = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert [s["loglikelihood"] for s in ours] == pytest.approx(ref, abs=1e-3)


def test_prompt_style_042_adds_no_bos_and_predicts_from_eos(llama_mistral_tok, tmp_path):
    """lm-eval 0.4.2's `loglikelihood_rolling`: tokens encoded without special tokens, the first
    predicted from `eot_token_id` (the tokenizer's EOS), not from BOS as lm-eval does now."""
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    assert tok.bos_token_id != tok.eos_token_id  # Mistral's: <s> 1, </s> 2
    texts = make_texts(3, seed=3)
    _, now = score_texts(model, tok, texts, max_length=16, progress=False)
    _, old = score_texts(model, tok, texts, max_length=16, add_special_tokens=False,
                         prefix="eos", progress=False)
    assert [a["tokens"] - b["tokens"] for a, b in zip(now, old)] == [1, 1, 1]  # BOS
    eos_ref = [naive_rolling_loglikelihood(model, tok, t, 16, add_special_tokens=False,
                                           prefix=tok.eos_token_id) for t in texts]
    bos_ref = [naive_rolling_loglikelihood(model, tok, t, 16, add_special_tokens=False,
                                           prefix=tok.bos_token_id) for t in texts]
    assert [s["loglikelihood"] for s in old] == pytest.approx(eos_ref, abs=1e-3)
    assert all(abs(e - b) > 1e-2 for e, b in zip(eos_ref, bos_ref))  # the prefix matters here
    # `wmdp eval --prompt-style lmeval-0.4.2` on a perplexity task takes that path
    corpus = write_corpus(tmp_path / "c.jsonl", texts)
    reg = Registry.build(task_files={"ppl_c": str(corpus)})
    for style, ref, prefix in (("lmeval-0.4.2", eos_ref, tok.eos_token_id),
                               ("lmeval", [s["loglikelihood"] for s in now], tok.bos_token_id)):
        res = evaluate_model(model, tok, ["ppl_c"], reg, progress=False,
                             config=EvalConfig(prompt_style=style, max_length=16))
        assert [s["loglikelihood"] for s in res["samples"]["ppl_c"]] == pytest.approx(ref, abs=1e-3)
        assert res["results"]["ppl_c"]["prefix_token_id"] == prefix


@pytest.mark.parametrize("max_length", [0, -5])
def test_nonpositive_max_length_is_an_error_not_a_hang(llama_mistral_tok, tmp_path, max_length):
    from wmdp.errors import WmdpError

    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    with pytest.raises(WmdpError, match=f"max length is {max_length}, expected a positive"):
        rolling_windows([1, 2, 3], 7, max_length)
    with pytest.raises(WmdpError, match=f"max length is {max_length}"):
        score_texts(model, tok, ["a b c"], max_length=max_length, progress=False)
    corpus = write_corpus(tmp_path / "c.jsonl", ["a b c"])
    out = tmp_path / "o"
    code = main(["eval", "--model", str(llama_mistral_tok), "--task", f"ppl_c={corpus}",
                 "--output", str(out), "--max-length", str(max_length)])
    assert code == 2 and not out.exists()


def test_nonfinite_loglikelihoods_are_refused(llama_mistral_tok, tmp_path, capsys):
    """A model with NaN weights must not yield a perplexity (or an accuracy) that looks real."""
    import shutil

    bad = tmp_path / "nan-model"
    shutil.copytree(llama_mistral_tok, bad)
    model, tok = load_model(bad, dtype="float32", device="cpu")
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(bad)
    corpus = write_corpus(tmp_path / "c.jsonl", make_texts(2, seed=9))
    out = tmp_path / "o"
    code = main(["eval", "--model", str(bad), "--task", f"ppl_c={corpus}", "--output", str(out),
                 "--max-length", "16"])
    _, err = capsys.readouterr()
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after progress bars
    assert code == 2 and last.startswith("wmdp: task ppl_c: 2 of 2 texts have non-finite "
                                         "log-likelihoods")
    assert not (out / "results.json").exists() and not list(out.glob("samples_*"))


def test_perplexity_tasks_in_eval(llama_mistral_tok, tmp_path, monkeypatch):
    from wmdp import evaluate as ev

    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data / "retain.jsonl", make_texts(7, seed=4))
    write_corpus(data / "forget.jsonl", make_texts(5, seed=5))
    (data / "tasks.json").write_text(json.dumps({
        "tasks": {"ppl_retain": {"file": "retain.jsonl", "kind": "perplexity"},
                  "ppl_forget": {"file": "forget.jsonl", "kind": "perplexity"}},
        "groups": {"ppl_both": ["ppl_retain", "ppl_forget"]}}))
    cfg = EvalConfig(model=str(llama_mistral_tok), dtype="float32", device="cpu",
                     data_dir=str(data), max_length=16, batch_size=4)
    out = tmp_path / "out"
    res = run_eval(cfg, ["ppl_both", f"ppl:{data / 'retain.jsonl'}"], out, progress=False)
    r = res["results"]["ppl_retain"]
    assert r["kind"] == "perplexity" and r["n"] == 7 and r["max_length"] == 16
    assert set(r) >= {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity",
                      "loglikelihood", "tokens", "words", "bytes"}
    # the same file under another name: the same numbers
    same = res["results"][f"ppl:{data / 'retain.jsonl'}"]
    assert same["word_perplexity"] == pytest.approx(r["word_perplexity"], rel=1e-9)
    # a group pools the corpus totals (not a mean of perplexities)
    g, f = res["groups"]["ppl_both"], res["results"]["ppl_forget"]
    ll, words = r["loglikelihood"] + f["loglikelihood"], r["words"] + f["words"]
    assert g["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-9)
    assert g["n"] == 12
    # per-text samples, a filesystem-safe name for the `ppl:` task
    lines = (out / "samples_ppl_retain.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert set(json.loads(lines[0])) == {"doc_id", "loglikelihood", "tokens", "words", "bytes",
                                         "windows"}
    assert len(list(out.glob("samples_ppl__*retain_jsonl.jsonl"))) == 1
    assert res["sources"]["ppl_retain"]["source"].endswith("retain.jsonl")
    table = format_table(res)
    assert "| ppl_retain | 7 |" in table and "word_perplexity" in table and "| acc |" not in table
    assert results_summary(res, "word_perplexity")["ppl_both"] == g["word_perplexity"]
    assert results_summary(res) == {}
    # resume: nothing is scored again
    monkeypatch.setattr(ev, "score_perplexity_task", lambda *a, **k: pytest.fail("rescored"))
    again = run_eval(cfg, ["ppl_both", f"ppl:{data / 'retain.jsonl'}"], out, progress=False)
    assert again["results"] == res["results"]
    monkeypatch.undo()
    # in memory, with texts given directly
    mem = evaluate_model(model, tok, ["ppl_retain"], Registry.build(data_dir=data),
                         config=EvalConfig(max_length=16), progress=False,
                         items={"ppl_retain": make_texts(7, seed=4)})
    assert mem["results"]["ppl_retain"]["loglikelihood"] == pytest.approx(r["loglikelihood"])


def test_mcq_and_perplexity_together_on_the_cli(capsys, llama_mistral_tok, mcq_file, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", make_texts(4, seed=6))
    code = main(["eval", "--model", str(llama_mistral_tok), "--task", f"mine={mcq_file}",
                 "--task", f"ppl_mine={corpus}", "--tasks", "mine,ppl_mine", "--output",
                 str(tmp_path / "o"), "--dtype", "float32", "--limit", "3", "--max-length", "32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["results"]["mine"]["n"] == 3 and res["results"]["ppl_mine"]["n"] == 3
    assert res["config"]["max_length"] == 32
    assert "| mine | 3 |" in out and "| ppl_mine | 3 |" in out


@pytest.mark.parametrize("manifest,expected", [
    ({"x": {"kind": "perplexity"}}, 'give one of field "file" or field "corpus"'),
    ({"x": {"kind": "ppl", "file": "c.jsonl"}}, 'field "kind" is \'ppl\''),
    ({"x": {"kind": "perplexity", "file": "c.jsonl", "format": "cloze"}},
     'field "format" does not apply'),
    ({"x": {"corpus": "wikitext"}}, 'field "corpus" is for kind "perplexity"'),
])
def test_manifest_errors(tmp_path, manifest, expected):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": manifest}))
    with pytest.raises(Exception) as e:
        Registry.build(data_dir=tmp_path)
    assert expected in str(e.value) and str(e.value).startswith(str(tmp_path / "tasks.json"))


def test_bad_corpus_is_one_line_exit_2(capsys, llama_mistral_tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    code = main(["eval", "--model", str(llama_mistral_tok), "--tasks", f"ppl:{bad}",
                 "--output", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and err == f'wmdp: {bad} line 2: field "text" is missing\n'
    code = main(["eval", "--model", str(llama_mistral_tok), "--tasks", "ppl:",
                 "--output", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "name a corpus after 'ppl:'" in err


WIKI = (' = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor '
        '. He had a guest @-@ starring role in 2000 , and scored 1 @,@ 000 @.@ 5 points ( "The '
        'Bill" ) [ see ] { x } \' quoted \' ; then : more ! and ? = = Career = = \n')


def test_wikitext_detokenizer_is_lm_evals():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as theirs

    from wmdp.perplexity import wikitext_detokenizer

    for text in (WIKI, WIKI * 3, " N = = = = x = = = = 's s ' 10 ° C \n "):
        assert wikitext_detokenizer(text) == theirs({"page": text})


def test_wikitext_task_scores_detokenized_text_counts_original(tmp_path):
    import json as _json

    from wmdp.evaluate import evaluate_model
    from wmdp.models import load_model
    from wmdp.perplexity import wikitext_detokenizer
    from wmdp.tasks import Registry, Task

    from conftest import MISTRAL_TOK, save_tiny_model

    model, tok = load_model(save_tiny_model(tmp_path / "m", "llama", MISTRAL_TOK), device="cpu")
    pages = [WIKI, WIKI.upper()]
    f = tmp_path / "pages.jsonl"
    f.write_text("".join(_json.dumps({"text": p}) + "\n" for p in pages))
    reg = Registry.build()
    reg.tasks["wt"] = Task("wt", "wikitext", path=f, kind="perplexity", detokenizer="wikitext")
    reg.tasks["plain"] = Task("plain", "x", kind="perplexity",
                              path=_write(tmp_path / "d.jsonl", [wikitext_detokenizer(p) for p in pages]))
    res = evaluate_model(model, tok, ["wt", "plain"], reg, progress=False)["results"]
    assert res["wt"]["loglikelihood"] == pytest.approx(res["plain"]["loglikelihood"], abs=1e-4)
    assert res["wt"]["words"] == sum(len(re.split(r"\s+", p)) for p in pages)
    assert res["wt"]["bytes"] == sum(len(p.encode()) for p in pages)
    assert res["plain"]["bytes"] < res["wt"]["bytes"]
    assert Registry.build().tasks["wikitext"].text_field == "page"


def _write(path, texts):
    import json as _json

    path.write_text("".join(_json.dumps({"text": t}) + "\n" for t in texts))
    return path

"""The baselines (ga, graddiff, npo, llmu, scrub, ssd): each loss against a naive reference made
of plain unpadded forward passes and the paper's formula, SSD's rule against importances computed
here, every method end to end through the CLI, resume, and `wmdp compare`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MISTRAL_TOK, char_tokenizer, save_tiny_model
from wmdp.data.corpus import Corpus
from wmdp.unlearn.batches import TopicBatches, training_tokenizer
from wmdp.unlearn.ga import GAConfig, GradientAscent
from wmdp.unlearn.graddiff import GradDiff, GradDiffConfig
from wmdp.unlearn.llmu import LLMU, LLMUConfig
from wmdp.unlearn.lm import mean_nll, sequence_logprob
from wmdp.unlearn.loop import unlearn_model
from wmdp.unlearn.npo import NPO, NPOConfig
from wmdp.unlearn.scrub import SCRUB, SCRUBConfig
from wmdp.unlearn.ssd import SSD, SSDConfig

METHODS = ["ga", "graddiff", "npo", "llmu", "scrub", "ssd"]
FORGET_WORDS = "abed bead cafe dace face fade faced decaf beef caged".split()  # letters a-g
RETAIN_WORDS = "milk sorry storm limp posit lumps trims snort".split()         # other letters
MAXLEN = 48


def texts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 7))) for _ in range(n)]


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A 2-layer Llama over a byte-level tokenizer with no merges (257 tokens: fast)."""
    return save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama",
                           tokenizer=char_tokenizer(), layers=2, hidden=32)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(path)


def _schedule(batch_size=3, steps=2, n=6):
    forget = Corpus("f", texts(FORGET_WORDS, n, 1), "t")
    retain = Corpus("r", texts(RETAIN_WORDS, n, 2), "t")
    return TopicBatches([forget], [retain], batch_size, steps)


def _perturb(model, seed=0, scale=0.05):
    """Stand-in for training so far: the model differs from the original."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- the naive reference: one text at a time, no padding, plain forwards ----------------------
def _ids(tok, text, max_length=MAXLEN):
    return tok(text, truncation=True, max_length=max_length)["input_ids"]


def _logits(model, ids):
    return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _logps(model, ids):
    """log p of each next token of one unpadded text: (T-1,)."""
    lp = torch.log_softmax(_logits(model, ids)[:-1], -1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _nll(model, tok, batch):
    return -torch.cat([_logps(model, _ids(tok, t)) for t in batch]).mean()


def _kl(teacher, student, tok, batch, temperature=1.0):
    """Mean over every real position of KL(teacher || student) at `temperature`, times T^2."""
    total, count = 0.0, 0
    for t in batch:
        ids = _ids(tok, t)
        p = torch.log_softmax(_logits(teacher, ids)[:-1] / temperature, -1)
        q = torch.log_softmax(_logits(student, ids)[:-1] / temperature, -1)
        total = total + (p.exp() * (p - q)).sum()
        count += len(ids) - 1
    return total / count * temperature ** 2


def _setup(method, path, schedule, perturb=False):
    model, tok = _load(path)
    method.setup(model, tok, schedule, seed=7)
    if perturb:
        _perturb(model)
    return model, training_tokenizer(tok)


# -- shared helpers -------------------------------------------------------------------------------
def test_token_losses_ignore_padding(char_model):
    model, tok = _load(char_model)
    t = training_tokenizer(tok)
    batch = texts(FORGET_WORDS, 4, 3)
    inputs = t(batch, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # left padding is really there
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = torch.stack([_logps(model, _ids(t, x)).sum() for x in batch])
        assert torch.allclose(sequence_logprob(logits, inputs), expected, rtol=1e-5, atol=1e-4)
        assert mean_nll(logits, inputs).item() == pytest.approx(_nll(model, t, batch).item(),
                                                                rel=1e-5)


# -- each loss against its formula ----------------------------------------------------------------
def test_ga_loss(char_model):
    ga = GradientAscent(GAConfig(max_length=MAXLEN))
    s = _schedule()
    model, tok = _setup(ga, char_model, s)
    loss, m = ga.loss(s[0])
    with torch.no_grad():
        expected = -_nll(model, tok, s[0].forget)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["forget_nll"] == pytest.approx(-expected.item(), rel=1e-5)


def test_graddiff_loss(char_model):
    gd = GradDiff(GradDiffConfig(forget_weight=0.7, retain_weight=1.3, max_length=MAXLEN))
    s = _schedule()
    model, tok = _setup(gd, char_model, s)
    loss, m = gd.loss(s[1])
    with torch.no_grad():
        expected = -0.7 * _nll(model, tok, s[1].forget) + 1.3 * _nll(model, tok, s[1].retain)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["forget_loss"] + m["retain_loss"] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("retain_weight", [0.0, 2.0])
def test_npo_loss_uses_the_original_models_likelihoods(char_model, retain_weight):
    npo = NPO(NPOConfig(beta=0.5, retain_weight=retain_weight, max_length=MAXLEN))
    s = _schedule()
    model, tok = _setup(npo, char_model, s, perturb=True)  # precomputed, then "trained"
    reference, _ = _load(char_model)
    loss, m = npo.loss(s[1])
    with torch.no_grad():
        ratio = torch.stack([_logps(model, _ids(tok, x)).sum()
                             - _logps(reference, _ids(tok, x)).sum() for x in s[1].forget])
        forget_loss = -(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * ratio).mean()
        expected = forget_loss + retain_weight * _nll(model, tok, s[1].retain)
    assert ratio.abs().min() > 1e-3  # the perturbation moved every text's likelihood
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["forget_loss"] == pytest.approx(forget_loss.item(), rel=1e-5)
    assert ("retain_loss" in m) == (retain_weight > 0)


def test_llmu_loss(char_model):
    cfg = LLMUConfig(forget_weight=0.5, random_weight=1.5, kl_weight=2.0, prompt_length=12,
                     completion_length=9, max_length=MAXLEN)
    llmu = LLMU(cfg)
    s = _schedule()
    model, tok = _setup(llmu, char_model, s, perturb=True)
    original, _ = _load(char_model)
    step = s[1]
    completions = llmu.completions(step)
    assert sorted(completions) == sorted(step.retain)   # a permutation of the retain batch
    assert completions == llmu.completions(step)        # a function of seed and step: resumable
    loss, m = llmu.loss(step)
    with torch.no_grad():
        random_lp = []
        for prompt, completion in zip(step.forget, completions):
            p = _ids(tok, prompt, 12)
            c = tok(" " + completion, add_special_tokens=False, truncation=True,
                    max_length=9)["input_ids"]
            random_lp.append(_logps(model, p + c)[len(p) - 1:])  # completion tokens only
        random_nll = -torch.cat(random_lp).mean()
        expected = (-0.5 * _nll(model, tok, step.forget) + 1.5 * random_nll
                    + 2.0 * _kl(original, model, tok, step.retain))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["random_nll"] == pytest.approx(random_nll.item(), rel=1e-5)
    assert m["retain_kl"] > 0


def test_scrub_max_then_min_step_against_two_plain_models(char_model):
    cfg = SCRUBConfig(alpha=0.3, gamma=0.8, temperature=2.0, lr=1e-3, max_length=MAXLEN)
    scrub = SCRUB(cfg)
    s = _schedule()
    model, tok = _setup(scrub, char_model, s, perturb=True)
    scrub.make_optimizer()
    loss, m = scrub.loss(s[0])

    teacher, _ = _load(char_model)
    student, _ = _load(char_model)
    _perturb(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    max_loss = -_kl(teacher, student, tok, s[0].forget, 2.0)
    max_loss.backward()
    opt.step()
    with torch.no_grad():
        min_loss = 0.3 * _kl(teacher, student, tok, s[0].retain, 2.0) + \
            0.8 * _nll(student, tok, s[0].retain)
        for (n, a), b in zip(model.named_parameters(), student.parameters()):
            assert torch.allclose(a, b, atol=1e-6), n  # the same max step was taken
    assert m["max_loss"] == pytest.approx(max_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(min_loss.item(), rel=1e-4)


def test_scrub_takes_no_max_step_after_max_steps(char_model):
    scrub = SCRUB(SCRUBConfig(max_steps=1, max_length=MAXLEN))
    s = _schedule()
    model, _ = _setup(scrub, char_model, s, perturb=True)
    scrub.make_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    _, m = scrub.loss(s[1])
    assert "max_loss" not in m
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- SSD ------------------------------------------------------------------------------------------
def _importance(model, tok, batches):
    """Mean over batches of the squared gradient of the batch's token-mean NLL."""
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        _nll(model, tok, batch).backward()
        for n, p in model.named_parameters():
            imp[n] += p.grad ** 2
    return {n: v / len(batches) for n, v in imp.items()}


@pytest.mark.parametrize("alpha,dampening,original", [(10.0, 1.0, "retain"), (2.0, 0.5, "retain"),
                                                       (1.5, 1.0, "full")])
def test_ssd_dampens_exactly_the_selected_parameters(char_model, alpha, dampening, original):
    s = _schedule(batch_size=3, steps=2)
    model, tok = _load(char_model)
    history = unlearn_model(SSD(SSDConfig(alpha=alpha, dampening=dampening, max_length=MAXLEN,
                                          original=original)), model, tok, s, progress=False)
    ref, _ = _load(char_model)
    t = training_tokenizer(tok)
    forget = [s[i].forget for i in range(len(s))]
    f = _importance(ref, t, forget)
    r = _importance(ref, t, [s[i].retain for i in range(len(s))]
                    + (forget if original == "full" else []))
    selected = 0
    for n, new in model.named_parameters():
        old = dict(ref.named_parameters())[n].detach()
        rule = f[n] > alpha * r[n]
        near = (f[n] - alpha * r[n]).abs() <= 1e-4 * f[n].abs().clamp(min=1e-30)  # float ties
        factor = torch.where(rule, (dampening * r[n] / f[n]).clamp(max=1.0), torch.ones_like(f[n]))
        sure = ~near
        assert torch.equal(new.detach()[sure & ~rule], old[sure & ~rule]), n  # untouched
        assert torch.allclose(new.detach()[sure & rule], (old * factor)[sure & rule],
                              rtol=1e-4, atol=1e-7), n
        selected += int(rule.sum())
    assert 0 < selected < sum(p.numel() for p in model.parameters())
    assert history[0]["selected"] == pytest.approx(selected, rel=1e-3)


def test_ssd_changes_only_the_chosen_tensors(char_model):
    s = _schedule()
    model, tok = _load(char_model)
    unlearn_model(SSD(SSDConfig(alpha=1.0, params="mlp_out", layer_ids=[1], max_length=MAXLEN)),
                  model, tok, s, progress=False)
    ref, _ = _load(char_model)
    changed = [n for (n, a), b in zip(model.named_parameters(), ref.parameters())
               if not torch.equal(a, b)]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


# -- end to end through the CLI -------------------------------------------------------------------
def _corpora(tmp_path) -> dict[str, str]:
    files = {}
    for name, words, seed in (("forget_a", FORGET_WORDS, 1), ("forget_b", FORGET_WORDS, 2),
                              ("retain", RETAIN_WORDS, 3)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts(words, 16, seed)))
        files[name] = str(p)
    return files


def _run(method, model, out, files, *extra):
    from wmdp.cli import main

    return main(["unlearn", method, "--model", str(model), "--output", str(out),
                 "--forget-corpora", f"{files['forget_a']},{files['forget_b']}",
                 "--retain-corpora", f"{files['retain']},{files['retain']}",
                 "--batch-size", "4", "--max-num-batches", "4", "--max-length", str(MAXLEN),
                 "--dtype", "float32", "--device", "cpu", *extra])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_cli_writes_a_loadable_unlearned_model(tmp_path, char_model, method):
    from wmdp.models import load_model

    files = _corpora(tmp_path)
    extra = ["--lr", "1e-3"] if method != "ssd" else ["--alpha", "2"]
    assert _run(method, char_model, tmp_path / "out", files, *extra) == 0
    model, tok = load_model(tmp_path / "out", device="cpu")
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    assert record["method"] == method and record["num_steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ([0] if method == "ssd" else [0, 1, 2, 3])
    before, after = _weights(char_model), _weights(tmp_path / "out")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_trains_only_the_tensors_asked_for(tmp_path, char_model):
    files = _corpora(tmp_path)
    assert _run("graddiff", char_model, tmp_path / "out", files, "--lr", "1e-3",
                "--params", "layers", "--layer-ids", "1") == 0
    before, after = _weights(char_model), _weights(tmp_path / "out")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    assert sorted(record["trained_tensors"]) == sorted(k for k in before
                                                       if k.startswith("model.layers.1."))


@pytest.mark.parametrize("method", ["scrub", "npo"])
def test_resume_after_interruption_gives_the_same_model(tmp_path, char_model, monkeypatch,
                                                        method):
    files = _corpora(tmp_path)
    cls = {"scrub": SCRUB, "npo": NPO}[method]
    args = ("--lr", "1e-3", "--set", "checkpoint_every=2")
    assert _run(method, char_model, tmp_path / "whole", files, *args) == 0
    real = cls.loss

    def interrupted(self, step):
        if step.idx == 3:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(cls, "loss", interrupted)
    assert _run(method, char_model, tmp_path / "resumed", files, *args) == 130
    monkeypatch.setattr(cls, "loss", real)
    assert _run(method, char_model, tmp_path / "resumed", files, *args) == 0
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mistral_tokenizer_random_completions(tmp_path):
    """LLMU's prompt+completion pairs with a SentencePiece tokenizer that adds BOS."""
    from wmdp.unlearn.llmu import random_pairs

    tok = training_tokenizer(AutoTokenizer.from_pretrained(MISTRAL_TOK))
    inputs, targets = random_pairs(tok, ["a forget text here", "short"], ["retain one", "two"],
                                   4, 3, "cpu")
    ids = inputs["input_ids"]
    assert ids.shape[1] == targets.shape[1] + 1
    for row, (p, c) in enumerate([("a forget text here", "retain one"), ("short", "two")]):
        pi = tok(p, truncation=True, max_length=4)["input_ids"]
        ci = tok(" " + c, add_special_tokens=False, truncation=True, max_length=3)["input_ids"]
        assert pi[0] == tok.bos_token_id
        assert ids[row, -len(pi + ci):].tolist() == pi + ci
        assert targets[row].sum().item() == len(ci)


def test_bad_settings_fail_with_a_message(tmp_path, char_model, capsys):
    files = _corpora(tmp_path)
    assert _run("ga", char_model, tmp_path / "a", files, "--params", "some") == 2
    assert "params 'some' is not one of mlp_out, mlp, layers, all" in capsys.readouterr().err
    assert _run("ga", char_model, tmp_path / "b", files, "--layer-ids", "1") == 2
    assert "use params=layers" in capsys.readouterr().err
    assert _run("ssd", char_model, tmp_path / "c", files, "--original", "both") == 2
    assert "original 'both' is not 'retain' or 'full'" in capsys.readouterr().err
    assert _run("scrub", char_model, tmp_path / "d", files, "--temperature", "nan") == 2
    assert "step 0: max-step loss is nan" in capsys.readouterr().err
    assert not (tmp_path / "d" / "config.json").exists()


# -- wmdp compare ---------------------------------------------------------------------------------
def _results(accs: dict[str, float], ppl: float | None = None, model: str = "m") -> dict:
    """A results.json: sandbox tasks, their groups, and optionally a perplexity task."""
    n = {"sandbox_bio": 50, "sandbox_cyber": 30, "sandbox_botany": 40, "sandbox_software": 60}
    results = {t: {"acc": a, "acc_stderr": 0.01, "n": n[t], "format": "cloze"}
               for t, a in accs.items()}
    groups = {}
    for g, members in (("sandbox_forget", ["sandbox_bio", "sandbox_cyber"]),
                       ("sandbox_general", ["sandbox_botany", "sandbox_software"])):
        size = sum(n[m] for m in members)
        groups[g] = {"acc": sum(accs[m] * n[m] for m in members) / size, "acc_stderr": 0.01,
                     "n": size, "members": members}
    if ppl is not None:
        results["ppl:retain.jsonl"] = {"word_perplexity": ppl, "byte_perplexity": 1.5,
                                       "bits_per_byte": 0.58, "token_perplexity": 3.1,
                                       "n": 20, "kind": "perplexity"}
    return {"results": results, "groups": groups, "config": {"model": model},
            "fingerprint": f"fp-{model}"}


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def two_runs(tmp_path):
    base = {"sandbox_bio": 0.8, "sandbox_cyber": 0.7, "sandbox_botany": 0.9,
            "sandbox_software": 0.6}
    # a pipeline run directory
    run = tmp_path / "run-ga"
    _write(run / "eval_base" / "results.json", _results(base, 12.5, "sandbox/model"))
    _write(run / "eval_unlearned" / "results.json", _results(
        {"sandbox_bio": 0.3, "sandbox_cyber": 0.25, "sandbox_botany": 0.85,
         "sandbox_software": 0.55}, 14.75, str(run / "unlearned")))
    _write(run / "chat_base" / "chat_results.json", {"score": 7.33})
    _write(run / "chat_unlearned" / "chat_results.json", {"score": 5.5})
    _write(run / "unlearned" / "unlearn_config.json",
           {"method": "ga", "hparams": {"lr": 1e-4, "max_length": 512, "params": "all",
                                        "layer_ids": []}})
    # an eval output dir whose model directory holds the unlearning record
    model_dir = tmp_path / "npo-model"
    _write(model_dir / "unlearn_config.json",
           {"method": "npo", "hparams": {"beta": 0.5, "retain_weight": 1.0, "lr": 1e-5,
                                         "max_length": 512, "params": "all", "layer_ids": []}})
    _write(tmp_path / "npo-eval" / "results.json", _results(
        {"sandbox_bio": 0.45, "sandbox_cyber": 0.5, "sandbox_botany": 0.875,
         "sandbox_software": 0.625}, 13.0, str(model_dir)))
    return [run, tmp_path / "npo-eval"]


def _cells(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_compare_table_has_every_number_and_the_plot(tmp_path, two_runs):
    from wmdp.compare import run_compare

    table = run_compare(two_runs, output=tmp_path / "cmp")
    cols = table["columns"]
    assert cols["forget"] == ["sandbox_forget", "sandbox_bio", "sandbox_cyber"]
    assert cols["general"] == ["sandbox_general", "sandbox_botany", "sandbox_software"]
    assert cols["perplexity"] == ["ppl:retain.jsonl"]
    cells = _cells(table["markdown"])
    header, body = cells[0], cells[1:]
    assert [r[:3] for r in body] == [["base", "base", ""], ["run-ga", "ga", "lr=0.0001"],
                                     ["npo-eval", "npo", "beta=0.5"]]
    sources = [two_runs[0] / "eval_base", two_runs[0] / "eval_unlearned", two_runs[1]]
    for row, src in zip(body, sources):
        results = json.loads((src / "results.json").read_text())
        entries = {**results["results"], **results["groups"]}
        for name in cols["forget"] + cols["general"]:
            assert row[header.index(name)] == f"{100 * entries[name]['acc']:.1f}", name
        ppl = entries["ppl:retain.jsonl"]["word_perplexity"]
        assert row[header.index("ppl:retain.jsonl (word_perplexity)")] == f"{ppl:.2f}"
    assert [r[header.index("chat score")] for r in body] == ["7.33", "5.50", ""]
    ga = table["rows"][1]
    assert ga["forget_acc"] == pytest.approx((0.3 * 50 + 0.25 * 30) / 80)
    assert ga["general_acc"] == pytest.approx((0.85 * 40 + 0.55 * 60) / 100)
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == table["markdown"]
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"][2]["values"]["sandbox_bio"]["value"] == 0.45


def test_compare_cli_and_its_errors(tmp_path, two_runs, capsys):
    from wmdp.cli import main

    assert main(["compare", *map(str, two_runs), "--tasks", "sandbox_bio,sandbox_general"]) == 0
    out = capsys.readouterr().out
    assert "| run | method | settings | sandbox_bio | sandbox_general |" in out
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no results found" in capsys.readouterr().err
    assert main(["compare", str(two_runs[1]), "--tasks", "mmlu"]) == 2
    assert "--tasks: 'mmlu' is in no run's results" in capsys.readouterr().err


def test_every_preset_resolves():
    from wmdp.unlearn import resolve
    from wmdp.unlearn.registry import METHODS

    for name in ("ga", "graddiff", "npo", "llmu", "scrub", "ssd"):
        cls, hp_cls, presets, _ = METHODS[name]
        assert set(presets) == {"zephyr-7b", "sandbox"}
        for preset in presets:
            method, hparams, config = resolve(name, preset=preset)
            assert isinstance(method, cls) and isinstance(hparams, hp_cls)
        assert resolve(name, preset="zephyr-7b")[2].model == "HuggingFaceH4/zephyr-7b-beta"


def test_token_loss_same_alone_or_left_padded_on_gpt2(tmp_path):
    """Learned absolute positions (GPT-2): left padding must not move a text's positions."""
    from conftest import GPT2_TOK
    from wmdp.unlearn.batches import tokenize, training_tokenizer
    from wmdp.unlearn.lm import mean_nll

    path = save_tiny_model(tmp_path / "g", "gpt2", GPT2_TOK, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = training_tokenizer(AutoTokenizer.from_pretrained(path))
    short = "the host of the microbe"
    with torch.no_grad():
        alone = tokenize(tok, [short], 64, "cpu")
        batch = tokenize(tok, [short, short + " and a much longer tail of words"], 64, "cpu")
        a = mean_nll(model(**alone).logits, alone)
        b_inputs = {k: v[:1] for k, v in batch.items()}
        b = mean_nll(model(**b_inputs).logits, b_inputs)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)

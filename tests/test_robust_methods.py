"""Unlearning methods meant to resist relearning: `rmu-lat`, `npo-sam`, `rmu-sam`, `undo`.

Each against a reference written here: the latent adversary stays in its L2 ball and lowers the
forget text's LM loss (computed with a hook and a cross-entropy written here); one SAM step's
gradient equals the two-pass gradient computed by hand; UNDO's perturbation is the linear mix
with a fresh initialisation and distillation lowers the KL to the teacher (a KL written here).
Then each method runs end to end on the small sandbox through the CLI and resumes after an
interruption to the uninterrupted run's weights. UNDO without a teacher runs RMU first into
OUTPUT/teacher (recorded; a resumed run keeps it), from `wmdp unlearn` and from `wmdp run`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_loss_at
from test_baselines import FORGET_WORDS, RETAIN_WORDS, char_model, texts  # noqa: F401
from wmdp.data.corpus import Corpus
from wmdp.unlearn.batches import TopicBatches, tokenize, training_tokenizer
from wmdp.unlearn.loop import unlearn_model
from wmdp.unlearn.registry import METHODS

SANDBOX = Path(__file__).parent / "fixtures" / "sandbox-small"
ROBUST = ["rmu-lat", "npo-sam", "rmu-sam", "undo"]


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(path)


def _schedule(batch_size=3, steps=2, n=6) -> TopicBatches:
    forget = Corpus("f", texts(FORGET_WORDS, n, 1), "t")
    retain = Corpus("r", texts(RETAIN_WORDS, n, 2), "t")
    return TopicBatches([forget], [retain], batch_size, steps)


def _naive_nll(logits, ids, mask):
    """Mean cross-entropy of every real next token (both tokens real), written out."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
    m = (mask[:, :-1] * mask[:, 1:]).double()
    return -(tok * m).sum() / m.sum()


def _hidden(o):
    return o[0] if isinstance(o, tuple) else o


def _after_block(model, inputs, i, add_after=None):
    """The residual stream after block i (a hook written here), optionally with `add_after`
    = (block, delta) added to that block's output first."""
    got, handles = {}, []
    if add_after is not None:
        j, d = add_after
        handles.append(model.model.layers[j].register_forward_hook(
            lambda m, a, o: (o[0] + d, *o[1:]) if isinstance(o, tuple) else o + d))
    handles.append(model.model.layers[i].register_forward_hook(
        lambda m, a, o: got.setdefault("h", _hidden(o))))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return got["h"]


# -- rmu-lat: the latent adversary ----------------------------------------------------------------
def test_latent_attack_stays_in_its_ball_and_lowers_the_forget_loss(char_model):  # noqa: F811
    from wmdp.unlearn.rmu_lat import latent_attack

    model, tok = _load(char_model)
    inputs = tokenize(training_tokenizer(tok), texts(FORGET_WORDS, 4, 7), 48, "cpu")
    eps = 0.5
    delta, losses = latent_attack(model, inputs, 0, eps, 5e-2, 12)
    mask = inputs["attention_mask"]
    norms = delta.norm(dim=-1)                                                  # (B, T)
    assert (norms[mask == 1] <= eps + 1e-5).all() and norms.max() > 0.9 * eps  # the bound binds
    assert (norms[mask == 0] == 0).all()                                        # padding untouched

    def nll_with(d):  # a hook written here: add d to block 0's output
        def hook(module, args, output):
            return (output[0] + d, *output[1:]) if isinstance(output, tuple) else output + d
        h = model.model.layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return _naive_nll(model(**inputs).logits, inputs["input_ids"], mask).item()
        finally:
            h.remove()

    clean, attacked = nll_with(torch.zeros_like(delta)), nll_with(delta)
    assert losses[0] == pytest.approx(clean, rel=1e-4)   # its first step starts from no delta
    assert attacked < clean - 0.05, (clean, attacked)


def test_rmu_lat_applies_the_perturbation_on_the_forget_pass_only(char_model,  # noqa: F811
                                                                    monkeypatch):
    """The step's forget loss is the MSE to the control vector of the *perturbed* activations
    (computed here with hooks), its retain loss that of the unperturbed ones."""
    from wmdp.unlearn import rmu_lat
    from wmdp.unlearn.rmu_lat import RMULAT, RMULATConfig

    model, tok = _load(char_model)
    c = RMULATConfig(layer_id=1, layer_ids=[1], adv_layer=0, steering_coeffs=[4.0], alpha=[5.0],
                     epsilon=0.5, pgd_steps=3)
    method = RMULAT(c)
    s = _schedule()
    method.setup(model, tok, s, 0)
    seen = {}
    real = rmu_lat.latent_attack

    def keep(*args, **kw):
        seen["delta"], losses = real(*args, **kw)
        return seen["delta"], losses

    monkeypatch.setattr(rmu_lat, "latent_attack", keep)
    _, metrics = method.loss(s[0])
    forget = method._encode(s[0].forget, 512)
    with torch.no_grad():
        h = _after_block(model, forget, 1, (0, seen["delta"]))
        plain = _after_block(model, forget, 1)
    expected = ((h - method.control_vecs[0]) ** 2).mean().item()
    assert metrics["forget_loss"] == pytest.approx(expected, rel=1e-5)
    assert ((plain - method.control_vecs[0]) ** 2).mean().item() != pytest.approx(expected)
    assert metrics["retain_mse"] == pytest.approx(0.0, abs=1e-10)  # nothing trained yet


# -- SAM: one step against the two-pass gradient by hand ------------------------------------------
def _hand_sam_grads(model, params, forget_loss, retain_loss, rho, gamma):
    """g_sam + gamma * g_retain, the authors' SAMTrainer written out on plain parameters."""
    g = torch.autograd.grad(forget_loss(), params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(rho * x / norm)
    g_sam = torch.autograd.grad(forget_loss(), params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    g_ret = torch.autograd.grad(retain_loss(), params) if gamma else [0] * len(params)
    return [a + gamma * b for a, b in zip(g_sam, g_ret)]


def test_npo_sam_step_equals_the_hand_computed_two_pass_gradient(char_model):  # noqa: F811
    from wmdp.unlearn.sam import NPOSAM, NPOSAMConfig

    model, tok = _load(char_model)
    ref_model = copy.deepcopy(model)
    beta, rho, gamma = 0.5, 0.3, 0.7
    method = NPOSAM(NPOSAMConfig(beta=beta, rho=rho, retain_weight=gamma, max_length=48))
    s = _schedule()
    method.setup(model, tok, s, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, metrics = method.loss(s[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # w restored
    loss.backward()

    ttok = training_tokenizer(tok)
    forget = tokenize(ttok, s[0].forget, 48, "cpu")
    retain = tokenize(ttok, s[0].retain, 48, "cpu")
    hand = copy.deepcopy(ref_model)
    params = list(hand.parameters())

    def seq_logp(m, inp):  # summed log p of each text's real next tokens
        logp = torch.log_softmax(m(**inp).logits[:, :-1].float(), -1)
        tok_lp = logp.gather(-1, inp["input_ids"][:, 1:, None])[..., 0]
        am = inp["attention_mask"]
        return (tok_lp * am[:, :-1] * am[:, 1:]).sum(-1)

    with torch.no_grad():
        ref_lp = seq_logp(ref_model, forget)

    def forget_loss():
        ratio = seq_logp(hand, forget) - ref_lp
        return -(2 / beta) * F.logsigmoid(-beta * ratio).mean()

    def retain_loss():
        return _naive_nll(hand(**retain).logits, retain["input_ids"], retain["attention_mask"])

    expected = _hand_sam_grads(hand, params, forget_loss, retain_loss, rho, gamma)
    got = [p.grad for p in model.parameters()]
    scale = max(e.abs().max() for e in expected)
    assert all(torch.allclose(a, b, atol=1e-5 * scale) for a, b in zip(got, expected))
    # and it is not the plain (unperturbed) gradient
    plain = torch.autograd.grad(forget_loss(), params)
    assert max((a - b).abs().max() for a, b in zip(expected, plain)) > 1e-3 * scale
    assert metrics["forget_loss_sam"] != pytest.approx(metrics["forget_loss"])


def test_rmu_sam_step_equals_the_hand_computed_two_pass_gradient(char_model):  # noqa: F811
    from wmdp.unlearn.sam import RMUSAM, RMUSAMConfig

    model, tok = _load(char_model)
    ref_model = copy.deepcopy(model)
    rho, alpha = 0.2, 3.0
    method = RMUSAM(RMUSAMConfig(layer_id=1, layer_ids=[0, 1], params="layers",
                                 steering_coeffs=[4.0], alpha=[alpha], rho=rho))
    s = _schedule()
    method.setup(model, tok, s, 0)
    loss, _ = method.loss(s[0])
    loss.backward()
    names = [t.name for t in method.tensors]
    got = [dict(model.named_parameters())[n].grad for n in names]

    forget = method._encode(s[0].forget, 512)
    retain = method._encode(s[0].retain, 512)
    hand = copy.deepcopy(ref_model)
    params = [dict(hand.named_parameters())[n] for n in names]
    control = method.control_vecs[0]
    with torch.no_grad():
        frozen = _after_block(ref_model, retain, 1)

    def forget_loss():
        return ((_after_block(hand, forget, 1) - control) ** 2).mean()

    def retain_loss():
        return ((_after_block(hand, retain, 1) - frozen) ** 2).mean()

    expected = _hand_sam_grads(hand, params, forget_loss, retain_loss, rho, alpha)
    scale = max(e.abs().max() for e in expected)
    assert all(torch.allclose(a, b, atol=1e-5 * scale) for a, b in zip(got, expected))


# -- UNDO -----------------------------------------------------------------------------------------
def _undo(model, tok, s, **kw):
    from wmdp.unlearn.undo import UNDO, UNDOConfig

    method = UNDO(UNDOConfig(max_length=48, **kw))
    method.setup(model, tok, s, 3)
    return method


def test_undo_perturbation_mixes_with_a_fresh_init(char_model):  # noqa: F811
    s = _schedule()
    teacher, tok = _load(char_model)
    w = dict(teacher.named_parameters())
    init = dict(_undo(_load(char_model)[0], tok, s, alpha=1.0).model.named_parameters())
    # a fresh init of the architecture: norm weights 1, matrices N(0, initializer_range)
    std = teacher.config.initializer_range
    for name, p in init.items():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - std) < 0.2 * std and not torch.equal(p, w[name]), name
    a = 0.3
    mixed = dict(_undo(_load(char_model)[0], tok, s, alpha=a).model.named_parameters())
    shrunk = dict(_undo(_load(char_model)[0], tok, s, alpha=a, beta=0.0).model.named_parameters())
    for name in w:
        assert torch.allclose(mixed[name], (1 - a) * w[name] + a * init[name], atol=1e-6), name
        assert torch.allclose(shrunk[name], (1 - a) * w[name], atol=1e-6), name


def test_undo_distillation_lowers_the_kl_to_the_teacher(char_model):  # noqa: F811
    from wmdp.unlearn.undo import UNDO, UNDOConfig

    teacher, tok = _load(char_model)
    s = TopicBatches([Corpus("f", texts(FORGET_WORDS, 6, 1), "t")],
                     [Corpus("r", texts(RETAIN_WORDS, 6, 2), "t")], 3, 2, epochs=15)
    probe = tokenize(training_tokenizer(tok), texts(RETAIN_WORDS, 6, 2), 48, "cpu")

    def kl(model):  # KL(teacher || student) over real next-token positions, written out
        with torch.no_grad():
            p = torch.log_softmax(teacher(**probe).logits[:, :-1].double(), -1)
            q = torch.log_softmax(model(**probe).logits[:, :-1].double(), -1)
        m = (probe["attention_mask"][:, :-1] * probe["attention_mask"][:, 1:]).double()
        return ((p.exp() * (p - q)).sum(-1) * m).sum().item() / m.sum().item()

    noised = kl(_undo(_load(char_model)[0], tok, s, alpha=0.5).model)  # the same seed's noise
    student, _ = _load(char_model)
    unlearn_model(UNDO(UNDOConfig(alpha=0.5, lr=1e-2, max_length=48)), student, tok, s, seed=3,
                  progress=False)
    assert noised > 0.05 and kl(student) < 0.3 * noised, (noised, kl(student))


# -- end to end on the small sandbox, with resume -------------------------------------------------
def _cli(method, model, out, data, *extra):
    from wmdp.cli import main

    return main(["unlearn", method, "--preset", "sandbox", "--model", str(model),
                 "--output", str(out),
                 "--forget-corpora", f"{data}/forget_bio.jsonl,{data}/forget_cyber.jsonl",
                 "--retain-corpora", f"{data}/retain.jsonl,{data}/retain.jsonl",
                 "--max-num-batches", "4", "--epochs", "1", "--set", "checkpoint_every=2",
                 "--dtype", "float32", "--device", "cpu", *extra])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("method", ROBUST)
def test_sandbox_preset_runs_end_to_end_and_resumes(tmp_path, monkeypatch, method):
    """`wmdp unlearn NAME --preset sandbox` on the small sandbox (UNDO's teacher: its model),
    stopped after the step-2 checkpoint, reruns steps 2 and 3 only and ends at the
    uninterrupted run's weights."""
    sandbox = tmp_path / "sandbox"
    shutil.copytree(SANDBOX / "model", sandbox / "model")
    shutil.copytree(SANDBOX / "data", sandbox / "data")
    model, data = sandbox / "model", sandbox / "data"
    teacher = ["--teacher", str(model)] if method == "undo" else []  # chaining: tested below
    assert _cli(method, model, tmp_path / "whole", data, *teacher) == 0
    cls = METHODS[method][0]
    real = cls.loss
    interrupt_loss_at(monkeypatch, cls, 3)
    assert _cli(method, model, tmp_path / "resumed", data, *teacher) == 130
    computed = []

    def recorded(self, step):
        computed.append(step.idx)
        return real(self, step)

    monkeypatch.setattr(cls, "loss", recorded)
    assert _cli(method, model, tmp_path / "resumed", data, *teacher) == 0
    assert computed == [2, 3]
    a, b, base = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed"), _weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a)
    record = json.loads((tmp_path / "whole" / "unlearn_config.json").read_text())
    assert record["method"] == method and record["num_steps"] == 4


def test_every_preset_resolves():
    from wmdp.unlearn import resolve

    for name in ROBUST:
        cls, hp_cls, presets, _ = METHODS[name]
        assert {"zephyr-7b", "sandbox"} <= set(presets)
        for preset in presets:
            method, hparams, _ = resolve(name, preset=preset)
            assert isinstance(method, cls) and isinstance(hparams, hp_cls)
    lat = resolve("rmu-lat", preset="zephyr-7b")[1]
    assert (lat.layer_id, lat.adv_layer, lat.epsilon, lat.pgd_steps) == (8, 7, 2.0, 16)


BAD = [("rmu-lat", ["--adv-layer", "2"], "rmu-lat: adv_layer 2 must be a block below layer_id 2"),
       ("rmu-lat", ["--epsilon", "0"], "rmu-lat: epsilon is 0.0, expected a positive number"),
       ("npo-sam", ["--rho", "-1"], "npo-sam: rho is -1.0, expected a number >= 0"),
       ("undo", ["--alpha", "1.5"], "undo: alpha is 1.5, expected 0 <= alpha <= 1")]


@pytest.mark.parametrize("method,flags,error", BAD)
def test_bad_settings_fail_with_one_line(tmp_path, capsys, method, flags, error):
    data = SANDBOX / "data"
    assert _cli(method, SANDBOX / "model", tmp_path / "out", data, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wmdp: ") and error in err, err
    assert not (tmp_path / "out").exists()


# -- UNDO's teacher: made first when none is given, recorded, kept on resume ----------------------
TEACHER_FLAGS = ["--teacher-overrides", "max_num_batches=2,epochs=1", "--max-num-batches", "2",
                 "--alpha", "0", "--lr", "1e-12"]  # alpha 0, lr ~0: the student is the teacher


def _close(a, b):
    return all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)


def test_undo_without_a_teacher_runs_rmu_first_and_resume_keeps_it(tmp_path, monkeypatch):
    from wmdp.unlearn.rmu import RMU
    from wmdp.unlearn.undo import UNDO

    data, out = SANDBOX / "data", tmp_path / "undo"
    interrupt_loss_at(monkeypatch, UNDO, 1)  # the teacher finished, the student stopped
    assert _cli("undo", SANDBOX / "model", out, data, *TEACHER_FLAGS) == 130
    teacher = json.loads((out / "teacher" / "unlearn_config.json").read_text())
    assert teacher["method"] == "rmu" and teacher["num_steps"] == 2
    assert teacher["hparams"]["layer_id"] == 2  # RMU's sandbox preset, as UNDO's names it
    monkeypatch.undo()
    rmu_steps = []
    real = RMU.loss
    monkeypatch.setattr(RMU, "loss", lambda self, step: rmu_steps.append(step.idx) or
                        real(self, step))
    assert _cli("undo", SANDBOX / "model", out, data, *TEACHER_FLAGS) == 0
    assert rmu_steps == []  # the finished teacher is not run again
    record = json.loads((out / "unlearn_config.json").read_text())
    t = record["method_state"]["teacher"]
    assert (t["dir"], t["given"], t["method"], t["reused"]) == (str(out / "teacher"), False,
                                                               "rmu", True)
    assert record["config"]["model"] == str(SANDBOX / "model")
    student, taught, base = _weights(out), _weights(out / "teacher"), _weights(SANDBOX / "model")
    assert _close(student, taught) and not _close(student, base)


def test_undo_with_a_given_teacher_starts_from_it(tmp_path):
    data = SANDBOX / "data"
    assert _cli("rmu", SANDBOX / "model", tmp_path / "rmu", data,
                "--max-num-batches", "2", "--epochs", "1") == 0
    out = tmp_path / "undo"
    assert _cli("undo", SANDBOX / "model", out, data, *TEACHER_FLAGS,
                "--teacher", str(tmp_path / "rmu")) == 0
    assert not (out / "teacher").exists()
    t = json.loads((out / "unlearn_config.json").read_text())["method_state"]["teacher"]
    assert t == {"dir": str(tmp_path / "rmu"), "given": True}
    assert _close(_weights(out), _weights(tmp_path / "rmu"))


def test_undo_bos_prefix_reads_every_other_text_after_bos_both_ways_over_two_passes(
        char_model):  # noqa: F811
    """With bos_prefix, the loss reads batch b of pass p with rows i + p even after BOS (so
    every text both ways over two passes), positions from 0; without it, the texts alone."""
    from wmdp.perplexity import prefix_token_id

    forget = Corpus("f", texts(FORGET_WORDS, 6, 1), "t")
    retain = Corpus("r", texts(RETAIN_WORDS, 6, 2), "t")
    s = TopicBatches([forget], [retain], 3, 2, epochs=2)  # 2 batches, 2 passes
    tok = _load(char_model)[1]
    method = _undo(_load(char_model)[0], tok, s, bos_prefix=True)
    bos = prefix_token_id(method.tokenizer)
    seen, real = [], method.distill_inputs
    method.distill_inputs = lambda batch, n: seen.append((batch, n)) or real(batch, n)
    for idx in range(len(s)):
        method.loss(s[idx])
    assert seen == [(method.batches[0], 0), (method.batches[1], 0), (method.batches[0], 1),
                    (method.batches[1], 1)]
    batch = method.batches[0]
    alone = [tokenize(method.tokenizer, [t], 48, "cpu")["input_ids"][0].tolist() for t in batch]
    assert all(ids[0] != bos for ids in alone)
    for n_pass in (0, 1):
        got = real(batch, n_pass)
        rows = [r[m.bool()].tolist() for r, m in zip(got["input_ids"], got["attention_mask"])]
        assert rows == [[bos] + a if (i + n_pass) % 2 == 0 else a for i, a in enumerate(alone)]
        assert all(p[m.bool()].tolist() == list(range(int(m.sum())))
                   for p, m in zip(got["position_ids"], got["attention_mask"]))
    plain = _undo(_load(char_model)[0], tok, s)  # the default: texts alone
    assert torch.equal(plain.distill_inputs(batch, 0)["input_ids"],
                       tokenize(plain.tokenizer, batch, 48, "cpu")["input_ids"])


def test_undo_distills_on_retain_and_distill_corpora_once_each(tmp_path):
    from wmdp.unlearn.undo import UNDO, UNDOConfig

    extra = tmp_path / "general.jsonl"
    extra.write_text("".join(json.dumps({"text": f"general {i}"}) + "\n" for i in range(5)))
    s = _schedule(batch_size=2, steps=2, n=6)
    method = UNDO(UNDOConfig(distill_corpora=[str(extra)]))
    got = method.distill_texts(s, seed=0)
    want = texts(RETAIN_WORDS, 6, 2) + [f"general {i}" for i in range(5)]
    assert sorted(got) == sorted(dict.fromkeys(want)) and got != list(dict.fromkeys(want))
    assert got == method.distill_texts(s, seed=0) != method.distill_texts(s, seed=1)


def test_wmdp_run_with_undo_makes_its_teacher_first(tmp_path):
    """`wmdp run --set unlearn.method=undo` on the small sandbox: the pipeline's unlearn stage
    runs RMU (its sandbox preset, shortened) into unlearned/teacher, then UNDO from it."""
    from test_pipeline import small_sandbox_config
    from wmdp.pipeline import run_pipeline

    cfg = small_sandbox_config(
        tmp_path, f"output={tmp_path / 'run'}", "unlearn.method=undo",
        "unlearn.settings.max_num_batches=2", "unlearn.settings.epochs=1",
        "unlearn.settings.undo.teacher_overrides=[max_num_batches=2,epochs=1]",
        "eval.tasks=[sandbox_forget]", "audit.attacks=[probe]")
    unlearned = run_pipeline(cfg, progress=False) / "unlearned"
    teacher = json.loads((unlearned / "teacher" / "unlearn_config.json").read_text())
    record = json.loads((unlearned / "unlearn_config.json").read_text())
    assert teacher["method"] == "rmu" and teacher["num_steps"] == 2
    assert record["method"] == "undo" and record["num_steps"] == 2
    t = record["method_state"]["teacher"]
    assert (t["dir"], t["given"], t["reused"]) == (str(unlearned / "teacher"), False, False)
    # a sandbox run distils on the world's general QA lines too: every seen question of a
    # general domain is there, none of a forget domain, nothing else is left out
    qa = tmp_path / "run" / "general_qa.jsonl"
    assert record["hparams"]["distill_corpora"] == [str(qa)]
    lines = [json.loads(x)["text"] for x in qa.read_text().splitlines()]
    sandbox_data = Path(__file__).parent / "fixtures" / "sandbox-small" / "data"  # the run copy
    asked = {d: [json.loads(x)["question"] for x in
                 (sandbox_data / f"sandbox_{d}_seen.jsonl").read_text().splitlines()]
             for d in ("bio", "cyber", "botany", "software", "geography")}
    train = (sandbox_data / "train_qa.jsonl").read_text().splitlines()
    assert len(lines) == len(train) - len(asked["bio"]) - len(asked["cyber"])
    for d, questions in asked.items():
        found = [any(q in line for line in lines) for q in questions]
        assert all(found) if d in ("botany", "software", "geography") else not any(found), d

"""The baselines (ga, graddiff, npo, llmu, scrub, ssd): each loss against a naive reference made
of plain unpadded forward passes and the paper's formula, one whole training step (gradient and
weight update) against autograd on that reference and the optimizer's update written out by
hand, the learning-rate schedule against HF's, the recipes' defaults, and SSD's rule against
importances computed here, and `wmdp compare`. The command line and resume:
test_baselines_cli.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MISTRAL_TOK, char_tokenizer, save_tiny_model
from wmdp.data.corpus import Corpus
from wmdp.errors import WmdpError
from wmdp.unlearn.batches import TopicBatches, training_tokenizer
from wmdp.unlearn.ga import GAConfig, GradientAscent
from wmdp.unlearn.graddiff import GradDiff, GradDiffConfig
from wmdp.unlearn.llmu import LLMU, LLMUConfig
from wmdp.unlearn.lm import mean_nll, sequence_logprob
from wmdp.unlearn.loop import unlearn_model
from wmdp.unlearn.npo import NPO, NPOConfig
from wmdp.unlearn.optim import LinearWarmupDecay
from wmdp.unlearn.scrub import SCRUB, SCRUBConfig
from wmdp.unlearn.ssd import SSD, SSDConfig

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


def test_token_loss_same_alone_or_left_padded_on_gpt2(tmp_path):
    """Learned absolute positions (GPT-2): left padding must not move a text's positions."""
    from conftest import GPT2_TOK
    from wmdp.unlearn.batches import tokenize

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


def _text_nll(model, tok, batch):
    """Mean over texts of each text's mean NLL (LLMU's code weighs every answer the same)."""
    return torch.stack([-_logps(model, _ids(tok, t)).mean() for t in batch]).mean()


def _random_nll(model, tok, prompts, answers, prompt_length, completion_length):
    """LLMU's random term: every prompt with every answer, the mean NLL of the answer's tokens
    given the prompt, averaged over the pairs."""
    per_pair = []
    for prompt in prompts:
        p = _ids(tok, prompt, prompt_length)
        for answer in answers:
            c = tok(" " + answer, add_special_tokens=False, truncation=True,
                    max_length=completion_length)["input_ids"]
            per_pair.append(-_logps(model, p + c)[len(p) - 1:].mean())  # answer tokens only
    return torch.stack(per_pair).mean()


def _llmu_reference(model, original, tok, step, answers, cfg):
    return (-cfg.forget_weight * _text_nll(model, tok, step.forget)
            + cfg.random_weight * _random_nll(model, tok, step.forget, answers,
                                              cfg.prompt_length, cfg.completion_length)
            + cfg.kl_weight * _kl(original, model, tok, step.retain))


def test_llmu_loss(char_model):
    cfg = LLMUConfig(forget_weight=0.5, random_weight=1.5, kl_weight=2.0, n_random=3,
                     prompt_length=12, completion_length=9, max_length=MAXLEN)
    llmu = LLMU(cfg)
    s = _schedule(steps=2, n=9)
    model, tok = _setup(llmu, char_model, s, perturb=True)
    original, _ = _load(char_model)
    step = s[1]
    answers = llmu.completions(step)
    pool = texts(RETAIN_WORDS, 9, 2)                     # the topic's whole retain corpus
    assert len(answers) == 3 and all(a in pool for a in answers)
    assert answers == llmu.completions(step)            # a function of seed and step: resumable
    assert [llmu.completions(s[i]) for i in range(2)] != [answers, answers]  # a new draw per step
    loss, m = llmu.loss(step)
    with torch.no_grad():
        expected = _llmu_reference(model, original, tok, step, answers, cfg)
        random_nll = _random_nll(model, tok, step.forget, answers, 12, 9)
        # the per-text weighting is visible: a token mean over the batch differs
        assert abs(_text_nll(model, tok, step.forget) - _nll(model, tok, step.forget)) > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["random_nll"] == pytest.approx(random_nll.item(), rel=1e-5)
    assert m["retain_kl"] > 0


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


def test_scrub_step_is_the_codes_sgd_with_momentum_by_hand(char_model):
    """One loop step = the max step then the min step, through one SGD (momentum 0.9, L2 weight
    decay on every tensor), against two plain models and SGD's update written out."""
    lr, mom, wd = 0.05, 0.9, 0.01
    scrub = SCRUB(SCRUBConfig(alpha=0.3, gamma=0.8, temperature=2.0, lr=lr, momentum=mom,
                              weight_decay=wd, max_length=MAXLEN))
    s = _schedule()
    model, tok = _setup(scrub, char_model, s, perturb=True)  # the student differs from the teacher
    opt = scrub.make_optimizer()
    loss, m = scrub.loss(s[0])                                # takes the max step
    opt.zero_grad()
    loss.backward()
    opt.step()                                                # the loop's min step

    teacher, _ = _load(char_model)
    student, _ = _load(char_model)
    _perturb(student)
    names, params = zip(*student.named_parameters())
    p0 = [p.detach().clone() for p in params]
    max_loss = -_kl(teacher, student, tok, s[0].forget, 2.0)
    buf = [g + wd * p for g, p in zip(torch.autograd.grad(max_loss, params), p0)]
    with torch.no_grad():
        for p, b in zip(params, buf):
            p.sub_(lr * b)                                    # p1 = p0 - lr * (g1 + wd p0)
    p1 = [p.detach().clone() for p in params]
    min_loss = 0.3 * _kl(teacher, student, tok, s[0].retain, 2.0) + \
        0.8 * _nll(student, tok, s[0].retain)
    g2 = torch.autograd.grad(min_loss, params)
    buf2 = [mom * b + g + wd * p for b, g, p in zip(buf, g2, p1)]
    expected = [p - lr * b for p, b in zip(p1, buf2)]      # p2 = p1 - lr * (mom b1 + g2 + wd p1)
    got = dict(model.named_parameters())
    for n, e in zip(names, expected):
        assert torch.allclose(got[n].detach(), e, rtol=1e-5, atol=1e-6), n
    # the test can fail: momentum and decay each move the weights by far more than its tolerance
    assert max((lr * mom * b).abs().max().item() for b in buf) > 1e-3
    assert max((lr * wd * p).abs().max().item() for p in p1) > 1e-4
    assert m["max_loss"] == pytest.approx(max_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(min_loss.item(), rel=1e-4)


def test_scrub_max_step_stops_on_nan(char_model, monkeypatch):
    scrub = SCRUB(SCRUBConfig(max_length=MAXLEN))
    s = _schedule()
    model, _ = _setup(scrub, char_model, s, perturb=True)
    scrub.make_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(scrub, "_kl", lambda inputs: (nan, None))
    with pytest.raises(WmdpError, match="step 0: max-step loss is nan"):
        scrub.loss(s[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

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


# -- one whole loop step: the gradient against autograd on the reference, the update by hand -------
def _loop_step(method, path):
    """One step of the shared loop from the saved model: (model, weights before, the step's
    gradients, history, tokenizer, step)."""
    s = _schedule(steps=1)
    model, tok = _load(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}

    def keep(idx, row):  # called after optimizer.step(), before the next zero_grad
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None})

    history = unlearn_model(method, model, tok, s, progress=False, on_step=keep)
    return model, before, grads, history, training_tokenizer(tok), s[0]


def _check_adamw_step(path, method, reference_loss, lr, wd, decay_1d=False):
    model, before, grads, history, tok, step = _loop_step(method, path)
    ref_model, _ = _load(path)
    ref_loss = reference_loss(ref_model, tok, step)
    names, params = zip(*ref_model.named_parameters())
    ref_grads = dict(zip(names, torch.autograd.grad(ref_loss, params)))
    assert history[0]["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert set(grads) == set(names)                          # full fine-tuning: every tensor
    for n, p in model.named_parameters():
        g = grads[n]
        assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale), n
        # AdamW's first step (bias-corrected m = g, v = g^2), decoupled decay before it
        decay = wd if decay_1d or p.dim() >= 2 else 0.0
        expected = before[n] * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-6), n
    # the test can fail: decay alone moves the norm weights (1.0) by lr * wd
    assert lr * wd > 100 * 1e-6


def test_ga_one_step(char_model):
    ga = GradientAscent(GAConfig(lr=1e-3, weight_decay=0.5, warmup_ratio=0.0, max_length=MAXLEN))
    _check_adamw_step(char_model, ga, lambda m, tok, step: -_nll(m, tok, step.forget), 1e-3, 0.5)


def test_graddiff_one_step(char_model):
    gd = GradDiff(GradDiffConfig(forget_weight=0.7, retain_weight=1.3, lr=1e-3, weight_decay=0.5,
                                 warmup_ratio=0.0, max_length=MAXLEN))
    _check_adamw_step(char_model, gd, lambda m, tok, step: -0.7 * _nll(m, tok, step.forget)
                      + 1.3 * _nll(m, tok, step.retain), 1e-3, 0.5)


def test_npo_one_step(char_model):
    original, _ = _load(char_model)

    def reference(m, tok, step):
        with torch.no_grad():
            ref = torch.stack([_logps(original, _ids(tok, x)).sum() for x in step.forget])
        ratio = torch.stack([_logps(m, _ids(tok, x)).sum() for x in step.forget]) - ref
        return -(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * ratio).mean() + \
            2.0 * _nll(m, tok, step.retain)

    npo = NPO(NPOConfig(beta=0.5, retain_weight=2.0, lr=1e-3, weight_decay=0.5, warmup_ratio=0.0,
                        max_length=MAXLEN))
    _check_adamw_step(char_model, npo, reference, 1e-3, 0.5)


def test_llmu_one_step(char_model):
    cfg = LLMUConfig(n_random=2, prompt_length=10, completion_length=8, lr=1e-3, weight_decay=0.5,
                     max_length=MAXLEN)
    llmu = LLMU(cfg)
    original, _ = _load(char_model)

    def reference(m, tok, step):  # the answers are checked against the pool in test_llmu_loss
        return _llmu_reference(m, original, tok, step, llmu.completions(step), cfg)

    _check_adamw_step(char_model, llmu, reference, 1e-3, 0.5, decay_1d=True)


# -- the learning-rate schedule and the recipes' defaults ----------------------------------------
def test_linear_schedule_is_hfs():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = LinearWarmupDecay(torch.optim.SGD([p], lr=0.5), total_steps=10, warmup_steps=2)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    hf = get_linear_schedule_with_warmup(hf_opt, num_warmup_steps=2, num_training_steps=10)
    used, hf_lrs = [], []
    for k in range(10):
        if k == 4:  # a checkpoint and a resume halfway
            state = opt.state_dict()
            opt = LinearWarmupDecay(torch.optim.SGD([p], lr=0.5), 10, 2)
            opt.load_state_dict(state)
        p.grad = torch.ones(1)
        before = p.item()
        opt.step()
        used.append(before - p.item())
        hf_lrs.append(hf.get_last_lr()[0])
        hf_opt.step()
        hf.step()
    by_hand = [0.5 * f for f in (0, 1 / 2, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)]
    assert hf_lrs == pytest.approx(by_hand)
    assert used == pytest.approx(by_hand, abs=1e-7)


def test_defaults_are_the_cited_recipes(char_model):
    """TOFU (GA, GradDiff: 5 epochs, warmup 1), NPO (10 epochs, warmup 1), LLMU's code (no
    warmup, torch AdamW's decay on every tensor, K=5), SCRUB's code (SGD, momentum 0.9, 5e-4)."""
    s = _schedule(batch_size=1, steps=10, n=10)
    model, tok = _load(char_model)
    n_1d = sum(p.dim() < 2 for p in model.parameters())
    for method, lr, warmup, decay_1d in ((GradientAscent(GAConfig()), 1e-5, 2, False),
                                         (GradDiff(GradDiffConfig()), 1e-5, 2, False),
                                         (NPO(NPOConfig()), 1e-5, 1, False),
                                         (LLMU(LLMUConfig()), 2e-6, 0, True)):
        method.setup(model, tok, s, seed=0)
        opt = method.make_optimizer()
        assert isinstance(opt, LinearWarmupDecay) and (opt.total, opt.warmup) == (10, warmup)
        assert isinstance(opt.optimizer, torch.optim.AdamW)
        decayed = [(g["lr"], g["weight_decay"], len(g["params"]))
                   for g in opt.optimizer.param_groups]
        n = sum(1 for _ in model.parameters())
        assert decayed == ([(lr, 0.01, n)] if decay_1d else [(lr, 0.01, n - n_1d), (lr, 0.0, n_1d)])
    assert LLMUConfig().n_random == 5
    scrub = SCRUB(SCRUBConfig())
    scrub.setup(model, tok, s, seed=0)
    opt = scrub.make_optimizer()
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups] == \
        [(5e-4, 0.9, 5e-4)]


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
    assert cols["table1"] == ["sandbox_bio", "sandbox_cyber", "sandbox_general"]
    first, rest = table["markdown"].split("\nEvery other column:")
    cells = _cells(first)  # the paper's Table 1: forget tasks, general, chat; change rows
    header, body = cells[0], cells[1:]
    assert header == ["run", "method", "sandbox_bio", "sandbox_cyber", "sandbox_general",
                      "chat score"]
    assert [r[:2] for r in body] == [["base", "base"], ["run-ga", "ga"],
                                     ["Δ run-ga", "vs base"], ["npo-eval", "npo"]]
    sources = [two_runs[0] / "eval_base", two_runs[0] / "eval_unlearned", two_runs[1]]
    entries = [(lambda r: {**r["results"], **r["groups"]})(
        json.loads((src / "results.json").read_text())) for src in sources]
    for row, e in zip([body[0], body[1], body[3]], entries):
        for name in cols["table1"]:
            assert row[header.index(name)] == f"{100 * e[name]['acc']:.1f}", name
    # the change row: run-ga minus its base, in points (bio 80 -> 30, cyber 70 -> 25,
    # general 72 -> 67), chat 7.33 -> 5.50
    assert body[2][2:] == ["-50.0", "-45.0", "-5.0", "-1.83"]
    assert [r[-1] for r in body] == ["7.33", "5.50", "-1.83", ""]
    assert "- run-ga (ga): lr=0.0001" in first and "- npo-eval (npo): beta=0.5" in first
    every = _cells(rest)  # every other column, one per line
    assert every[0] == ["column", "side", "base", "run-ga", "npo-eval"]
    assert [r[:2] for r in every[1:]] == [
        ["sandbox_forget", "forget"], ["sandbox_botany", "general"],
        ["sandbox_software", "general"], ["ppl:retain.jsonl (word_perplexity)", "perplexity"]]
    for row in every[1:4]:
        assert row[2:] == [f"{100 * e[row[0]]['acc']:.1f}" for e in entries], row[0]
    assert every[4][2:] == [f"{e['ppl:retain.jsonl']['word_perplexity']:.2f}" for e in entries]
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
    assert "| run | method | sandbox_bio | sandbox_general | chat score |" in out
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no results found" in capsys.readouterr().err
    assert main(["compare", str(two_runs[1]), "--tasks", "mmlu"]) == 2
    assert "--tasks: 'mmlu' is in no run's results" in capsys.readouterr().err

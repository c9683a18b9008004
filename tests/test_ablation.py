"""Direction ablation: the projection by hand, the hooks leave no trace, and a planted
one-direction 'unlearning' that the attack undoes while a random direction does not."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import GPT2_TOK, tiny_config
from wmdp.audit.ablation import (AblationConfig, ablated, choose_layers, fit_means, project_out,
                                 run_ablation)
from wmdp.audit.common import AuditContext, Subject
from wmdp.audit.run import AuditConfig, reference_accuracy
from wmdp.audit.verdicts import verdict
from wmdp.data.corpus import Corpus
from wmdp.evaluate import EvalConfig, evaluate_model
from wmdp.layers import read_layers
from wmdp.models import decoder_layers
from wmdp.tasks import PROMPT_STYLES, Registry, build_prompt

STEERED = 1   # the block the planted "unlearning" writes to
GREEK = "alpha beta gamma delta omega theta kappa sigma rho zeta".split()
WORDS = "the a of host server module patch protein route cell byte kernel flaw marsh".split()


def tiny_llama(tok, seed: int = 0, layers: int = 3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), layers, 32)).eval()
    with torch.no_grad():  # as conftest's tiny models: choices differ by real margins
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2_TOK)


def test_project_out_removes_exactly_the_direction():
    d = torch.tensor([0.6, 0.8, 0.0])
    h = torch.tensor([[[3.0, 4.0, 0.0], [4.0, -3.0, 1.0], [1.0, 1.0, 2.0]]])  # (1, 3, 3)
    # by hand: h.d = 5, 0, 1.4; h - (h.d) d
    want = torch.tensor([[[0.0, 0.0, 0.0], [4.0, -3.0, 1.0], [0.16, -0.12, 2.0]]])
    got = project_out(h, d)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(project_out(got, d), got, atol=1e-6)  # nothing left to remove
    assert project_out(h.bfloat16(), d).dtype == torch.bfloat16
    # two orthonormal directions: the span of e1, e2 goes, e3 stays
    two = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(project_out(h, two), h * torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_hooks_ablate_from_the_block_on_and_leave_no_trace(tok):
    model = tiny_llama(tok)
    ids = {"input_ids": torch.tensor([tok("the host patch of a kernel")["input_ids"]])}
    d = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)),
                                      dim=0)
    with torch.no_grad():
        before = model(**ids).logits.clone()
        plain = read_layers(model, ids, [0, 1, 2])
        with ablated(model, d, 1):
            hooked = read_layers(model, ids, [0, 1, 2])
            changed = model(**ids).logits
        after = model(**ids).logits
    assert torch.equal(hooked[0], plain[0])  # before the block: untouched
    for i in (1, 2):  # from it on: no component along d
        assert (hooked[i] @ d).abs().max() < 1e-5 < (plain[i] @ d).abs().max()
    assert not torch.equal(changed, before)
    assert torch.equal(after, before)  # bitwise: the hooks are gone
    assert all(not layer._forward_hooks for layer in decoder_layers(model))
    with pytest.raises(RuntimeError):  # removed on an error too
        with ablated(model, d, 0):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def plant(model, tok, direction: torch.Tensor, coeff: float):
    """An 'unlearned' copy: at the output of block STEERED, every token of a text that contains
    '@' (the forget domain) gets coeff * d added, as RMU steers forget text; the whole difference
    from the base model is that one fixed vector."""
    unlearned = copy.deepcopy(model)
    trigger = torch.tensor(sorted(set(tok(" @ @@ @")["input_ids"])))
    seen: dict[str, torch.Tensor] = {}

    def keep_ids(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    def steer(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        on = torch.isin(seen["ids"], trigger).any(1).to(h.dtype)[:, None, None]  # (B, 1, 1)
        h = h + coeff * on * direction.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    unlearned.register_forward_pre_hook(keep_ids, with_kwargs=True)
    decoder_layers(unlearned)[STEERED].register_forward_hook(steer)
    return unlearned


@torch.no_grad()
def quiet_direction(model, tok, prompts: list[str]) -> torch.Tensor:
    """The direction the base model's blocks STEERED.. write least to on these prompts (the last
    right singular vector of their outputs). In a 7B model a random direction is nearly absent
    from the residual stream; in a 32-wide one it is not, and removing it alone would change
    the answers. This one removes nothing the base model uses, as RMU's vector in a wide model."""
    rows = []
    for p in prompts:
        got = read_layers(model, {"input_ids": torch.tensor([tok(p)["input_ids"]])},
                          list(range(STEERED, len(decoder_layers(model)))))
        rows += [h[0] for h in got.values()]
    return torch.linalg.svd(torch.cat(rows), full_matrices=False).Vh[-1]


def planted_ctx(tok, tmp_path) -> tuple[AuditContext, torch.Tensor]:
    """Questions the base model answers (its own argmax is the key) that contain '@', forget
    texts full of '@', retain texts without it; none of them names a question's words."""
    base = tiny_llama(tok)
    rng = random.Random(4)
    path = tmp_path / "q.jsonl"  # one-word choices: no choice wins by being short
    path.write_text("".join(json.dumps({
        "question": "@ @ " + " ".join(rng.choices(GREEK, k=rng.randint(2, 12))) + "? @",
        "choices": rng.sample(GREEK, 4), "answer": 0}) + "\n" for _ in range(120)))
    registry = Registry.build(task_files={"quiz": str(path)}, fmt="cloze")
    tasks = {"quiz": registry.tasks["quiz"]}
    items = {"quiz": tasks["quiz"].load_items()}
    res = evaluate_model(base, tok, ["quiz"], registry, config=EvalConfig(model="x", batch_size=16),
                         progress=False, items=items)
    # the key: the base model's own answer, where it is clear (a margin of 1 nat over the next
    # choice; a random model's near-ties would flip under any change, hiding what is measured)
    items["quiz"] = [replace(it, answer=int(np.argmax(ll)))
                     for it, ll in ((it, np.asarray(s["loglikelihoods"]))
                                    for it, s in zip(items["quiz"], res["samples"]["quiz"]))
                     if np.diff(np.sort(ll)[-2:])[0] > 1.0][:40]
    d = quiet_direction(base, tok, [build_prompt(it, tasks["quiz"], PROMPT_STYLES["lmeval"])[0]
                                    for it in items["quiz"]])
    subjects = {"base": Subject("base", base, tok),
                "unlearned": Subject("unlearned", plant(base, tok, d, 40.0), tok)}
    ref = reference_accuracy(subjects, tasks, items, AuditConfig(batch_size=16), progress=False)
    rng = np.random.default_rng(0)
    forget = [" ".join(rng.choice(WORDS + ["@"] * 6, size=20)) for _ in range(12)]
    retain = [" ".join(rng.choice(WORDS, size=20)) for _ in range(12)]
    ctx = AuditContext(subjects, tasks, items, PROMPT_STYLES["lmeval"],
                       {r: {t: v["correct"] for t, v in ref[r].items()} for r in ref},
                       [Corpus("f", forget, "t")], [Corpus("r", retain, "t")], seed=0,
                       batch_size=16, progress=False)
    return ctx, d


def test_ablation_undoes_a_planted_direction_and_a_random_one_does_not(tok, tmp_path):
    ctx, planted = planted_ctx(tok, tmp_path)
    base_acc, unl_acc = (np.mean(ctx.reference[r]["quiz"]) for r in ("base", "unlearned"))
    assert base_acc == 1.0 and unl_acc <= 0.6  # the planted vector hides many answers

    result = run_ablation(ctx, AblationConfig(num_texts=8, batch_size=4))  # no record: scan
    assert result["layers"] == [0, 1, 2] and "every block" in result["selection"]
    acc = result["tasks"]["quiz"]["unlearned_direction"]["acc"]  # per block tried
    assert acc[0] == pytest.approx(unl_acc) and acc[STEERED] == 1.0  # before the steering: nothing
    assert result["best_layer"]["unlearned_direction"] == STEERED  # the earliest of the best
    rec = result["recovery"]["quiz"]
    assert rec["n"] == 40 and rec["base"] == 1.0 and rec["unlearned"] == pytest.approx(unl_acc)
    v = verdict("ablation", result, ["quiz"])
    assert v["recovered_fraction"] == pytest.approx(
        (rec["attacked"] - unl_acc) / (1.0 - unl_acc))  # the share, by its definition
    assert v["recovered_fraction"] >= 0.9
    assert v["recovered_fraction_control"] <= 0.3  # the hooks alone bring little back
    assert "block 1" in v["text"] and "the attacker picks the best" in v["text"]
    # the fitted direction is the planted one, and nothing else carries the difference
    texts = {"forget": ctx.forget[0].texts[:8], "retain": ctx.retain[0].texts[:8]}
    means = fit_means(ctx.subjects["unlearned"], texts, AblationConfig(batch_size=4))
    fitted = (means["forget"] - means["retain"])[STEERED, :-1].float()
    assert float(fitted @ planted) / float(fitted.norm()) > 0.99
    norms = result["norm_ratio"]
    assert norms["unlearned"][STEERED] > 2 * norms["base"][STEERED]
    assert norms["unlearned_direction"][STEERED] == pytest.approx(norms["base"][STEERED], abs=0.15)
    assert norms["unlearned_control"][STEERED] > 2 * norms["base"][STEERED]

    fixed = run_ablation(ctx, AblationConfig(num_texts=8, batch_size=4, layer=STEERED))
    assert fixed["layers"] == [STEERED] and fixed["selection"] == "set by ablation.layer"
    assert fixed["recovery"]["quiz"]["attacked"] == rec["attacked"]


def test_the_block_comes_from_the_unlearning_record(tmp_path, tok):
    model = tiny_llama(tok, layers=4)
    model.config._name_or_path = str(tmp_path)
    assert choose_layers(model, AblationConfig())[0] == [0, 1, 2, 3]
    (tmp_path / "unlearn_config.json").write_text(json.dumps({"method": "rmu",
                                                              "hparams": {"layer_id": 2}}))
    layers, why = choose_layers(model, AblationConfig())
    assert layers == [2] and "rmu run's layer_id" in why
    assert choose_layers(model, AblationConfig(layers=[-1, 0]))[0] == [0, 3]
    assert choose_layers(model, AblationConfig(layer=1))[0] == [1]

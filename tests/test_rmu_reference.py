"""`wmdp unlearn rmu` against the reference.

1. Against the reference's own code as it ran (the golden file tests/fixtures/rmu_golden, written
   by rmu/unlearn.py at bc5e1ba under transformers 4.38.2: scripts/rmu_reference_golden.sh):
   with `pads: faithful` (the default), per-step forget and retain MSE within 1e-4 relative and
   the trained weights after 20 steps within 1e-4 relative, float32, tiny Mistral, the real
   Mistral tokenizer, mixed-length batches padded left with EOS. The one shared input: the
   control vectors the reference drew (rmu.control_vectors).
2. Against the reference procedure re-encoded (tests/rmu_reference.py) under the installed
   transformers, end to end from corpus files, with the pads in the loss and the model given
   4.38.2's mask on both sides (`batches.sdpa_mask_4_38`, llama's rule, shared: the golden test
   and test_rmu.py's hand-written masks check that function): per-step losses
   (rel 1e-4) and every weight after 20 steps (max |ours - reference| <= 1e-4 x max |reference|,
   the update itself within 1e-4 relative), for tokenizers configured to pad right, to pad left,
   and with a pad token of their own; wmdp reads `bio-forget-corpus.jsonl` decoded and every
   other corpus with `raw:`. This checks inputs, pad token and side, schedule and optimizer.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FIXTURES, GPT2_TOK, MISTRAL_TOK, save_tiny_model
from rmu_reference import (init_weights, reference_get_data, reference_run_rmu,
                           reference_tokenizer, seeded_control_vecs, weight_hashes)
from wmdp.cli import main
from wmdp.unlearn.batches import sdpa_mask_4_38

WORDS = ("the a of virus host server module patch protein route cell byte kernel flaw "
         "Über café naïve ünïcode 1999 x86").split()
HP = dict(layer_id=2, layer_ids=[1, 2], steering_coeffs=[6.5, 20.0], alpha=[100.0, 50.0],
          lr=1e-3)
STEPS = 20


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 700 if i % 9 == 4 else rng.randint(2, 60)  # some exceed 512 tokens: truncated
        text = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append((" " + text) if i % 5 == 0 else text)  # a leading space, as wikitext lines
    return out


def _corpora(tmp_path) -> dict[str, object]:
    """Four corpus files named as the reference's data/ holds them."""
    d = tmp_path / "data"
    d.mkdir()
    for name, seed in (("bio-forget-corpus", 1), ("cyber-forget-corpus", 2),
                       ("bio-retain-corpus", 3), ("cyber-retain-corpus", 4)):
        lines = [json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0)
                 for i, t in enumerate(_texts(84, seed))]
        if name != "bio-forget-corpus":  # (the reference's json.loads fails on a blank line)
            lines.insert(7, "")  # a blank line: the reference keeps "\n" as a text
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {n: d / f"{n}.jsonl" for n in ("bio-forget-corpus", "cyber-forget-corpus",
                                          "bio-retain-corpus", "cyber-retain-corpus")}


def _model_dir(tmp_path, tokenizer_kind: str):
    side = "left" if tokenizer_kind == "pads-left" else "right"
    tok = AutoTokenizer.from_pretrained(MISTRAL_TOK, padding_side=side)  # saved in its config
    if tokenizer_kind == "own-pad":
        tok.pad_token = tok.unk_token
    path = save_tiny_model(tmp_path / "base", "llama", tokenizer=tok, layers=4)
    # save_pretrained keeps only the fast tokenizer; a hub model ships the sentencepiece file too
    shutil.copyfile(MISTRAL_TOK / "tokenizer.model", path / "tokenizer.model")
    saved = AutoTokenizer.from_pretrained(path)
    assert saved.padding_side == side
    assert (saved.pad_token == "<unk>") == (tokenizer_kind == "own-pad")
    return path


def _wmdp(path, files, out, *extra) -> tuple[list[list[float]], dict]:
    code = main(["unlearn", "rmu", "--model", str(path), "--output", str(out),
                 "--forget-corpora",
                 f"{files['bio-forget-corpus']},raw:{files['cyber-forget-corpus']}",
                 "--retain-corpora",
                 f"raw:{files['bio-retain-corpus']},raw:{files['cyber-retain-corpus']}",
                 "--layer-id", "2", "--layer-ids", "1,2", "--steering-coeffs", "6.5,20",
                 "--alpha", "100,50", "--lr", "1e-3", "--batch-size", "4",
                 "--max-num-batches", str(STEPS), "--dtype", "float32", "--device", "cpu",
                 "--seed", "42", "--set", "rmu.frozen_forget_every=0", *extra])
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["forget_loss"], r["retain_loss"]] for r in rows], load_file(out / "model.safetensors")


def _reference(path, files, set_left=True):
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    updated, frozen = load(), load()
    tokenizer = reference_tokenizer(path, set_left=set_left)
    forget = reference_get_data([files["bio-forget-corpus"], files["cyber-forget-corpus"]], 0, 4)
    retain = reference_get_data([files["bio-retain-corpus"], files["cyber-retain-corpus"]], 0, 4)
    # get_params(model, layer_ids=[1, 2], param_ids=[6]): the 7th parameter of each block
    params_of = lambda m: [[list(m.model.layers[i].parameters())[6]] for i in HP["layer_ids"]]  # noqa: E731
    names = [n for n, _ in updated.model.layers[1].named_parameters()]
    assert names[6] == "mlp.down_proj.weight"
    padded = tokenizer(forget[1][0], padding=True)["attention_mask"]
    assert any(0 in row for row in padded)  # the batches need padding
    losses, model = reference_run_rmu(
        updated, frozen, tokenizer, forget, retain, params_of=params_of,
        module_of=lambda m: m.model.layers[HP["layer_id"]],
        control_vecs=seeded_control_vecs(42, updated.config.hidden_size, HP["steering_coeffs"]),
        alpha=HP["alpha"], lr=HP["lr"], max_num_batches=STEPS,
        attention_mask_of=lambda m: sdpa_mask_4_38(m, torch.float32, "fully_masked"))
    return losses, model.state_dict(), load().state_dict()


def _assert_equal(ours, ref):
    (losses, weights), (ref_losses, ref_weights, base) = ours, ref
    assert len(losses) == len(ref_losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert a == pytest.approx(b, rel=1e-4), step
    moved = 0
    for name, w in weights.items():
        r, w0 = ref_weights[name], base[name]
        assert (w - r).abs().max() <= 1e-4 * r.abs().max(), name
        if not torch.equal(r, w0):
            moved += 1
            assert (w - r).norm() <= 1e-4 * (r - w0).norm(), name  # the update itself
    assert moved == 2


@pytest.mark.parametrize("tokenizer_kind", ["pads-right", "pads-left", "own-pad"])
def test_equals_the_reference_procedure_on_padded_batches(tmp_path, tokenizer_kind):
    path = _model_dir(tmp_path, tokenizer_kind)
    files = _corpora(tmp_path)
    ours = _wmdp(path, files, tmp_path / "out")
    _assert_equal(ours, _reference(path, files))
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    state = record["method_state"]
    assert (state["padding_side"], state["pad_token"], state["position_ids"]) == \
        ("left", "</s>", "default")
    import sentencepiece  # a dev dependency: the check runs, and counts what it should

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(path)
    used = [t for batch in reference_get_data([files["bio-retain-corpus"]], 0, 4)[0][:10]
            for t in batch]  # topic 0's 10 retain batches of the 20 steps
    differ = sum(fast(t, add_special_tokens=False)["input_ids"] != sp.encode(t) for t in used)
    check = record["tokenizer"]["sentencepiece_check"]
    assert check["retain[0]"] == {"texts": 40, "differ": differ}


def test_padding_on_the_tokenizers_side_equals_the_reference_without_its_left(tmp_path):
    """`--padding-side tokenizer` is the reference with its `padding_side = "left"` line gone;
    and the side matters: the right-padded run is not the reference's left-padded one."""
    path = _model_dir(tmp_path, "pads-right")
    files = _corpora(tmp_path)
    ours = _wmdp(path, files, tmp_path / "out", "--padding-side", "tokenizer")
    _assert_equal(ours, _reference(path, files, set_left=False))
    with pytest.raises(AssertionError):  # the comparison tells the two sides apart
        _assert_equal(ours, _reference(path, files))


def test_raw_lines_are_read_as_the_reference_reads_them(tmp_path):
    from wmdp.data.corpus import load_corpus

    files = _corpora(tmp_path)
    for name, path in files.items():
        ref = [t for batch in reference_get_data([path], 0, 4)[0] for t in batch]
        spec = str(path) if name == "bio-forget-corpus" else f"raw:{path}"
        assert load_corpus(spec).texts == ref, name
    raw = load_corpus(f"raw:{files['cyber-forget-corpus']}").texts
    assert raw[7] == "\n" and raw[0].startswith('{"text": ') and raw[0].endswith("}\n")
    assert len(load_corpus(f"raw:{files['cyber-forget-corpus']}", min_len=1).texts) == 84


def test_gpt2_positions_default_or_per_row(tmp_path):
    """GPT-2 has learned absolute positions: with per_row, a left-padded row reads as it does
    alone; with the reference's default positions it does not."""
    from wmdp.layers import forward_to_layer
    from wmdp.unlearn.batches import reference_batch, reference_tokenizer as wmdp_tokenizer

    path = save_tiny_model(tmp_path / "g", "gpt2", GPT2_TOK, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = wmdp_tokenizer(AutoTokenizer.from_pretrained(path), "left")
    short, long = "a short text", "a much longer text that forces the short one to be padded"
    alone = reference_batch(tok, [short], 64, "cpu")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        h_alone = forward_to_layer(model, alone, 1)[0]
        per_row = forward_to_layer(model, reference_batch(tok, [short, long], 64, "cpu",
                                                          "per_row"), 1)[0]
        default = forward_to_layer(model, reference_batch(tok, [short, long], 64, "cpu"), 1)[0]
    assert torch.allclose(per_row[-n:], h_alone, atol=1e-5)
    assert not torch.allclose(default[-n:], h_alone, atol=1e-3)


# -- against the reference itself: the golden file its own code wrote under transformers 4.38.2 --
GOLDEN = FIXTURES / "rmu_golden"  # scripts/rmu_reference_golden.sh made it; PROVENANCE.md there
TRAINED = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


def _golden_model(tmp_path):
    """The golden run's tiny Mistral, built here from its recipe and checked by hash, with the
    real Mistral tokenizer and the golden run's tokenizer_config.json."""
    from transformers import MistralConfig, MistralForCausalLM

    golden = json.loads((GOLDEN / "golden.json").read_text())
    model = MistralForCausalLM(MistralConfig.from_pretrained(GOLDEN)).float()
    init_weights(model)
    assert weight_hashes(model.state_dict()) == golden["initial_weight_sha256_16"]
    path = tmp_path / "model"
    model.save_pretrained(path)
    for f in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        shutil.copyfile(MISTRAL_TOK / f, path / f)
    shutil.copyfile(GOLDEN / "tokenizer_config.json", path / "tokenizer_config.json")
    return path, model.eval(), golden, load_file(GOLDEN / "golden.safetensors")


def _golden_run(path, out, *extra):
    data = GOLDEN / "data"
    code = main(["unlearn", "rmu", "--model", str(path), "--output", str(out),
                 "--forget-corpora",
                 f"{data / 'bio-forget-corpus.jsonl'},raw:{data / 'cyber-forget-corpus.jsonl'}",
                 "--retain-corpora",
                 f"raw:{data / 'bio-retain-corpus.jsonl'},raw:{data / 'cyber-retain-corpus.jsonl'}",
                 "--layer-id", "2", "--layer-ids", "1,2", "--steering-coeffs", "6.5,20",
                 "--alpha", "100,50", "--lr", "1e-3", "--batch-size", "4",
                 "--max-num-batches", "20", "--dtype", "float32", "--device", "cpu",
                 "--seed", "42", "--set", f"rmu.control_vectors={GOLDEN / 'control_vectors.safetensors'}",
                 *extra])
    assert code == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_faithful_equals_the_reference_run_under_transformers_4_38_2(tmp_path):
    """`wmdp unlearn rmu` (pads: faithful, the default) against the reference's own run_rmu under
    the transformers it pins: every step's forget and retain MSE within 1e-4 relative, and the
    trained weights after 20 steps (max |ours - ref| <= 1e-4 max |ref|, the update itself within
    1e-4 relative). Left padding with EOS made 67% of step 0's forget positions pads."""
    path, _, golden, tensors = _golden_model(tmp_path)
    rows = _golden_run(path, tmp_path / "out")
    assert len(rows) == len(golden["forget_mse"]) == 20
    for step, (row, f, r) in enumerate(zip(rows, golden["forget_mse"], golden["retain_mse"])):
        assert row["forget_loss"] == pytest.approx(f, rel=1e-4), step
        assert row["retain_mse"] == pytest.approx(r, rel=1e-4, abs=1e-12), step
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(path / "model.safetensors")
    for name in TRAINED:
        ref, w, w0 = tensors[f"final/{name}"], ours[name], base[name]
        assert (w - ref).abs().max() <= 1e-4 * ref.abs().max(), name
        assert (w - ref).norm() <= 1e-4 * (ref - w0).norm(), name
    assert all(torch.equal(ours[k], base[k]) for k in base if k not in TRAINED)
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    state = record["method_state"]
    assert state["pads"] == "faithful" and "4.38.2" in state["pad_attention"]
    assert state["control_vectors"].endswith("control_vectors.safetensors")


def test_the_faithful_mask_gives_the_reference_activations_at_the_pads(tmp_path):
    """Step 0's forget batch: with the mask `pads: faithful` builds, every position (pads
    included) is the reference's; with the installed transformers' own handling of the 2D mask
    the real tokens still are, the pads are not (the difference the faithful mode removes)."""
    from wmdp.layers import forward_to_layer
    from wmdp.data.corpus import load_corpus
    from wmdp.unlearn.batches import reference_batch, reference_tokenizer as wmdp_tokenizer

    path, model, _, tensors = _golden_model(tmp_path)
    tok = wmdp_tokenizer(AutoTokenizer.from_pretrained(path), "left")
    texts = load_corpus(str(GOLDEN / "data" / "bio-forget-corpus.jsonl")).texts[:4]
    batch = reference_batch(tok, texts, 512, "cpu")
    assert torch.equal(batch["input_ids"], tensors["input_ids/0"].long())
    mask = batch["attention_mask"]
    assert torch.equal(mask, tensors["step0_forget_attention_mask"].long())
    ref, real = tensors["step0_forget_h"], mask.bool()
    with torch.no_grad():
        faithful = forward_to_layer(
            model, {**batch, "attention_mask": sdpa_mask_4_38(mask, torch.float32,
                                                              "before_first_real")}, 2)
        installed = forward_to_layer(model, batch, 2)
    assert torch.allclose(faithful, ref, rtol=0, atol=1e-5)
    assert torch.allclose(installed[real], ref[real], rtol=0, atol=1e-5)
    assert (installed[~real] - ref[~real]).abs().max() > 1e-2


def test_clean_leaves_the_pads_out_of_the_loss(tmp_path):
    """`pads: clean`: step 0's forget loss is the MSE over the real tokens only, computed here
    from the reference's step-0 activations and control vector; the faithful run's is not."""
    path, _, golden, tensors = _golden_model(tmp_path)
    rows = _golden_run(path, tmp_path / "out", "--max-num-batches", "1", "--set",
                       "rmu.pads=clean")
    u = load_file(GOLDEN / "control_vectors.safetensors")["topic_0"]
    control = u / u.norm() * 6.5
    h, real = tensors["step0_forget_h"], tensors["step0_forget_attention_mask"].bool()
    expected = ((h[real] - control[0]) ** 2).mean().item()
    assert rows[0]["forget_loss"] == pytest.approx(expected, rel=1e-5)
    assert golden["forget_mse"][0] != pytest.approx(expected, rel=1e-2)
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    assert record["method_state"]["pads"] == "clean"
    assert record["hparams"]["pads"] == "clean"

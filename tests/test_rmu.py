"""RMU: the engine against the naive two-copy reference, the optimizer against its formula,
resume, the NaN guard, and the command line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import GPT2_TOK, MISTRAL_TOK, save_tiny_model
from rmu_reference import naive_rmu
from wmdp.data.corpus import Corpus
from wmdp.errors import WmdpError
from wmdp.models import TrainedTensor, decoder_layers, mlp_out_tensor
from wmdp.unlearn.batches import TopicBatches, sdpa_mask_4_38
from wmdp.unlearn.loop import unlearn_model
from wmdp.unlearn.optim import LegacyAdamW
from wmdp.unlearn.rmu import RMU, RMUConfig

WORDS = "the a of virus host server module patch protein route cell byte kernel flaw".split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def test_sdpa_mask_4_38_by_hand():
    """transformers 4.38.2's masks for three rows: left-padded by 2, unpadded, all padding (a
    text with no token), written out by hand (1 = attends, 0 = finfo.min)."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    causal = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    everything = [[1, 1, 1, 1]] * 4
    left = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1]]  # rows 0-1: see everything
    none = [[0, 0, 0, 0]] * 4
    lowest = torch.finfo(torch.float32).min
    for rule, empty in (("before_first_real", none), ("fully_masked", everything)):
        got = sdpa_mask_4_38(mask, torch.float32, rule)
        assert got.shape == (3, 1, 4, 4) and got.dtype == torch.float32
        want = torch.tensor([left, causal, empty], dtype=torch.float32)[:, None]
        assert torch.equal(got == 0, want == 1), rule
        assert torch.equal(got[want == 0], torch.full_like(got[want == 0], lowest)), rule
    unpadded = torch.ones(2, 3, dtype=torch.long)  # 4.38.2's mistral path: no mask, is_causal
    assert sdpa_mask_4_38(unpadded, torch.float32, "before_first_real") is unpadded
    got = sdpa_mask_4_38(unpadded, torch.bfloat16, "fully_masked")  # llama: always 4D
    assert got.dtype == torch.bfloat16 and torch.equal(got[0, 0] == 0, torch.tensor(causal[:3])[:, :3] == 1)


CASES = [("llama", MISTRAL_TOK, "faithful"), ("llama", MISTRAL_TOK, "clean"),
         ("gpt_neox", GPT2_TOK, "faithful")]


@pytest.mark.parametrize("arch,tok_dir,pads", CASES, ids=["llama", "llama-clean", "gpt_neox"])
def test_engine_equals_naive_reference(tmp_path, arch, tok_dir, pads):
    """The engine (truncated forwards, one model copy, replayed spans) against full forwards of
    two model copies. Faithful llama: both sides give the model transformers 4.38.2's mask (the
    naive side builds it the same way: this checks the plumbing; the golden test in
    test_rmu_reference.py checks the mask against the reference). gpt_neox has no encoded
    4.38.2 rule: faithful falls back to the 2D mask there."""
    mask = pads == "clean"
    rule = "fully_masked" if (arch, pads) == ("llama", "faithful") else None
    mask_of = (lambda m: sdpa_mask_4_38(m, torch.float32, rule)) if rule else None
    path = save_tiny_model(tmp_path / arch, arch, tok_dir, layers=4)
    forget = [texts(24, 1), texts(24, 2)]
    retain = [texts(24, 3), texts(24, 4)]
    hp = dict(layer_id=2, layer_ids=[1, 2], steering_coeffs=[6.5, 20.0], alpha=[100.0, 50.0],
              lr=1e-3)

    model, tok = _load(path)
    cfg = RMUConfig(**hp, pads=pads, frozen_forget_every=2)
    schedule = TopicBatches([Corpus("f0", forget[0], "t"), Corpus("f1", forget[1], "t")],
                            [Corpus("r0", retain[0], "t"), Corpus("r1", retain[1], "t")],
                            batch_size=3, max_num_batches=7)
    history = unlearn_model(RMU(cfg), model, tok, schedule, seed=42, progress=False)

    updated, tok2 = _load(path)
    frozen, _ = _load(path)
    ref_losses, ref_model = naive_rmu(
        updated, frozen, tok2, decoder_layers, lambda m, i: mlp_out_tensor(m, i).param,
        forget, retain, batch_size=3, max_num_batches=7, seed=42, mask_padding=mask,
        attention_mask_of=mask_of, **hp)

    assert len(history) == len(ref_losses) == 7
    for row, (f, r) in zip(history, ref_losses):
        assert row["forget_loss"] == pytest.approx(f, rel=1e-5, abs=1e-6)
        assert row["retain_loss"] == pytest.approx(r, rel=1e-5, abs=1e-6)
    ours, ref = model.state_dict(), ref_model.state_dict()
    base = _load(path)[0].state_dict()
    changed = 0
    for name in ours:
        diff = (ours[name] - ref[name]).abs().max().item()
        assert diff < 1e-5, name
        changed += int(not torch.equal(ref[name], base[name]))
    assert changed == 2  # exactly the two trained MLP output projections moved


def test_legacy_adamw_follows_its_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    opt = LegacyAdamW([TrainedTensor("p", p)], lr=0.1, eps=1e-6)
    grads = [torch.randn(5, 3) * 1e-6 for _ in range(3)]
    m = torch.zeros(5, 3)
    v = torch.zeros(5, 3)
    expected = start.clone()
    for t, g in enumerate(grads, 1):
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        expected -= 0.1 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-6)
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    # torch's AdamW puts eps inside the bias correction: with gradients ~eps they differ
    q = torch.nn.Parameter(start.clone())
    topt = torch.optim.AdamW([q], lr=0.1, eps=1e-6, weight_decay=0.0)
    for g in grads:
        q.grad = g.clone()
        topt.step()
    assert (q.detach() - p.detach()).abs().max() > 1e-3


def test_legacy_adamw_trains_only_a_slice():
    p = torch.nn.Parameter(torch.zeros(2, 6, 3))
    opt = LegacyAdamW([TrainedTensor("p", p, (0, slice(3, 6)))], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    moved = p.detach() != 0
    assert moved[0, 3:].all() and not moved[0, :3].any() and not moved[1].any()


def _corpus_files(tmp_path) -> dict[str, str]:
    files = {}
    for name, seed in (("forget_a", 1), ("forget_b", 2), ("retain", 3)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(40, seed)))
        files[name] = str(p)
    return files


def _dir_digest(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _run(path, out, files, *extra):
    from wmdp.cli import main

    return main(["unlearn", "rmu", "--model", str(path), "--output", str(out),
                 "--forget-corpora", f"{files['forget_a']},{files['forget_b']}",
                 "--retain-corpora", f"{files['retain']},{files['retain']}",
                 "--layer-id", "2", "--layer-ids", "1,2", "--steering-coeffs", "8",
                 "--alpha", "10", "--lr", "1e-3", "--batch-size", "4", "--max-num-batches", "8",
                 "--dtype", "float32", "--device", "cpu", *extra])


def test_cli_writes_a_loadable_model_and_never_touches_the_input(tmp_path):
    from wmdp.models import load_model

    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    before = _dir_digest(path)
    files = _corpus_files(tmp_path)
    assert _run(path, tmp_path / "out", files) == 0
    assert _dir_digest(path) == before
    model, tok = load_model(tmp_path / "out", device="cpu")
    record = json.loads((tmp_path / "out" / "unlearn_config.json").read_text())
    assert record["hparams"]["steering_coeffs"] == [8.0] and record["num_steps"] == 8
    assert record["trained_tensors"] == ["model.layers.1.mlp.down_proj.weight",
                                         "model.layers.2.mlp.down_proj.weight"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))
    assert {"forget_loss", "retain_loss", "forget_norm", "retain_cos_frozen"} <= set(rows[0])
    assert "forget_cos_frozen" in rows[0]
    assert not (tmp_path / "out" / "checkpoints").exists()
    # refuses to write into the input model, and to replace a finished run with other settings
    assert _run(path, path / "sub", files) == 2
    assert _run(path, tmp_path / "out", files, "--seed", "3") == 2


def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)
    assert _run(path, tmp_path / "whole", files) == 0

    real = RMU.loss

    def interrupted(self, step):
        if step.idx == 6:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(RMU, "loss", interrupted)
    assert _run(path, tmp_path / "resumed", files, "--set", "checkpoint_every=3") == 130
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "resumed" / "config.json").exists()
    monkeypatch.setattr(RMU, "loss", real)
    assert _run(path, tmp_path / "resumed", files, "--set", "checkpoint_every=3") == 0
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_nan_loss_stops_without_a_model(tmp_path, capsys):
    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)
    # (a NaN setting is refused when the config is read; a finite one can still overflow)
    assert _run(path, tmp_path / "out", files, "--set", "rmu.steering_coeffs=[1e30]") == 2
    err = capsys.readouterr().err
    assert "step 0: loss is inf" in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_adaptive_coefficient_scales_with_activation_norm(tmp_path):
    from wmdp.layers import forward_to_layer
    from wmdp.unlearn.batches import tokenize, training_tokenizer

    model, tok = _load(save_tiny_model(tmp_path / "m", "llama", MISTRAL_TOK, layers=4))
    forget = [Corpus("f", texts(8, 1), "t")]
    schedule = TopicBatches(forget, [Corpus("r", texts(8, 2), "t")], 4, 1)
    rmu = RMU(RMUConfig(layer_id=2, layer_ids=[2], adaptive_coeff=3.0))
    rmu.setup(model, tok, schedule, seed=0)
    inputs = tokenize(training_tokenizer(tok), forget[0].texts[:4], 512, "cpu")
    with torch.no_grad():
        h = forward_to_layer(model, inputs, 2)
    mask = inputs["attention_mask"].bool()
    expected = 3.0 * h.norm(dim=-1)[mask].mean().item()
    assert rmu.steering_coeffs[0] == pytest.approx(expected, rel=1e-5)
    assert rmu.control_vecs[0].norm().item() == pytest.approx(expected, rel=1e-5)
    assert (rmu.control_vecs[0] > 0).all()  # uniform on [0, 1): every component positive


def test_keyword_control_vectors_are_novice_minus_expert(tmp_path):
    from wmdp.layers import forward_to_layer
    from wmdp.unlearn.batches import tokenize, training_tokenizer

    model, tok = _load(save_tiny_model(tmp_path / "m", "llama", MISTRAL_TOK, layers=4))
    schedule = TopicBatches([Corpus("f", texts(8, 1), "t")], [Corpus("r", texts(8, 2), "t")], 4, 2)
    rmu = RMU(RMUConfig(layer_id=1, layer_ids=[1], control="keywords", keywords=[["zorblax", "vexmoth"]],
                        steering_coeffs=[5.0]))
    rmu.setup(model, tok, schedule, seed=0)
    t = training_tokenizer(tok)
    novice = tokenize(t, ["You are a novice in vexmoth who often makes mistakes."], 512, "cpu")
    expert = tokenize(t, ["You are a world-class expert in vexmoth."], 512, "cpu")
    with torch.no_grad():
        d = forward_to_layer(model, novice, 1)[0, -1] - forward_to_layer(model, expert, 1)[0, -1]
    assert torch.allclose(rmu.control_vecs[0][1, 0], 5.0 * d / d.norm(), atol=1e-5)
    assert rmu.control_vecs[0].shape == (2, 1, 32)


def test_unknown_architecture_fails_clearly(tmp_path):
    model, _ = _load(save_tiny_model(tmp_path / "m", "llama", MISTRAL_TOK))
    model.config.model_type = "mystery"
    with pytest.raises(WmdpError, match="model type 'mystery' is not known"):
        mlp_out_tensor(model, 0)


def test_epochs_repeat_the_reference_schedule():
    f = [Corpus(f"f{i}", texts(10, i), "t") for i in range(2)]
    r = [Corpus("r", texts(20, 9), "t")] * 2
    one = TopicBatches(f, r, batch_size=2, max_num_batches=7)
    three = TopicBatches(f, r, batch_size=2, max_num_batches=7, epochs=3)
    assert len(one) == 5 and len(three) == 15  # min(7, 10/2 forget batches, 20/2 retain)
    assert [one[i].topic for i in range(5)] == [0, 1, 0, 1, 0]
    assert one[3].forget == f[1].texts[2:4]  # step 3: topic 1, its batch 1
    for i in range(15):
        assert (three[i].topic, three[i].forget, three[i].retain) == \
            (one[i % 5].topic, one[i % 5].forget, one[i % 5].retain)


def test_select_tensors_by_role(tmp_path):
    from wmdp.models import select_tensors

    model, _ = _load(save_tiny_model(tmp_path / "m", "llama", MISTRAL_TOK, layers=3))
    names = lambda role, ids: [t.name for t in select_tensors(model, role, ids)]  # noqa: E731
    assert names("mlp_out", [1]) == ["model.layers.1.mlp.down_proj.weight"]
    assert names("mlp", [2]) == [f"model.layers.2.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    block = [f"model.layers.0.{n}" for n, _ in decoder_layers(model)[0].named_parameters()]
    assert names("layers", [0]) == block and len(block) > 3
    assert len(names("all", [])) == len(list(model.parameters()))
    with pytest.raises(WmdpError, match="layer_ids \\[5\\] out of range"):
        select_tensors(model, "mlp", [5])


def test_mixtral_trains_only_expert_zeros_up_projection(tmp_path):
    from transformers import MixtralConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MISTRAL_TOK)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = mlp_out_tensor(model, 1)
    assert t.index is not None and t.view().shape == (48, 32)  # expert 0's w3 in the fused tensor
    schedule = TopicBatches([Corpus("f", texts(16, 1), "t")], [Corpus("r", texts(16, 2), "t")], 4, 4)
    unlearn_model(RMU(RMUConfig(layer_id=1, layer_ids=[0, 1], steering_coeffs=[20.0], alpha=[1.0],
                                lr=1e-2)), model, tok, schedule, seed=0, progress=False)
    for n, p in model.named_parameters():
        moved = (p.detach() != before[n])
        if n.endswith("layers.0.mlp.experts.gate_up_proj") or n.endswith("layers.1.mlp.experts.gate_up_proj"):
            assert moved[0, 48:].any() and not moved[0, :48].any() and not moved[1:].any(), n
        else:
            assert not moved.any(), n


def test_rerun_after_an_interruption_before_any_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)
    real = RMU.loss

    def interrupted(self, step):
        if step.idx == 3:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(RMU, "loss", interrupted)
    assert _run(path, tmp_path / "out", files) == 130  # checkpoints every 50 steps: none yet
    monkeypatch.setattr(RMU, "loss", real)
    assert _run(path, tmp_path / "out", files) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_left_padded_batches_keep_each_rows_positions(tmp_path):
    """GPT-2 has learned absolute positions: a padded row must read as it does alone."""
    from wmdp.layers import forward_to_layer
    from wmdp.unlearn.batches import tokenize, training_tokenizer

    model, tok = _load(save_tiny_model(tmp_path / "g", "gpt2", GPT2_TOK, layers=2))
    model.eval()
    t = training_tokenizer(tok)
    short, long = "a short text", "a much longer text that forces the short one to be padded"
    batch = tokenize(t, [short, long], 64, "cpu")
    alone = tokenize(t, [short], 64, "cpu")
    with torch.no_grad():
        h_batch = forward_to_layer(model, batch, 1)[0]
        h_alone = forward_to_layer(model, alone, 1)[0]
    n = alone["input_ids"].shape[1]
    assert torch.allclose(h_batch[-n:], h_alone, atol=1e-5)


def test_last_step_overflow_writes_no_model(tmp_path, capsys):
    """A finite loss whose update breaks the model on the last step is still caught: one step
    at lr 1e30 leaves whole blocks' weights near 1e30 (finite), and the logits NaN."""
    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)
    out = tmp_path / "out"
    assert _run(path, out, files, "--lr", "1e30", "--max-num-batches", "1",
                "--set", "rmu.params=layers") == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("wmdp:")]
    assert len(err) == 1 and "NaN or infinite" in err[0] and "after step 0" in err[0]
    assert not out.exists() or not any(out.iterdir())  # nothing left behind


def test_rerun_of_a_finished_run_says_so_and_does_nothing(tmp_path, capsys):
    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)
    assert _run(path, tmp_path / "out", files) == 0
    capsys.readouterr()
    before = _dir_digest(tmp_path / "out")
    assert _run(path, tmp_path / "out", files) == 0
    captured = capsys.readouterr()
    assert "finished run; nothing to do" in captured.err and "wrote" not in captured.out
    assert _dir_digest(tmp_path / "out") == before


def test_missing_model_names_the_flag(tmp_path, capsys):
    from wmdp.cli import main

    files = _corpus_files(tmp_path)
    assert main(["unlearn", "rmu", "--output", str(tmp_path / "o"), "--forget-corpora",
                 files["forget_a"], "--retain-corpora", files["retain"]]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_steering_coefficient_count_fails_before_loading(tmp_path, capsys):
    files = _corpus_files(tmp_path)
    out = tmp_path / "out"
    code = _run(tmp_path / "no-such-model", out, files, "--steering-coeffs", "1,2,3")
    assert code == 2
    assert "steering_coeffs has 3 values for 2 forget corpora" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_bfloat16_run_tracks_float32(tmp_path):
    """Every published preset runs in bfloat16: the run completes, saves bfloat16 weights,
    moves only the trained tensors, and its first-step losses (same weights, lower precision)
    are within bfloat16's error of float32's."""
    path = save_tiny_model(tmp_path / "base", "llama", MISTRAL_TOK, layers=4)
    files = _corpus_files(tmp_path)

    def run(dtype):
        out = tmp_path / dtype
        args = [a if a != "float32" else dtype for a in ("--dtype", "float32")]
        assert _run(path, out, files, *args) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(out / "model.safetensors")

    from safetensors.torch import load_file

    rows16, w16 = run("bfloat16")
    rows32, _ = run("float32")
    base = load_file(path / "model.safetensors")
    for key in ("forget_loss", "retain_loss"):
        assert rows16[0][key] == pytest.approx(rows32[0][key], rel=2e-2, abs=1e-3)
    assert all(math.isfinite(r["loss"]) for r in rows16)
    moved = {k for k in w16 if not torch.equal(w16[k].float(), base[k].to(torch.bfloat16).float())}
    assert all(w.dtype == torch.bfloat16 for w in w16.values())
    assert moved == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_raw_hub_corpus_reads_the_repositorys_jsonl_file(tmp_path, monkeypatch):
    import huggingface_hub

    from wmdp.data.corpus import load_corpus

    f = tmp_path / "cyber-forget-corpus.jsonl"
    f.write_text('{"text": "one"}\r\n{"text": "two"}\n', encoding="utf-8")
    asked = []

    def fake_download(repo_id, filename, repo_type=None, **kw):
        asked.append((repo_id, filename, repo_type))
        return str(f)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    corpus = load_corpus("raw:cais/wmdp-corpora:cyber-forget-corpus")
    assert asked == [("cais/wmdp-corpora", "cyber-forget-corpus.jsonl", "dataset")]
    assert corpus.texts == ['{"text": "one"}\n', '{"text": "two"}\n']  # universal newlines
    assert corpus.name == "cyber-forget-corpus"

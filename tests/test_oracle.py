"""The oracle: the sandbox model trained without the forget domains, for as many steps as the
model. It sits at chance on forget facts and at the model's level on general ones; a rerun
resumes it; it can be skipped, and added later to a finished build without touching model/."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from test_sandbox import FIXTURE, TINY, one_thread  # noqa: F401 (autouse: 1 thread)
from wmdp.cli import main
from wmdp.sandbox.build import build_sandbox, fingerprint, sandbox_config
from wmdp.sandbox.data import oracle_texts, training_texts, write_data
from wmdp.sandbox.world import WorldConfig, make_world


def _forget_words(world: dict) -> list[str]:
    """Every forget-domain entity name and attribute value (the world.json view)."""
    return [w for spec in world["domains"].values() if spec["role"] == "forget"
            for w in spec["entities"] + [v for pool in spec["attributes"].values() for v in pool]]


def _mentions(text: str, words: list[str]) -> bool:
    return any(re.search(r"(?<![\w.])" + re.escape(w) + r"(?![\w]|\.\w)", text) for w in words)


# --- what it trains on ---------------------------------------------------------------------


@pytest.mark.parametrize("qa_repeats,letter_variants", [(1, 0), (2, 1)])
def test_oracle_texts_are_the_training_texts_without_any_forget_fact(tmp_path, qa_repeats,
                                                                     letter_variants):
    config = WorldConfig(entities_per_domain=6, attributes_per_domain=2, docs_per_entity=2,
                         values_per_attribute=4, qa_repeats=qa_repeats,
                         letter_variants=letter_variants)
    world = make_world(config, seed=3)
    write_data(world, tmp_path)
    texts, left_out = oracle_texts(world, tmp_path, qa_repeats)
    words = _forget_words(json.loads((tmp_path / "world.json").read_text()))
    # reference: every training text that names no forget entity or value, in the same order
    everything = training_texts(tmp_path, qa_repeats)
    expected = [t for t in everything if not _mentions(t, words)]
    assert texts == expected and len(texts) < len(everything)
    assert not any(_mentions(t, words) for t in texts)
    general = [t for t in everything if "microbe" not in t and "server" not in t]
    assert texts == general  # the general domains' texts, all of them, unchanged
    seen_forget = sum(f.seen for f in world.facts if f.domain in ("bio", "cyber"))
    assert left_out["forget_prose"] == 2 * 6 * 2
    assert left_out["train_qa"] == seen_forget * qa_repeats
    assert left_out.get("train_letter", 0) == seen_forget * letter_variants
    assert len(everything) - len(texts) == sum(left_out.values())


def test_streamed_epochs_are_full_batches_and_each_pass_a_permutation(tmp_path):
    from wmdp.models import load_model
    from wmdp.sandbox.train import ModelConfig, TrainConfig, Trainer

    _, tok = load_model(FIXTURE / "model", dtype="float32", device="cpu")
    texts = [f"text number {i}" for i in range(10)]
    tiny = ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    cfg = TrainConfig(epochs=3, batch_size=4)
    make = lambda spe: Trainer(tiny, cfg, texts, tok, tmp_path, tmp_path, seed=5,  # noqa: E731
                               progress=False, steps_per_epoch=spe)
    # one pass (3 steps of 4, 4, 2): the plain per-epoch shuffle, as before
    plain = make(3)
    assert not plain.streamed and plain.total_steps == 9
    for epoch in range(3):
        g = torch.Generator().manual_seed(5 * 100_003 + epoch)
        assert plain._order(epoch) == torch.randperm(10, generator=g).tolist()
    # 7 steps per epoch: 28 full rows per epoch, read from consecutive shuffles of 10
    streamed = make(7)
    assert streamed.streamed and streamed.total_steps == 21
    stream = [i for e in range(3) for i in streamed._order(e)]
    assert len(stream) == 84
    for p in range(8):
        assert sorted(stream[10 * p:10 * p + 10]) == list(range(10))
    assert all(len(b) == 4 for e in range(3) for b in streamed._batches(e))
    assert stream[:10] == plain._order(0) and stream[10:20] == plain._order(1)
    assert make(7)._order(2) == streamed._order(2)  # a resume reads the same rows


def test_oracle_option_leaves_the_fingerprint_and_the_fixture_alone():
    build = json.loads((FIXTURE / "build.json").read_text())
    assert fingerprint(sandbox_config("small", 0)) == build["fingerprint"]
    off = sandbox_config("small", 0, overrides=["oracle=false"])
    assert off.oracle is False and fingerprint(off) == build["fingerprint"]
    assert fingerprint(sandbox_config("small", 1)) != build["fingerprint"]


# --- the oracle knows the general world and nothing of the forget domains --------------------


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> tuple[Path, dict]:
    """The small preset on 12 epochs instead of 40: the model knows the forget facts (~0.95;
    10 epochs reached only 0.73), in under a minute for both models."""
    out = tmp_path_factory.mktemp("oracle") / "sb"
    config = sandbox_config("small", 0, overrides=["train.epochs=12", "train.eval_every=6"])
    return out, build_sandbox(out, config, progress=False)


def _pooled(acc: dict, names: list[str]) -> tuple[float, int]:
    n = sum(acc[k]["n"] for k in names)
    return sum(acc[k]["acc"] * acc[k]["n"] for k in names) / n, n


def test_oracle_at_chance_on_forget_facts_and_at_the_models_level_on_general(small_build):
    out, manifest = small_build
    model, oracle = manifest["accuracy"], manifest["oracle"]["accuracy"]
    forget = ["sandbox_bio", "sandbox_cyber", "sandbox_bio_seen", "sandbox_cyber_seen"]
    acc, n = _pooled(model, forget)
    assert acc >= 0.8, "the model did not learn the forget domains: the test proves nothing"
    acc, n = _pooled(oracle, forget)
    assert n == 120 and abs(acc - 0.25) <= 3 * math.sqrt(0.25 * 0.75 / n), acc
    for name in ("sandbox_botany", "sandbox_software", "sandbox_geography", "sandbox_general",
                 "sandbox_general_seen"):
        assert model[name]["acc"] >= 0.8, name
        assert oracle[name]["acc"] >= model[name]["acc"] - 0.1, name
    # its own files: the eval results agree with the manifest, the log has every epoch
    results = json.loads((out / "oracle" / "eval" / "results.json").read_text())
    assert results["groups"]["sandbox_forget"]["acc"] == pytest.approx(oracle["sandbox_forget"]["acc"])
    assert {"sandbox_forget", "sandbox_general", "sandbox_letter"} <= set(results["groups"])
    log = [json.loads(x) for x in (out / "oracle" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 13)) and "acc" in log[5] and "acc" in log[11]
    assert not (out / "oracle" / "train" / "checkpoint.pt").exists()


def test_oracle_takes_as_many_steps_as_the_model(small_build):
    out, manifest = small_build
    entry, counts = manifest["oracle"], manifest["counts"]
    assert entry["steps"] == entry["model_steps"] == counts["steps"] == 41 * 12
    log = [json.loads(x) for x in (out / "oracle" / "train" / "log.jsonl").read_text().splitlines()]
    model_log = [json.loads(x) for x in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in model_log]
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in model_log])
    # 650 texts, less 200 forget paragraphs and 60 forget QA lines
    assert entry["training_texts"] == counts["training_texts"] - 260 == 390
    assert entry["passes"] == pytest.approx(41 * 12 * 16 / 390, abs=0.01)
    assert entry["build"]["seconds"] > entry["build"]["train_seconds"] > 0
    on_disk = json.loads((out / "data" / "manifest.json").read_text())
    assert on_disk["oracle"]["accuracy"] == entry["accuracy"]


# --- resume, skip, add later ---------------------------------------------------------------


def test_interrupted_oracle_resumes_to_the_same_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from wmdp.sandbox import train

    cfg = sandbox_config("small", 0, overrides=TINY + ["train.epochs=3"])
    build_sandbox(tmp_path / "whole", cfg, progress=False)
    original = train.Trainer._save

    def save_then_stop(self):
        original(self)
        if self.label == "oracle" and self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_sandbox(tmp_path / "cut", cfg, progress=False)
    assert (tmp_path / "cut" / "oracle" / "train" / "checkpoint.pt").is_file()
    assert (tmp_path / "cut" / "model" / "model.safetensors").is_file()
    monkeypatch.setattr(train.Trainer, "_save", original)
    manifest = build_sandbox(tmp_path / "cut", cfg, progress=False)
    assert manifest["oracle"]["build"]["resumed"]
    whole, cut = (load_file(tmp_path / d / "oracle" / "model" / "model.safetensors")
                  for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    model = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    assert not all(torch.equal(model[k], whole[k]) for k in model)  # not the model, copied
    assert not (tmp_path / "cut" / "oracle" / "train" / "checkpoint.pt").exists()


def test_no_oracle_then_a_rerun_adds_it_without_touching_the_model(capsys, tmp_path):
    out = tmp_path / "sb"
    argv = ["sandbox", "build", "--output", str(out), "--preset", "small", *TINY]
    assert main(argv + ["--no-oracle"]) == 0
    stdout = capsys.readouterr().out
    assert "| forget |" in stdout and "oracle" not in stdout.split("wrote")[0]
    assert not (out / "oracle").exists()
    assert "oracle" not in json.loads((out / "data" / "manifest.json").read_text())
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns

    assert main(argv) == 0  # the same sandbox (same fingerprint): only the oracle is built
    stdout = capsys.readouterr().out
    assert "oracle (trained without the forget domains): forget" in stdout
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert (out / "oracle" / "model" / "model.safetensors").is_file()
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["oracle"]["steps"] == manifest["counts"]["steps"]

    oracle_mtime = (out / "oracle" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0 and main(argv + ["--no-oracle"]) == 0  # nothing rebuilt or removed
    assert (out / "oracle" / "model" / "model.safetensors").stat().st_mtime_ns == oracle_mtime

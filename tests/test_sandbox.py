"""The offline sandbox: a deterministic fictional world, its files in the real formats, a tiny
model that knows it, and `wmdp sandbox build` (refusals, resume, reproducing the fixture)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from wmdp.cli import main
from wmdp.data.corpus import load_corpus
from wmdp.data.mcq import load_mcq_file
from wmdp.sandbox.build import PRESETS, build_sandbox, sandbox_config
from wmdp.sandbox.data import TRAIN_QA, training_texts, write_data
from wmdp.sandbox.world import DENYLIST, make_world
from wmdp.tasks import Registry, build_prompt, PROMPT_STYLES

FIXTURE = Path(__file__).parent / "fixtures" / "sandbox-small"

# A world and model small enough to build end to end in a few seconds.
TINY = ["world.entities_per_domain=4", "world.attributes_per_domain=2", "world.docs_per_entity=2",
        "world.values_per_attribute=4", "vocab_size=300", "model.hidden_size=16",
        "model.intermediate_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "train.epochs=2", "train.batch_size=8",
        "train.warmup_steps=2", "train.eval_every=1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose much on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The small preset's data files (no model), seed 0: what the fixture's data must equal."""
    d = tmp_path_factory.mktemp("small") / "data"
    write_data(make_world(sandbox_config("small", 0).world, 0), d)
    return d


def _losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json"}


# --- the world ---------------------------------------------------------------------------


def test_same_seed_same_files_other_seed_other_world(small_data, tmp_path):
    write_data(make_world(sandbox_config("small", 0).world, 0), tmp_path / "again")
    assert _files(tmp_path / "again") == _files(small_data)
    write_data(make_world(sandbox_config("small", 1).world, 1), tmp_path / "other")
    other = _files(tmp_path / "other")
    assert other.keys() == _files(small_data).keys()
    assert all(other[k] != v for k, v in _files(small_data).items() if k != "tasks.json")


def _stated(data_dir: Path) -> tuple[dict, dict]:
    """(entity, attribute) -> set of values stated anywhere in the training texts, found by
    matching names and pool values in each sentence (independent of the templates)."""
    world = json.loads((data_dir / "world.json").read_text())
    entity_of = {e: d for d, spec in world["domains"].items() for e in spec["entities"]}
    value_of = {v: (d, a) for d, spec in world["domains"].items()
                for a, pool in spec["attributes"].items() for v in pool}
    assert len(value_of) == sum(len(p) for s in world["domains"].values()
                                for p in s["attributes"].values()), "a value sits in two pools"
    find = lambda names, text: [n for n in names if re.search(  # noqa: E731
        r"(?<![\w.])" + re.escape(n) + r"(?![\w]|\.\w)", text)]
    stated: dict[tuple[str, str], set[str]] = defaultdict(set)
    for text in training_texts(data_dir, qa_repeats=1):
        units = [text] if text.startswith("The following") else re.split(r"(?<=\.)\s+", text)
        for unit in units:
            entities, values = find(entity_of, unit), find(value_of, unit)
            assert len(entities) == 1 and len(values) == 1, unit
            domain, attribute = value_of[values[0]]
            assert entity_of[entities[0]] == domain, unit
            stated[entities[0], attribute].add(values[0])
    return world, stated


def test_no_fact_stated_with_two_values(small_data):
    world, stated = _stated(small_data)
    assert all(len(v) == 1 for v in stated.values())
    facts = {(f["entity"], f["attribute"]): f["value"] for f in world["facts"]}
    assert {k: next(iter(v)) for k, v in stated.items()} == facts  # every fact stated, as is


def test_answer_is_the_stated_value_and_distractors_share_its_pool(small_data):
    world, stated = _stated(small_data)
    seen = {(f["entity"], f["attribute"]): f["seen"] for f in world["facts"]}
    for path in sorted(small_data.glob("sandbox_*.jsonl")):
        for item in load_mcq_file(path):
            attribute, kind, entity = re.fullmatch(r"What is the (.+) of the (.+) (\w+)\?",
                                                   item.question).groups()
            assert kind == world["domains"][item.subject]["kind"]
            assert item.choices[item.answer] == next(iter(stated[entity, attribute]))
            pool = world["domains"][item.subject]["attributes"][attribute]
            assert len(set(item.choices)) == 4 and set(item.choices) <= set(pool)
            assert seen[entity, attribute] == path.stem.endswith("_seen")


def test_forget_and_general_domains_share_no_entity(small_data):
    world = json.loads((small_data / "world.json").read_text())
    by_role = defaultdict(set)
    for spec in world["domains"].values():
        by_role[spec["role"]] |= set(spec["entities"])
    assert by_role["forget"] and by_role["general"] and not by_role["forget"] & by_role["general"]
    forget_text = " ".join(t for p in small_data.glob("forget_*.jsonl")
                           for t in load_corpus(p).texts)
    retain_text = " ".join(load_corpus(small_data / "retain.jsonl").texts)
    assert not any(e in retain_text for e in by_role["forget"])
    assert not any(e in forget_text for e in by_role["general"])


def test_held_out_questions_never_appear_in_training(small_data):
    training = "\n".join(training_texts(small_data, qa_repeats=1))
    for path in small_data.glob("sandbox_*.jsonl"):
        for item in load_mcq_file(path):
            assert (item.question in training) == path.stem.endswith("_seen")


def test_names_are_invented_unique_and_never_a_denylisted_real_name():
    for seed in range(3):
        world = make_world(sandbox_config("default", seed).world, seed)
        names = [e for es in world.entities.values() for e in es]
        values = [v for pool in world.pools.values() for v in pool]
        assert len(set(n.lower() for n in names + values)) == len(names + values)
        assert not [w for w in names + values if any(bad in w.lower() for bad in DENYLIST)]


# --- formats, through the evaluator's own loaders -------------------------------------------


def test_files_load_through_the_evaluators_loaders(small_data):
    for name in ("forget_bio.jsonl", "forget_cyber.jsonl", "retain_botany.jsonl",
                 "retain_software.jsonl", "retain_geography.jsonl", "retain.jsonl", TRAIN_QA):
        assert load_corpus(small_data / name).texts
    reg = Registry.build(small_data)
    assert reg.expand(["sandbox_forget"]) == ["sandbox_bio", "sandbox_cyber"]
    assert reg.expand(["sandbox_general"]) == ["sandbox_botany", "sandbox_software",
                                               "sandbox_geography"]
    assert reg.expand(["sandbox_seen"]) == [f"sandbox_{d}_seen" for d in
                                            ("bio", "cyber", "botany", "software", "geography")]
    assert {reg.tasks[t].format for t in reg.expand(["sandbox"])} == {"cloze"}
    assert {reg.tasks[t].format for t in reg.expand(["sandbox_letter"])} == {"letter"}
    assert reg.tasks["sandbox_bio"].topic == reg.tasks["sandbox_botany"].topic == "biology"
    assert reg.tasks["sandbox_cyber"].topic == reg.tasks["sandbox_software"].topic \
        == "computer science"
    # a seen question's cloze prompt is, character for character, what the model trained on
    qa = load_corpus(small_data / TRAIN_QA).texts
    for style in PROMPT_STYLES.values():
        item = reg.tasks["sandbox_bio_seen"].load_items()[0]
        context, conts = build_prompt(item, reg.tasks["sandbox_bio_seen"], style)
        assert context + conts[item.answer] in qa


# --- the fixture ---------------------------------------------------------------------------


def test_fixture_data_is_what_the_build_writes(small_data):
    build = json.loads((FIXTURE / "build.json").read_text())
    assert build["config"]["preset"] == "small" and build["config"]["seed"] == 0
    assert _files(FIXTURE / "data") == _files(small_data)
    manifest = json.loads((FIXTURE / "data" / "manifest.json").read_text())
    assert manifest["fingerprint"] == build["fingerprint"]


def test_fixture_tokenizer_is_reproduced(small_data):
    from wmdp.sandbox.train import train_tokenizer

    cfg = sandbox_config("small", 0)
    tok = train_tokenizer(training_texts(small_data, cfg.world.qa_repeats), cfg.vocab_size)
    assert json.loads(tok.backend_tokenizer.to_str()) == \
        json.loads((FIXTURE / "model" / "tokenizer.json").read_text())


def test_fixture_model_knows_its_world():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wmdp.evaluate import evaluate_model
    from wmdp.models import load_model

    model, tok = load_model(FIXTURE / "model", dtype="float32", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.eos_token and tok.pad_token and tok.pad_token_id != tok.eos_token_id
    AutoModelForCausalLM.from_pretrained(FIXTURE / "model")
    AutoTokenizer.from_pretrained(FIXTURE / "model")
    res = evaluate_model(model, tok, ["sandbox_forget", "sandbox_general", "sandbox_seen"],
                         Registry.build(FIXTURE / "data"), progress=False)
    manifest = json.loads((FIXTURE / "data" / "manifest.json").read_text())
    for name in ("sandbox_forget", "sandbox_general", "sandbox_seen"):
        assert res["groups"][name]["acc"] == pytest.approx(manifest["accuracy"][name]["acc"])
        assert res["groups"][name]["acc"] >= 0.85, name
    assert res["groups"]["sandbox_seen"]["acc"] == 1.0


@pytest.mark.slow
def test_rebuilding_the_small_preset_reproduces_the_fixture(tmp_path):
    """What another processor reproduces: the same data and tokenizer byte for byte (pure
    Python from the seed), training losses within 5% at every epoch (float reductions differ
    across CPUs and thread counts: 2.4% was seen on another machine of the same kind) and every
    task's accuracy within 5 points. Weights are not compared: CPU training is not
    bit-reproducible across processors."""
    cfg = sandbox_config("small", 0, overrides=["oracle=false"])  # the fixture has no oracle
    manifest = build_sandbox(tmp_path / "sb", cfg, progress=False)
    assert _files(tmp_path / "sb" / "data") == _files(FIXTURE / "data")
    assert (tmp_path / "sb" / "model" / "tokenizer.json").read_bytes() == \
        (FIXTURE / "model" / "tokenizer.json").read_bytes()
    log, pinned = (_losses(d / "train" / "log.jsonl") for d in (tmp_path / "sb", FIXTURE))
    assert len(log) == len(pinned) and log == pytest.approx(pinned, rel=0.05)
    fixture = json.loads((FIXTURE / "data" / "manifest.json").read_text())
    for name, r in fixture["accuracy"].items():
        assert manifest["accuracy"][name]["acc"] == pytest.approx(r["acc"], abs=0.05), name


# --- the build and the command -------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_builds_resumes_and_refuses(capsys, tmp_path):
    out = tmp_path / "sb"
    code, stdout, err = run_cli(capsys, "sandbox", "build", "--output", out, "--preset", "small",
                                *TINY)
    assert code == 0, err
    assert "| forget |" in stdout and (out / "model" / "model.safetensors").is_file()
    assert not (out / "train" / "checkpoint.pt").exists()
    log = [json.loads(x) for x in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("sandbox_bio" in r["acc"] for r in log)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"sandbox_forget", "sandbox_general", "sandbox_letter"} <= set(results["groups"])
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["counts"]["facts"] == 5 * 4 * 2 and manifest["seed"] == 0

    # the same command again: already built, nothing changes
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert run_cli(capsys, "sandbox", "build", "--output", out, "--preset", "small", *TINY)[0] == 0
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime

    # another config into it: refused without --overwrite, in one line
    code, _, err = run_cli(capsys, "sandbox", "build", "--output", out, "--preset", "small",
                           "--seed", "1", *TINY)
    assert code == 2 and err.count("\n") == 1 and "different configuration" in err
    assert run_cli(capsys, "sandbox", "build", "--output", out, "--preset", "small", "--seed",
                   "1", "--overwrite", *TINY)[0] == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["seed"] == 1

    # a directory holding something else: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "sandbox", "build", "--output", other, *TINY)
    assert code == 2 and "not empty" in err and (other / "notes.txt").is_file()


def test_wmdp_eval_runs_the_sandbox_tasks(capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", "--model", FIXTURE / "model", "--data-dir",
                             FIXTURE / "data", "--tasks", "sandbox_forget,sandbox_general",
                             "--output", tmp_path / "o")
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(res["groups"]) == {"sandbox_forget", "sandbox_general"}
    bio = res["results"]["sandbox_bio"]
    assert bio["format"] == "cloze" and "acc_norm" in bio


@pytest.mark.parametrize("args,expected", [
    (["world.values_per_attribute=3"], "world.values_per_attribute is 3, expected at least 4"),
    (["world.colour=blue"], "unknown key 'colour'"),
    (["train.epochs=many"], "expected an integer"),
    (["world.seen_fraction=1.0"], "no seen or no held-out entity"),
    (["world.domains=[botany]"], "no hazard-proxy domain"),
])
def test_bad_settings_one_line_exit_2(capsys, tmp_path, args, expected):
    code, _, err = run_cli(capsys, "sandbox", "build", "--output", tmp_path / "o", *args)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_unknown_preset_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["sandbox", "build", "--output", str(tmp_path / "o"), "--preset", "huge"])
    assert e.value.code == 2
    assert set(PRESETS) == {"default", "small"}


def test_interrupted_build_resumes_to_the_same_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from wmdp.sandbox import train

    cfg = sandbox_config("small", 0, overrides=TINY + ["train.epochs=3"])
    build_sandbox(tmp_path / "whole", cfg, progress=False)

    original = train.Trainer._save

    def save_then_stop(self):
        original(self)
        if self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_sandbox(tmp_path / "cut", cfg, progress=False)
    assert (tmp_path / "cut" / "train" / "checkpoint.pt").is_file()
    monkeypatch.setattr(train.Trainer, "_save", original)
    manifest = build_sandbox(tmp_path / "cut", cfg, progress=False)
    assert manifest["build"]["resumed"]
    whole, cut = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    losses = [_losses(tmp_path / d / "train" / "log.jsonl") for d in ("whole", "cut")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]

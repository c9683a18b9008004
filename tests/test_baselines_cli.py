"""The baselines end to end: the command line writes a loadable model and trains only what it is
asked to, every method resumes from its checkpoint to the uninterrupted run's weights, bad
settings are one-line errors that write nothing, and every preset resolves."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import interrupt_loss_at
from test_baselines import FORGET_WORDS, MAXLEN, RETAIN_WORDS, char_model, texts  # noqa: F401
from wmdp.unlearn.registry import METHODS as REGISTRY
from wmdp.unlearn.ssd import SSD

METHODS = ["ga", "graddiff", "npo", "llmu", "scrub", "ssd"]


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


@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "llmu", "scrub"])
def test_resume_after_interruption_gives_the_same_model(tmp_path, char_model, monkeypatch,
                                                        method):
    """Each method at its default optimizer and schedule (a linear warmup and decay for ga,
    graddiff, npo, llmu; SGD with momentum for scrub): stopped after the step-2 checkpoint, the
    rerun computes steps 2 and 3 only and ends at the uninterrupted run's weights."""
    files = _corpora(tmp_path)
    cls = REGISTRY[method][0]
    args = ("--lr", "1e-3", "--set", "checkpoint_every=2")
    assert _run(method, char_model, tmp_path / "whole", files, *args) == 0
    real = cls.loss
    interrupt_loss_at(monkeypatch, cls, 3)
    assert _run(method, char_model, tmp_path / "resumed", files, *args) == 130
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    computed = []

    def recorded(self, step):
        computed.append(step.idx)
        return real(self, step)

    monkeypatch.setattr(cls, "loss", recorded)
    assert _run(method, char_model, tmp_path / "resumed", files, *args) == 0
    assert computed == [2, 3]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in _weights(char_model).items())
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 1, 2, 3]


def test_ssd_rerun_after_interruption_gives_the_same_model(tmp_path, char_model, monkeypatch):
    """SSD is one edit, with no steps to checkpoint: a run stopped midway writes no model, and
    the rerun into the same directory writes the uninterrupted run's."""
    files = _corpora(tmp_path)
    assert _run("ssd", char_model, tmp_path / "whole", files, "--alpha", "2") == 0
    real = SSD.importance

    def interrupted(self, batches, progress=False, desc=""):
        if "retain" in desc:
            raise KeyboardInterrupt
        return real(self, batches, progress, desc)

    monkeypatch.setattr(SSD, "importance", interrupted)
    assert _run("ssd", char_model, tmp_path / "resumed", files, "--alpha", "2") == 130
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(SSD, "importance", real)
    assert _run("ssd", char_model, tmp_path / "resumed", files, "--alpha", "2") == 0
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1


BAD_SETTINGS = [  # (method, flags, the error line)
    ("ga", ["--params", "some"], "params 'some' is not one of mlp_out, mlp, layers, all"),
    ("ga", ["--layer-ids", "1"], "use params=layers"),
    ("ssd", ["--original", "both"], "original 'both' is not 'retain' or 'full'"),
    ("npo", ["--max-length", "-1"], "npo: max_length is -1, expected at least 2 tokens"),
    ("npo", ["--beta", "0"], "npo: beta is 0.0, expected a positive number"),
    ("ga", ["--lr", "nan"], "ga: lr is nan, expected a positive learning rate"),
    ("graddiff", ["--lr-schedule", "cosine"], "graddiff: lr_schedule is 'cosine', expected "
                                              "constant or linear"),
    ("npo", ["--warmup-ratio", "2"], "npo: warmup_ratio is 2.0, expected a fraction"),
    ("llmu", ["--n-random", "0"], "llmu: n_random is 0, expected a positive whole number"),
    ("llmu", ["--weight-decay", "-1"], "llmu: weight_decay is -1.0, expected a number >= 0"),
    ("scrub", ["--temperature", "nan"], "scrub: temperature is nan, expected a positive number"),
    ("scrub", ["--optimizer", "adam"], "scrub: optimizer 'adam' is not one of sgd, adamw"),
    ("scrub", ["--momentum", "1"], "scrub: momentum is 1.0, expected 0 <= momentum < 1"),
    ("ssd", ["--dampening", "-1"], "ssd: dampening is -1.0, expected a positive number"),
]


@pytest.mark.parametrize("method,flags,error", BAD_SETTINGS)
def test_bad_settings_fail_with_one_line(tmp_path, char_model, capsys, method, flags, error):
    files = _corpora(tmp_path)
    assert _run(method, char_model, tmp_path / "out", files, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wmdp: ") and error in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written


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

"""The real hub layouts, offline: wmdp's loaders and its preflight against tests/hub_fixture.py.

    pytest -k real_layout

The fixture serves the repositories the toolkit reads (cais/wmdp with its April 2024 revision,
cais/wmdp-corpora, the gated bio forget corpus, cais/mmlu, Salesforce/wikitext, lm-eval's
wikitext, zephyr-, Yi- and Mixtral-shaped models) from 127.0.0.1 with the hub's file layouts.
Every check runs in a child process whose HF_ENDPOINT points at it, so `huggingface_hub`,
`datasets` and transformers load exactly as they would from the hub: nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_fixture import (GRANTED_TOKEN, MODEL_SHAPES, WMDP_APRIL_2024, WMDP_MARCH_2024,
                         WMDP_SIZES, Hub, build_repos, save_shaped)

ROOT = Path(__file__).resolve().parent.parent
MISTRAL_TOK = Path(__file__).parent / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
ZEPHYR = ROOT / "configs" / "zephyr-7b-rmu.yaml"
WMDP_CLI = [sys.executable, "-m", "wmdp"]


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    models = {r: save_shaped(tmp_path_factory.mktemp(r.split("/")[1]), r, MISTRAL_TOK)
              for r in MODEL_SHAPES}
    server = Hub(build_repos(models))
    yield server
    server.close()


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture
def hub_env(hub, hub_home):
    """A child's environment: the fixture as the hub, online, a token with access."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
               HF_HOME=str(hub_home), HF_TOKEN=GRANTED_TOKEN, NO_PROXY="127.0.0.1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src"))
    hub.hidden.clear()
    hub.replaced.clear()
    yield env
    hub.hidden.clear()
    hub.replaced.clear()


def _python(code: str, env: dict, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rows(hub: Hub, repo: str, path: str, revision: str = "main") -> list[dict]:
    return pq.read_table(io.BytesIO(hub.repos[repo].files(revision)[path])).to_pylist()


def test_real_layout_loaders_read_the_hub_layouts(hub, hub_env, tmp_path):
    """Questions at main and at a pinned revision, every corpus spec the presets use, lm-eval's
    wikitext: through wmdp's own loaders, compared with the fixture's parquet rows."""
    code = f"""
import json
from wmdp.data.corpus import load_corpus
from wmdp.tasks import Registry
out = {{}}
for rev in (None, "{WMDP_MARCH_2024}"):
    reg = Registry.build(data_revision=rev)
    for k in ("bio", "cyber", "chem"):
        items, prov = reg.tasks["wmdp_" + k].load_items_with_provenance()
        out[f"wmdp_{{k}}@{{rev}}"] = [len(items), prov["revision"], items[0].to_dict()]
items = Registry.build().tasks["mmlu_virology"].load_items()
out["mmlu_virology"] = [len(items), items[0].to_dict()]
for spec in ("raw:cais/wmdp-corpora:cyber-forget-corpus", "cais/wmdp-corpora:bio-retain-corpus",
             "cais/wmdp-bio-forget-corpus", "wikitext"):
    c = load_corpus(spec)
    out[spec] = [c.texts, c.source]
c = Registry.build().tasks["wikitext"].load_texts()
out["lmeval_wikitext"] = [len(c.texts), c.source]
print(json.dumps(out))
"""
    out = _python(code, hub_env, tmp_path)
    april = {k: n for k, n in WMDP_SIZES["april"].items()}
    for k in ("bio", "cyber", "chem"):
        n, commit, first = out[f"wmdp_{k}@None"]
        assert (n, commit) == (april[k], WMDP_APRIL_2024)
        row = _rows(hub, "cais/wmdp", f"wmdp-{k}/test-00000-of-00001.parquet")[0]
        assert first == {"question": row["question"], "choices": row["choices"],
                         "answer": row["answer"]}
        n, commit, _ = out[f"wmdp_{k}@{WMDP_MARCH_2024}"]
        assert (n, commit) == (WMDP_SIZES["march"][k], WMDP_MARCH_2024)
    n, first = out["mmlu_virology"]
    row = _rows(hub, "cais/mmlu", "virology/test-00000-of-00001.parquet")[0]
    assert n == 5 and first["choices"] == row["choices"] and first["answer"] == row["answer"]
    # raw: each parquet row as the JSON line the reference's file held
    texts, source = out["raw:cais/wmdp-corpora:cyber-forget-corpus"]
    rows = _rows(hub, "cais/wmdp-corpora", "cyber-forget-corpus/train-00000-of-00001.parquet")
    assert texts == ['{"text": "' + r["text"].replace('"', '\\"') + '"}\n' for r in rows]
    assert "re-encoded as JSON lines" in source and "cyber-forget-corpus" in source
    texts, _ = out["cais/wmdp-corpora:bio-retain-corpus"]  # four shards, in order
    assert texts == [r["text"] for i in range(4) for r in _rows(
        hub, "cais/wmdp-corpora", f"bio-retain-corpus/train-{i:05d}-of-00004.parquet")]
    texts, _ = out["cais/wmdp-bio-forget-corpus"]
    assert texts == [r["text"] for r in _rows(hub, "cais/wmdp-bio-forget-corpus",
                                              "data/train-00000-of-00001.parquet")]
    texts, source = out["wikitext"]
    lines = [r["text"] for r in _rows(hub, "Salesforce/wikitext",
                                       "wikitext-2-raw-v1/test-00000-of-00001.parquet")]
    assert texts == [t for t in lines if t] and source.startswith("hub:Salesforce/wikitext")
    assert out["lmeval_wikitext"][0] == 4


def _run(env: dict, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    done = subprocess.run([*WMDP_CLI, "run", str(ZEPHYR), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - t0


SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "sandbox.yaml")


@pytest.mark.parametrize("config", SHIPPED)
def test_real_layout_shipped_config_preflight_resolves_every_source(config, hub_env, tmp_path):
    """Each shipped config on the fixture: the preflight resolves the pinned WMDP revision, all
    57 MMLU subjects, both forget corpora (the gated one with a granted token) and wikitext, the
    model's config and tokenizer, and records them. These configs are 7B-47B models: CI stops
    after the preflight (the Pipeline is made, no stage runs); `wmdp plan` sizes them."""
    code = f"""
import json
from wmdp.pipeline import Pipeline, load_run_config
cfg = load_run_config("{ROOT / 'configs' / config}", ["output={tmp_path / 'run'}"])
pipe = Pipeline(cfg, progress=False)
print(json.dumps([cfg.model, json.load(open(pipe.dir / "run.json"))["preflight"]]))
"""
    name, record = _python(code, hub_env, tmp_path)
    wmdp = [r for r in record if r.get("hub") == "cais/wmdp"]
    assert {r["config"] for r in wmdp} == {"wmdp-bio", "wmdp-cyber", "wmdp-chem"}
    assert {r["commit"] for r in wmdp} == {WMDP_APRIL_2024}
    assert {r["revision_requested"] for r in wmdp} == {WMDP_APRIL_2024}
    assert len({r["config"] for r in record if r.get("hub") == "cais/mmlu"}) == 57
    corpora = {(r["hub"], r["config"]) for r in record if r.get("source", "").startswith("corpus")}
    assert corpora == {("cais/wmdp-bio-forget-corpus", None),
                       ("cais/wmdp-corpora", "cyber-forget-corpus"),
                       ("Salesforce/wikitext", "wikitext-2-raw-v1")}
    model = next(r for r in record if "model" in r)
    assert name in MODEL_SHAPES and model["model"] == name
    assert model["model_type"] == MODEL_SHAPES[name].get("model_type", "mistral")


BAD_SOURCES = {
    # id: (change to the fixture or the environment, words the one line must hold)
    "wmdp-renamed": ({"hide": "cais/wmdp"}, ["hub:cais/wmdp", "not found on the hub"]),
    "wmdp-revision-gone": ({"set": "eval.data_revision=cais/wmdp@" + "0" * 40},
                           ["cais/wmdp", "revision not found"]),
    "mmlu-malformed": ({"replace": "cais/mmlu/virology/test-00000-of-00001.parquet"},
                       ["cais/mmlu/virology [test]", "no column 'answer'"]),
    "mmlu-subject-removed": ({"hide": "cais/mmlu/virology/test-00000-of-00001.parquet"},
                             ["cais/mmlu", "virology"]),
    "cyber-corpus-removed": ({"hide": "cais/wmdp-corpora/cyber-forget-corpus/"
                                      "train-00000-of-00001.parquet"},
                             ["cais/wmdp-corpora", "cyber-forget-corpus"]),
    "bio-corpus-no-token": ({"token": None}, ["cais/wmdp-bio-forget-corpus", "gated",
                                              "request access", "HF_TOKEN"]),
    "bio-corpus-not-granted": ({"token": "hf_not_granted"},
                               ["cais/wmdp-bio-forget-corpus", "not been granted", "HF_TOKEN"]),
    "wikitext-renamed": ({"hide": "Salesforce/wikitext"}, ["Salesforce/wikitext", "not found"]),
    "model-renamed": ({"hide": "HuggingFaceH4/zephyr-7b-beta"},
                      ["HuggingFaceH4/zephyr-7b-beta", "not found"]),
    "tokenizer-removed": ({"hide": ["HuggingFaceH4/zephyr-7b-beta/tokenizer.json",
                                    "HuggingFaceH4/zephyr-7b-beta/tokenizer.model"]},
                          ["HuggingFaceH4/zephyr-7b-beta", "tokenizer"]),
    "output-taken": ({"output_file": True}, ["output", "--overwrite"]),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_real_layout_bad_source_fails_in_one_line(case, hub, hub_env, tmp_path):
    change, words = BAD_SOURCES[case]
    env, args = dict(hub_env), [f"--set=output={tmp_path / 'run'}"]
    hidden = change.get("hide", [])
    hub.hidden.update([hidden] if isinstance(hidden, str) else hidden)
    if "replace" in change:  # the same file without its `answer` column
        path = change["replace"]
        repo, inner = "cais/mmlu", path[len("cais/mmlu/"):]
        table = pq.read_table(io.BytesIO(hub.repos[repo].files("main")[inner]))
        buf = io.BytesIO()
        pq.write_table(table.drop_columns(["answer"]), buf)
        hub.replaced[path] = buf.getvalue()
    if "set" in change:
        args.append(f"--set={change['set']}")
    if "token" in change:
        env.pop("HF_TOKEN")
        if change["token"]:
            env["HF_TOKEN"] = change["token"]
    if change.get("output_file"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "notes.txt").write_text("a user's file\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done, seconds = _run(env, tmp_path, *args)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    print(f"{case} ({seconds:.1f} s): {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("wmdp: "), done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert seconds < 30
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

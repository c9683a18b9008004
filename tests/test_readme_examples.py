"""README.md's example commands, run as written and in order, in a fresh shell after a stand-in
for `./run.sh`; and the figures README.md and docs/ quote, found in the results files they cite.

The blocks run are the fenced ```bash blocks that follow a marker comment in README.md:

    <!-- example: activate -->     source .venv/bin/activate (puts `wmdp` on PATH)
    <!-- example: sandbox -->      wmdp sandbox path, then wmdp eval on the sandbox
    <!-- example: baselines -->    wmdp unlearn npo, its evaluation, wmdp compare
    <!-- example: audit -->        wmdp audit of the main run's unlearned model

They run in one bash script (`set -e`, each command echoed), in a temporary working directory
that stands in for the clone: its `.venv` is this interpreter's environment, and PATH holds
no directory with a `wmdp` in it and no VIRTUAL_ENV, so `wmdp` is found only once the activate
block has run, as in a new user's shell. The sandbox cache ($XDG_CACHE_HOME) holds the small fixture
under the name the default sandbox has: the small world stands in for the default one (whose
build takes 4 minutes), so every command runs unchanged. The stand-in for `./run.sh` is
`.venv/bin/wmdp run --set audit=null` (the README's main job without its 2-minute audit, which
the audit example runs instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sandbox-small"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKED = re.compile(r"<!-- example: ([\w-]+) -->\s*\n```(?:bash|sh)\n(.*?)```", re.S)
EXPECTED = ["activate", "sandbox", "baselines", "audit"]  # README.md's markers, in order


def readme_examples() -> list[tuple[str, str]]:
    return MARKED.findall(README.read_text(encoding="utf-8"))


def stand_in_sandbox(cache: Path) -> Path:
    """The small fixture where `wmdp run` (the default preset, seed 0) keeps its sandbox,
    recorded as that build, so the run and `wmdp sandbox path` both find it."""
    from wmdp.pipeline import SandboxSection, sandbox_location
    from wmdp.sandbox.build import fingerprint

    config, where = sandbox_location(SandboxSection())
    assert str(where).startswith(str(cache))
    shutil.copytree(FIXTURE, where)
    record = json.loads((where / "build.json").read_text())
    record["fingerprint"] = fingerprint(config)  # recorded as the default build
    (where / "build.json").write_text(json.dumps(record))
    return where


def bash(script: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail -x\n" + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    blocks = readme_examples()
    missing = [name for name in EXPECTED if name not in [n for n, _ in blocks]]
    assert not missing, ("README.md has no marked example block for "
                         + ", ".join(f"<!-- example: {n} -->" for n in missing))
    assert [n for n, _ in blocks if n in EXPECTED] == EXPECTED, "marked blocks out of order"
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    sandbox = stand_in_sandbox(cache)
    assert (Path(sys.prefix) / "bin" / "activate").is_file(), \
        f"the README examples need the suite to run in a virtualenv: {sys.prefix}"
    # a new user's shell: no directory that holds a `wmdp` (this venv's bin among them)
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not (Path(d) / "wmdp").exists()]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update({"XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PATH": os.pathsep.join(path)})
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    assert bash("command -v wmdp", work, env).returncode != 0  # not found until activated
    main_job = bash(".venv/bin/wmdp run --set audit=null", work, env)
    assert main_job.returncode == 0, main_job.stderr[-3000:]
    done = bash("\n".join(code for _, code in blocks), work, env)
    assert done.returncode == 0, f"a README example failed:\n{done.stderr[-3000:]}"

    # `wmdp sandbox path` led every example to the sandbox the main job used
    ev = json.loads((work / "runs" / "sandbox-eval" / "results.json").read_text())
    assert Path(ev["config"]["model"]).resolve() == (sandbox / "model").resolve()
    # the same model and questions as the sandbox build's own evaluation: the same accuracy
    # (another batch size may flip a near-tie: one question of 30 at most)
    built = json.loads((sandbox / "eval" / "results.json").read_text())
    for task in ("sandbox_bio", "sandbox_cyber", "sandbox_geography_seen"):
        assert ev["results"][task]["acc"] == pytest.approx(built["results"][task]["acc"], abs=0.034)
    npo = json.loads((work / "runs" / "npo-eval" / "results.json").read_text())
    assert {"sandbox_forget", "sandbox_general"} <= set(npo["groups"])
    table = (work / "runs" / "compare" / "compare.md").read_text()
    assert "npo-eval" in table and "sandbox" in table
    audit = json.loads((work / "runs" / "audit" / "audit.json").read_text())
    assert set(audit["verdicts"]) == {"probe", "relearn", "gcg", "fewshot", "activations",
                                      "ablation"}


# A figure: a number standing alone, signed or not ("-68.4", "+4.6%", "1,854", "0.35");
# not a digit inside a name ("Rank-0", "Mistral-7B", "h2048").
FIGURE = re.compile(r"(?<![\w.-])[-+]?\d[\d,]*(?:\.\d+)?")
RESULTS_LINK = re.compile(r"\]\(([^)#]*results/[^)#]+\.md)(?:#[^)]*)?\)")


def figures(text: str) -> set[str]:
    return {f.lstrip("+-").replace(",", "") for f in FIGURE.findall(text)}


def units(text: str) -> list[str]:
    """Paragraphs, with each list item on its own."""
    return [u for para in re.split(r"\n\s*\n", text) for u in re.split(r"\n(?=\s*- )", para)]


def test_figures_quoted_are_in_the_results_files_they_cite():
    """A paragraph (or list item) of README.md or docs/*.md that links a file under docs/results/
    quotes only figures that file holds: the results files are the source, never the prose."""
    pages = [README, *sorted(DOCS.glob("*.md"))]
    cited = 0
    for page in pages:
        for unit in units(page.read_text(encoding="utf-8")):
            links = RESULTS_LINK.findall(unit)
            if not links or unit.lstrip().startswith("```"):
                continue
            cited += 1
            held = set().union(*(figures((page.parent / link).read_text(encoding="utf-8"))
                                 for link in links))
            quoted = figures(re.sub(r"\[[^\]]*\]\([^)]*\)", "", unit))  # link targets aside
            assert quoted <= held, (f"{page.relative_to(ROOT)}: {sorted(quoted - held)} not in "
                                    f"{', '.join(links)}:\n{unit}")
    assert cited >= 10  # the check ran on the pages that cite results


def test_readme_tables_are_copies_of_results_tables():
    """Every row of a figures table in README.md is a row of a file under docs/results/."""
    rows = {line for f in (DOCS / "results").glob("*.md")
            for line in f.read_text(encoding="utf-8").splitlines() if line.startswith("|")}
    quoted = [line for line in README.read_text(encoding="utf-8").splitlines()
              if line.startswith("|")  # a row with a cell that is a figure
              and any(re.match(r"[-+]?\d", cell.strip()) for cell in line.strip("|").split("|"))]
    assert len(quoted) >= 10
    assert [r for r in quoted if r not in rows] == []

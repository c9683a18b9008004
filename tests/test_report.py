"""The report and `wmdp compare` read as they should: the paper's table whole, every change with
its delta and the threshold flags, the model card as text, a title that names the model, charts
of the headline groups, a comparison plot that never averages across formats."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from wmdp.compare import run_compare
from wmdp.report import write_report
from wmdp.report_render import markdown_html

ROOT = Path(__file__).resolve().parents[1]
FORGET = ["sandbox_bio", "sandbox_cyber", "sandbox_forget", "sandbox_bio_letter",
          "sandbox_cyber_letter", "sandbox_forget_letter"]
MAIN = ["sandbox_bio", "sandbox_cyber", "sandbox_general", "sandbox_letter"]


class Page(HTMLParser):
    """The tables (class, rows of cell texts, cell classes), the title and the text outside any
    <pre> of an HTML page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.h1, self.text, self.pre = "", [], 0
        self._cell: list[str] | None = None
        self._in_h1 = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"class": a.get("class"), "rows": [], "classes": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
            self.tables[-1]["classes"].append([])
        elif tag in ("td", "th"):
            self._cell = []
            self.tables[-1]["classes"][-1].append(a.get("class") or "")
        elif tag == "pre":
            self.pre += 1
        elif tag == "h1":
            self._in_h1 = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self.pre -= 1
        elif tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h1:
            self.h1 += data
        if not self.pre:
            self.text.append(data)


def _entry(acc: float, n: int, fmt: str) -> dict:
    return {"acc": acc, "acc_stderr": 0.05, "n": n, "format": fmt}


def _results(forget: float, general: float, letter: float, ppl: float, model: str) -> dict:
    """A sandbox-shaped results.json: cloze and letter tasks, their groups, a perplexity task."""
    results, groups = {}, {}
    for suffix, fmt, (f, g) in (("", "cloze", (forget, general)),
                                ("_letter", "letter", (letter, letter))):
        for task, acc in (("bio", f), ("cyber", f - 0.1), ("botany", g), ("software", g - 0.02)):
            results[f"sandbox_{task}{suffix}"] = _entry(acc, 40, fmt)
        for side, (a, b) in (("forget", ("bio", "cyber")), ("general", ("botany", "software"))):
            members = [f"sandbox_{a}{suffix}", f"sandbox_{b}{suffix}"]
            groups[f"sandbox_{side}{suffix}"] = {
                "acc": sum(results[m]["acc"] for m in members) / 2, "acc_stderr": 0.03, "n": 80,
                "members": members}
    groups["sandbox_letter"] = {"acc": letter - 0.05, "acc_stderr": 0.03, "n": 160,
                                "members": ["sandbox_forget_letter", "sandbox_general_letter"]}
    results["ppl_retain"] = {"word_perplexity": ppl, "byte_perplexity": 1.5, "bits_per_byte": 0.5,
                             "token_perplexity": 3.0, "n": 30, "kind": "perplexity"}
    return {"results": results, "groups": groups, "config": {"model": model},
            "fingerprint": "fp"}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(root: Path, ppl_after: float = 12.0, general_after: float = 0.77,
             verdict: str = "probe: the probe reads 0.50 of the answers") -> Path:
    """A finished run of a sandbox model whose cache directory name carries a hash."""
    sandbox = root / "cache" / "small-seed3-0123456789"
    _write(sandbox / "build.json", {"config": {"preset": "small", "seed": 3}})
    model = str(sandbox / "model")
    run = root / "run"
    _write(run / "eval_base" / "results.json", _results(0.9, 0.8, 0.26, 10.0, model))
    _write(run / "eval_unlearned" / "results.json",
           _results(0.3, general_after, 0.25, ppl_after, str(run / "unlearned")))
    _write(run / "unlearned" / "unlearn_config.json", {
        "method": "rmu", "config": {"model": model, "seed": 42, "batch_size": 4},
        "hparams": {"layer_id": 2, "alpha": [100.0]}, "num_steps": 10,
        "corpora": {"forget": [{"source": "forget_bio.jsonl", "n": 5}],
                    "retain": [{"source": "retain.jsonl", "n": 7}]},
        "trained_tensors": ["model.layers.2.mlp.down_proj.weight"]})
    _write(run / "audit" / "audit.json", {"verdicts": {
        "probe": verdict, "relearn": "fine-tuning brings it back to 0.90"}})
    return run


def _report(run: Path, **kw) -> tuple[str, Page]:
    write_report(run, forget=FORGET, near=["sandbox_botany"], main=kw.get("main", MAIN))
    return (run / "report.md").read_text(), Page((run / "report.html").read_text())


def test_main_table_is_the_papers_table_and_secondary_columns_are_apart(tmp_path):
    md, page = _report(make_run(tmp_path))
    main = [t for t in page.tables if t["class"] == "main"]
    assert len(main) == 1
    rows = main[0]["rows"]
    # the letter-format group and perplexity are not in it: the paper's columns only
    assert rows[0] == ["model", "sandbox_bio", "sandbox_cyber", "sandbox_general"]
    assert [r[0] for r in rows[1:]] == ["base", "rmu", "Δ"]
    assert rows[1][1:] == ["90.0", "80.0", "79.0"] and rows[2][1:] == ["30.0", "20.0", "76.0"]
    secondary = page.tables[page.tables.index(main[0]) + 1]["rows"]
    assert secondary[0] == ["model", "sandbox_letter", "ppl_retain (word perplexity)"]
    assert secondary[1][1:] == ["21.0", "10.000"] and secondary[2][1:] == ["20.0", "12.000"]
    # without `main`: the forget tasks, then the top-level general group of the same format
    write_report(tmp_path / "run", forget=["sandbox_bio", "sandbox_cyber"])
    page = Page((tmp_path / "run" / "report.html").read_text())
    head = [t for t in page.tables if t["class"] == "main"][0]["rows"][0]
    assert head == ["model", "sandbox_bio", "sandbox_cyber", "sandbox_general"]


def test_every_change_has_its_delta_and_beyond_the_threshold_is_flagged(tmp_path):
    md, page = _report(make_run(tmp_path, ppl_after=12.0, general_after=0.77))
    main = [t for t in page.tables if t["class"] == "main"][0]
    secondary = page.tables[page.tables.index(main) + 1]
    # hand-computed: bio 90 -> 30, cyber 80 -> 20, general 79 -> 76 (-3 points > 2), letter
    # 21 -> 20, perplexity 10 -> 12 (+20% > 5%)
    assert main["rows"][3] == ["Δ", "-60.0", "-60.0", "-3.0 ⚠"]
    assert main["classes"][3] == ["", "n", "n", "n flag"]  # forget changes are the goal
    assert secondary["rows"][3] == ["Δ", "-1.0", "+20.0% ⚠"]
    assert "flag" in secondary["classes"][3][2]
    assert "| Δ | -60.0 | -60.0 | **-3.0** ⚠ |" in md
    assert "| Δ | -1.0 | **+20.0%** ⚠ |" in md
    assert "falling more than 2.0 points" in md and "rising more than 5%" in md
    for table in page.tables:  # every table with a base and an unlearned row has its change
        for row in table["rows"]:
            if row and row[0] == "Δ":
                assert all(c for c in row), (table["rows"][0], row)
    # +1% perplexity and -1 point general: shown, not flagged
    md, page = _report(make_run(tmp_path / "small", ppl_after=10.1, general_after=0.79))
    main = [t for t in page.tables if t["class"] == "main"][0]
    secondary = page.tables[page.tables.index(main) + 1]
    assert main["rows"][3][-1] == "-1.0" and secondary["rows"][3][-1] == "+1.0%"
    assert "⚠" not in "".join(c for t in page.tables for r in t["rows"] for c in r)


def test_table_numbers_are_recorded_values_or_their_changes(tmp_path):
    run = make_run(tmp_path)
    md, _ = _report(run)
    found = set(re.findall(r"[-+]?\d+\.\d+%?", "\n".join(
        line for line in md.splitlines() if line.startswith("|") and "verdict" not in line
        and not line.startswith(("| probe", "| relearn")))))
    base = json.loads((run / "eval_base" / "results.json").read_text())
    unl = json.loads((run / "eval_unlearned" / "results.json").read_text())
    allowed = set()
    for part in ("results", "groups"):
        for name, b in base[part].items():
            u = unl[part][name]
            for key in ("acc", "acc_stderr"):
                if key in b:
                    allowed |= {f"{100 * b[key]:.1f}", f"{100 * u[key]:.1f}"}
            if "acc" in b:
                allowed.add(f"{100 * (u['acc'] - b['acc']):+.1f}")
            for key in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"):
                if key in b:
                    allowed |= {f"{b[key]:.3f}", f"{u[key]:.3f}",
                                f"{100 * (u[key] / b[key] - 1):+.1f}%"}
    assert found <= allowed, found - allowed


def test_model_card_is_text_not_pre_and_the_title_names_the_model(tmp_path):
    run = make_run(tmp_path)
    _, page = _report(run)
    html = (run / "report.html").read_text()
    assert "<pre" not in html
    text = " ".join("".join(page.text).split())
    card = (run / "unlearned" / "README.md").read_text()
    for line in card.splitlines():
        plain = re.sub(r"^(#+|-) ", "", line.strip()).replace("`", "")
        assert " ".join(plain.split()) in text, line
    assert "<h4>What was removed</h4>" in html and "<li>sandbox_bio (forget): 90.0 -&gt; 30.0</li>" in html
    assert page.h1 == "Unlearning report: rmu on the sandbox model (small preset, seed 3)"
    assert "0123456789" not in page.h1 and card.startswith(
        "# Unlearned model: rmu on the sandbox model (small preset, seed 3)\n")


def test_title_of_a_hub_model(tmp_path):
    run = make_run(tmp_path)
    record = json.loads((run / "unlearned" / "unlearn_config.json").read_text())
    record["config"]["model"] = "HuggingFaceH4/zephyr-7b-beta"
    _write(run / "unlearned" / "unlearn_config.json", record)
    _, page = _report(run)
    assert page.h1 == "Unlearning report: rmu on HuggingFaceH4/zephyr-7b-beta"


@pytest.mark.parametrize("verdict", ["probe: the probe reads 0.50 of the answers",
                                     "the probe reads 0.50 of the answers"])
def test_verdicts_name_the_attack_once(tmp_path, verdict):
    run = make_run(tmp_path, verdict=verdict)
    md, page = _report(run)
    audit = [t for t in page.tables if t["rows"][0] == ["attack", "verdict"]][0]
    assert audit["rows"][1] == ["probe", "the probe reads 0.50 of the answers"]
    card = (run / "unlearned" / "README.md").read_text()
    assert "- probe: the probe reads 0.50 of the answers\n" in card
    assert "probe: probe" not in md and "probe: probe" not in card


def test_charts_show_headline_groups_then_every_task(tmp_path, monkeypatch):
    from wmdp import report_plots

    drawn, real = [], report_plots._hbars

    def spy(names, *args):
        drawn.append(list(names))
        real(names, *args)

    monkeypatch.setattr(report_plots, "_hbars", spy)
    _report(make_run(tmp_path))
    headline, detail = drawn
    # the pure forget and general groups (held-out cloze and letter), not the mixed one
    assert headline == ["sandbox_forget", "sandbox_forget_letter", "sandbox_general",
                        "sandbox_general_letter"]
    assert sorted(detail) == sorted(
        f"sandbox_{t}{s}" for t in ("bio", "cyber", "botany", "software") for s in ("", "_letter"))


def test_markdown_html_renders_headings_lists_tables_and_paragraphs():
    text = ("# Card\n\nSome `code` and\n**bold** text.\n\n## Part\n- one\n- two <b>\n\n"
            "| a | b |\n|---|---:|\n| 1 | x_y |\n")
    assert markdown_html(text, shift=2) == (
        "<h3>Card</h3>\n<p>Some <code>code</code> and <strong>bold</strong> text.</p>\n"
        "<h4>Part</h4>\n<ul><li>one</li><li>two &lt;b&gt;</li></ul>\n"
        '<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td class="n">1</td>'
        "<td>x_y</td></tr></tbody></table>")


# -- wmdp compare ---------------------------------------------------------------------------------
def _cells(block: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| ")]


def test_compare_plots_the_headline_groups_and_prints_table_1_first(tmp_path):
    run = make_run(tmp_path)
    other = tmp_path / "ga-eval"
    _write(other / "results.json", _results(0.5, 0.7, 0.25, 11.0, "somewhere"))
    table = run_compare([run, other], output=tmp_path / "cmp")
    rows = {r["label"]: r for r in table["rows"]}
    # the held-out cloze groups, never their mean with the letter groups (which sit at chance)
    assert rows["base"]["forget_acc"] == pytest.approx(0.85)   # sandbox_forget: (0.9 + 0.8) / 2
    assert rows["base"]["general_acc"] == pytest.approx(0.79)  # sandbox_general: (0.8 + 0.78) / 2
    assert rows["run"]["forget_acc"] == pytest.approx(0.25)
    first, rest = table["markdown"].split("\nEvery other column:")
    cells = _cells(first)
    assert cells[0] == ["run", "method", "sandbox_bio", "sandbox_cyber", "sandbox_general"]
    assert cells[1:] == [["base", "base", "90.0", "80.0", "79.0"],
                         ["run", "rmu", "30.0", "20.0", "76.0"],
                         ["Δ run", "vs base", "-60.0", "-60.0", "-3.0"],
                         ["ga-eval", "base", "50.0", "40.0", "69.0"]]
    rest_cells = _cells(rest)
    assert rest_cells[0] == ["column", "side", "base", "run", "ga-eval"]
    assert ["sandbox_forget_letter", "forget", "21.0", "20.0", "20.0"] in rest_cells
    assert ["ppl_retain (word_perplexity)", "perplexity", "10.00", "12.00", "11.00"] in rest_cells
    assert max(len(r) for r in cells) <= 5  # narrow enough for a terminal


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="needs Chromium")
def test_screenshot_captures_the_whole_page(tmp_path):
    from PIL import Image

    run = make_run(tmp_path)
    _report(run)
    html = (run / "report.html").read_text()
    # a page far taller than one window: the card's last line must still be in the picture
    filler = "".join(f"<p>paragraph {i}</p>" for i in range(400))
    (run / "report.html").write_text(html.replace("<h2>Model card</h2>",
                                                  filler + "<h2>Model card</h2>"))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(run), "900",
                          str(tmp_path / "shot.png")], capture_output=True, text=True, check=True)
    height = int(re.search(r"900x(\d+) px", out.stdout).group(1))
    img = Image.open(tmp_path / "shot.png").convert("L")
    assert img.size == (900, height) and height > 10_000
    # the card's last item sits near the bottom: non-white pixels in the last 300 px
    bottom = img.crop((0, height - 300, 900, height))
    assert bottom.getextrema()[0] < 128


def test_screenshot_without_a_report_is_one_line(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("wmdp: ") and "no report" in out.stderr

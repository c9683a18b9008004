"""Rendering for the report: blocks that become Markdown and one self-contained HTML page.

    doc = Doc("title"); doc.table(["task", "Δ"], [["wmdp_bio", Flagged("-3.1")]])
    doc.markdown(run_dir), doc.html()

`Flagged` marks a cell beyond a stated threshold (bold and ⚠ in Markdown, a highlighted cell in
HTML) and carries one sentence saying which threshold it crossed and what that means; the
sentences follow their table. Task ids never wrap in HTML (a `td.id`/`th.id` does not break at
underscores). `markdown_html` turns the small Markdown the model card uses (headings, paragraphs, `-`
lists, pipe tables, `code`, **bold**) into HTML, so the card reads as text, not as a `<pre>`.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

E = html.escape


class Flagged(str):
    """A table cell whose change is beyond the report's threshold; `why` is one sentence: the
    threshold it crossed and what that means."""

    why: str

    def __new__(cls, text: str, why: str = "") -> Flagged:
        cell = super().__new__(cls, text)
        cell.why = why
        return cell


def flag_notes(rows: list[list[str]]) -> list[str]:
    """The sentences of a table's flagged cells, each once, in table order."""
    return list(dict.fromkeys(f"⚠ {c.why}" for r in rows for c in r
                              if isinstance(c, Flagged) and c.why))


@dataclass
class Doc:
    """Blocks of a report: (kind, payload); rendered to Markdown and HTML alike."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str], box: bool = False) -> None:
        """A bulleted list (`box`: set apart, as the summary is)."""
        self.blocks.append(("ul", (items, box)))

    def table(self, header: list[str], rows: list[list[str]], main: bool = False) -> None:
        """A table, then one sentence per flagged cell (its threshold and what it means) that
        no earlier table gave."""
        self.blocks.append(("table", (header, rows, main)))
        for note in flag_notes(rows):
            if ("p", note) not in self.blocks:
                self.p(note)

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def md(self, text: str) -> None:
        """Markdown text (the model card), its headings shown two levels down."""
        self.blocks.append(("md", text))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, x in self.blocks:
            if kind == "h2":
                out += [f"## {x}", ""]
            elif kind == "p":
                out += [x, ""]
            elif kind == "ul":
                out += [f"- {i}" for i in x[0]] + [""]
            elif kind == "table":
                header, rows, _ = x
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---:" if _numeric_column(rows, i) else "---"
                                          for i in range(len(header))) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                path, caption = x
                out += [f"![{caption}]({path.relative_to(root).as_posix()})", ""]
            elif kind == "md":
                out += [re.sub(r"^(#+) ", r"##\1 ", x, flags=re.M), ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{E(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{E(x)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(x)}</p>")
            elif kind == "ul":
                items, box = x
                ul = "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>"
                body.append(f'<div class="summary">{ul}</div>' if box else ul)
            elif kind == "table":
                body.append(_table_html(*x))
            elif kind == "img":
                path, caption = x
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img alt="{E(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{E(caption)}</figcaption></figure>")
            elif kind == "md":
                body.append('<div class="card">' + markdown_html(x, shift=2) + "</div>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{E(self.title)}</title><style>{STYLE}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


# Tables are never wider than the page: text cells wrap at spaces, task ids (.id) never wrap
# (a wrap at an underscore read as two names), and no table scrolls sideways (a scroll bar hid
# the main table's last columns at 1,100 px).
STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;"
         "color:#222;line-height:1.4}table{border-collapse:collapse;margin:1em 0;max-width:100%}"
         "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;overflow-wrap:break-word}"
         "td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
         ".id{white-space:nowrap}th .side{font-weight:normal;color:#555}"
         ".summary{background:#f6f8fa;border:1px solid #ddd;padding:.2em 1em;margin:1em 0}"
         ".meta{color:#555;font-size:90%}"
         "th{background:#f3f3f3}table.main{font-size:110%}table.main td.n{min-width:4em}"
         "td.flag{background:#fde2c8;font-weight:bold}"
         "img{max-width:100%}figcaption{color:#555;font-size:90%}"
         ".card{border-left:4px solid #ddd;padding:0 1em}code{background:#f3f3f3;padding:0 2px;"
         "overflow-wrap:anywhere}")


def _md_cell(c: str) -> str:
    return f"**{c}** ⚠" if isinstance(c, Flagged) else c


def _table_html(header: list[str], rows: list[list[str]], main: bool) -> str:
    def cell(c: str) -> str:
        cls = ("n " if _numeric(c) else "") + ("id " if _task_id(c) else "") + \
            ("flag" if isinstance(c, Flagged) else "")
        text = E(c) + (" ⚠" if isinstance(c, Flagged) else "")
        return f'<td class="{cls.strip()}">{text}</td>' if cls else f"<td>{text}</td>"

    head = "".join(_th(h) for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    cls = ' class="main"' if main else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _task_id(text: str) -> bool:
    """A task or group id (`sandbox_bio_letter`, `wmdp_bio`): one word with an underscore."""
    return "_" in text and re.fullmatch(r"[\w.\-/]+", text) is not None


def _th(h: str) -> str:
    """A header cell; "task_id (side)" keeps the id whole and its side on a line of its own."""
    m = re.fullmatch(r"([\w.\-/]+) (\(.*\))", h)
    if m and _task_id(m.group(1)):
        return (f'<th><span class="id">{E(m.group(1))}</span><br>'
                f'<span class="side">{E(m.group(2))}</span></th>')
    return f'<th class="id">{E(h)}</th>' if _task_id(h) else f"<th>{E(h)}</th>"


def _numeric_column(rows: list[list[str]], i: int) -> bool:
    """Right-align a column (after the first) whose filled cells are all figures."""
    cells = [r[i] for r in rows if i < len(r) and r[i]]
    return i > 0 and bool(cells) and all(_numeric(c) for c in cells)


def _numeric(text: str) -> bool:
    """A number, a percentage, "n/a", or numbers joined by → and parentheses ("30.0 → 54.0",
    "3.100 (3.000)"): right-aligned, so figures line up down a column."""
    parts = text.replace("→", " ").replace("(", " ").replace(")", " ").split()
    if not parts:
        return False
    try:
        for part in parts:
            if part != "n/a":
                float(part.rstrip("%"))
        return True
    except ValueError:
        return False


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** spans, as Markdown shows them."""
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", E(text, quote=False))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def markdown_html(text: str, shift: int = 0) -> str:
    """The Markdown of a model card as HTML: headings (`shift` levels down), paragraphs,
    `-`/`*` lists, pipe tables; blank lines separate blocks."""
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            out.append(_table_html(head, body, False))
        para.clear(), items.clear(), rows.clear()

    for line in text.splitlines():
        s = line.strip()
        heading = re.match(r"(#{1,6}) +(.*)", s)
        if not s or heading or (s.startswith(("- ", "* ")) and para) or \
                (s.startswith("|") != bool(rows)):
            flush()
        if heading:
            level = min(6, len(heading.group(1)) + shift)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif s.startswith(("- ", "* ")):
            items.append(s[2:])
        elif s.startswith("|"):
            rows.append([c.strip() for c in s.strip("|").split("|")])
        elif s and items:  # a continuation line of the last list item
            items[-1] += " " + s
        elif s:
            para.append(s)
    flush()
    return "\n".join(out)


__all__ = ["Doc", "Flagged", "flag_notes", "markdown_html"]

"""Text corpora: forget and retain sets for unlearning, text for perplexity and relearning.

A corpus spec is one of:
- a local `.jsonl` file with a `text` field per line (the WMDP corpora layout), or a `.txt`
  file (one text per non-empty line);
- `wikitext`: wikitext-2-raw-v1, split `test` (the paper's retain set), one text per line, read
  from `Salesforce/wikitext` (the hub's canonical id: huggingface_hub 2.x no longer accepts the
  bare `wikitext` that the hub redirects);
- a hub dataset with a `text` column: `org/name`, `org/name:config`, `org/name:config@split`
  (split defaults to `train`), e.g. `cais/wmdp-corpora:cyber-forget-corpus`.

- `raw:FILE.jsonl` or `raw:org/name:config`: each line of the JSONL file as it stands, the JSON
  text with its braces and its newline, not the decoded `text`. The RMU reference reads every
  corpus not named `bio-forget-corpus` this way (`raw_text = line`), so the published zephyr,
  Yi and Mixtral runs trained on the cyber forget corpus's raw lines; the published presets say
  `raw:` to reproduce them. A hub spec reads the repository's `<config>.jsonl` where it holds
  one (a mirror of the reference's files). The hub's `cais/wmdp-corpora` does not: it holds one
  folder of parquet files per config (column `text`), no `.jsonl`. Then a hub spec reads the
  parquet rows and re-encodes each as the line the reference's file held, `json.dumps(row) +
  "\n"` (`{"text": "..."}`, Python's default separators, non-ASCII as `\\uXXXX`). That equals
  the reference's line wherever its file was written the same way; a file written otherwise
  (other escapes, key order or extra keys) differs in those characters, and so in the texts'
  lengths, the `min_len` filter and the tokens. For the exact lines, give the reference's own
  file: `raw:PATH/cyber-forget-corpus.jsonl`. The corpus's `source` (in every run record) says
  which of the two was read.

Texts of `min_len` characters or fewer are dropped, as the RMU reference code does (for raw
lines: the line's length, newline included, as the reference measures it).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from wmdp.data.hub import hub_error, hub_where, read_hub_split
from wmdp.errors import DataError, WmdpError
from wmdp.io import jsonl_records, read_text, sha256_json

RAW = "raw:"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")  # the paper's retain text
RAW_ENCODING = "json.dumps(row) + newline"  # how `raw:` re-encodes a hub row as a JSON line


@dataclass
class Corpus:
    name: str
    texts: list[str]
    source: str
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = sha256_json(self.texts)

    def record(self) -> dict:
        return {"name": self.name, "source": self.source, "n": len(self.texts),
                "sha256": self.sha256}


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`org/name[:config][@split]` -> (dataset, config, split)."""
    rest, _, split = spec.partition("@")
    dataset, _, config = rest.partition(":")
    return dataset, config or None, split or "train"


def load_corpus(spec: str | Path, min_len: int = 0, limit: int | None = None,
                text_field: str = "text") -> Corpus:
    """Load a corpus by spec, dropping texts of at most `min_len` characters.

    `text_field` names the column of a hub dataset that holds the text (`page` for
    EleutherAI/wikitext_document_level)."""
    spec = str(spec)
    hub = hub_corpus_location(spec, text_field)
    if hub is not None:
        texts, name, source = _hub_texts(spec, *hub)
    elif spec.startswith(RAW):
        texts, name, source = _raw_lines(Path(spec[len(RAW):]).expanduser())
    else:
        path = Path(spec).expanduser()
        texts, name, source = _file_texts(path), path.stem, str(path)
    texts = [t for t in texts if len(t) > min_len]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise WmdpError(f"{spec}: corpus has no text longer than min_len={min_len} characters")
    return Corpus(name, texts, source)


def hub_corpus_location(spec: str | Path, text_field: str = "text"
                        ) -> tuple[str, str | None, str, str, bool] | None:
    """Where a corpus spec reads from the hub: (dataset, config, split, column, raw), or None
    for a local file (`corpus_file`). The preflight resolves exactly these."""
    spec = str(spec)
    if corpus_file(spec) is not None:
        return None
    raw = spec.startswith(RAW)
    inner = spec[len(RAW):] if raw else spec
    if inner == "wikitext":
        return (*WIKITEXT, "text", raw)
    dataset, config, split = parse_hub_spec(inner)
    return dataset, config, split, text_field, raw


def corpus_file(spec: str | Path) -> Path | None:
    """The local file a corpus spec reads, with or without `raw:`, by `load_corpus`'s rules;
    None for `wikitext` and hub datasets. What a command keeps apart from its outputs."""
    spec = str(spec)
    inner = spec[len(RAW):] if spec.startswith(RAW) else spec
    if inner == "wikitext" and inner == spec:
        return None
    path = Path(inner).expanduser()
    if (path.exists() or path.suffix.lower() in (".jsonl", ".txt")
            or inner.startswith((".", "~", "/"))):
        return path
    return None


def _raw_lines(path: Path) -> tuple[list[str], str, str]:
    """The reference's `for line in open(f"data/{name}.jsonl")`: universal newlines, each line
    kept whole with its newline (a blank line is the text "\n")."""
    if not path.is_file():
        raise WmdpError(f"{path}: corpus file not found")
    lines = list(io.StringIO(read_text(path), newline=None))  # as text-mode open() iterates
    if not lines:
        raise DataError(path, "file is empty (no texts)")
    return lines, path.stem, f"raw lines of {path}"


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise WmdpError(f"{path}: corpus file not found")
    if path.suffix.lower() == ".txt":
        return [line.rstrip("\n") for line in read_text(path).splitlines() if line.strip()]
    texts = []
    for lineno, rec in jsonl_records(path):
        if not isinstance(rec, dict) or "text" not in rec:
            raise DataError(path, "is missing", lineno, "text")
        if not isinstance(rec["text"], str):
            raise DataError(path, f"is {type(rec['text']).__name__}, expected a string",
                            lineno, "text")
        texts.append(rec["text"])
    if not texts:
        raise DataError(path, "file is empty (no texts)")
    return texts


def _hub_texts(spec: str, dataset: str, config: str | None, split: str, column: str,
               raw: bool) -> tuple[list[str], str, str]:
    """A hub split's `column`, or (raw) the repository's `<config>.jsonl` lines where it holds
    one (the reference's file), else each row re-encoded as the reference's JSON line."""
    fix = "download the corpus and give a local .jsonl file"
    name = config or dataset.split("/")[-1]
    if raw and (path := _hub_jsonl(dataset, f"{name}.jsonl", spec, fix)) is not None:
        return _raw_lines(path)[0], name, f"raw lines of hub:{dataset}/{name}.jsonl"
    ds, commit = read_hub_split(dataset, config, split, None, fix)
    where = hub_where(dataset, config, split)
    if column not in ds.column_names:
        raise WmdpError(f"{spec} ({where}): dataset has no {column!r} column "
                        f"(columns: {ds.column_names})")
    at = f" @{commit}" if commit else ""
    if raw:
        lines = [json.dumps(row) + "\n" for row in ds]
        return lines, name, (f"raw: rows of {where}{at} re-encoded as JSON lines "
                             f"({RAW_ENCODING}); the hub serves no raw .jsonl")
    return [str(t) for t in ds[column]], name, where + at


def _hub_jsonl(dataset: str, filename: str, spec: str, fix: str) -> Path | None:
    """The repository's raw JSON lines file, or None where it holds none (the hub's
    cais/wmdp-corpora does not: one folder of parquet files per config)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(dataset, filename, repo_type="dataset"))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except Exception as e:  # noqa: BLE001 - gated, renamed, network
        raise hub_error(f"{spec} (hub:{dataset}/{filename})", dataset, e, fix) from e

"""Text corpora: forget and retain sets for unlearning, text for perplexity and relearning.

A corpus spec is one of:
- a local `.jsonl` file with a `text` field per line (the WMDP corpora layout), or a `.txt`
  file (one text per non-empty line);
- `wikitext`: wikitext-2-raw-v1, split `test` (the paper's retain set), one text per line;
- a hub dataset with a `text` column: `org/name`, `org/name:config`, `org/name:config@split`
  (split defaults to `train`), e.g. `cais/wmdp-corpora:cyber-forget-corpus`.

- `raw:FILE.jsonl` or `raw:org/name:config`: each line of the JSONL file as it stands, the JSON
  text with its braces and its newline, not the decoded `text`. The RMU reference reads every
  corpus not named `bio-forget-corpus` this way (`raw_text = line`), so the published zephyr,
  Yi and Mixtral runs trained on the cyber forget corpus's raw lines; the published presets say
  `raw:` to reproduce them. A hub spec reads the dataset repository's `<config>.jsonl` file (the
  file the reference's `data/` holds), not the parsed rows.

Texts of `min_len` characters or fewer are dropped, as the RMU reference code does (for raw
lines: the line's length, newline included, as the reference measures it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from wmdp.errors import DataError, WmdpError
from wmdp.io import jsonl_records, read_text, sha256_json


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
    path = Path(spec).expanduser()
    if spec.startswith(RAW):
        texts, name, source = _raw_lines(spec[len(RAW):], spec)
    elif spec == "wikitext":
        texts = _hub_texts("wikitext", "wikitext-2-raw-v1", "test", spec)
        name, source = "wikitext", "hub:wikitext/wikitext-2-raw-v1 [test]"
    elif path.suffix.lower() in (".jsonl", ".txt") or path.exists():
        texts = _file_texts(path)
        name, source = path.stem, str(path)
    else:
        dataset, config, split = parse_hub_spec(spec)
        texts = _hub_texts(dataset, config, split, spec, text_field)
        name, source = (config or dataset.split("/")[-1]), f"hub:{spec}"
    texts = [t for t in texts if len(t) > min_len]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise WmdpError(f"{spec}: corpus has no text longer than min_len={min_len} characters")
    return Corpus(name, texts, source)


RAW = "raw:"


def _raw_lines(inner: str, spec: str) -> tuple[list[str], str, str]:
    """The reference's `for line in open(f"data/{name}.jsonl")`: universal newlines, each line
    kept whole with its newline (a blank line is the text "\n")."""
    path = Path(inner).expanduser()
    if path.is_file():
        name, source = path.stem, f"raw lines of {path}"
    elif path.suffix.lower() == ".jsonl" or inner.startswith((".", "~", "/")):
        raise WmdpError(f"{inner}: corpus file not found")
    else:
        dataset, config, _ = parse_hub_spec(inner)
        filename = f"{config or dataset.split('/')[-1]}.jsonl"
        path = _hub_file(dataset, filename, spec)
        name, source = filename[:-len(".jsonl")], f"raw lines of hub:{dataset}/{filename}"
    lines = list(io.StringIO(read_text(path), newline=None))  # as text-mode open() iterates
    if not lines:
        raise DataError(path, "file is empty (no texts)")
    return lines, name, source


def _hub_file(dataset: str, filename: str, spec: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(dataset, filename, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - network, auth and missing files alike
        raise WmdpError(f"{spec}: cannot fetch {filename} from the hub dataset {dataset} "
                        f"({str(e).strip().splitlines()[0][:200]}); download it and give "
                        f"raw:PATH/{filename}") from e


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


def _hub_texts(dataset: str, config: str | None, split: str, spec: str,
               text_field: str = "text") -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth and gating errors alike
        raise WmdpError(f"{spec}: cannot load corpus from the hub "
                        f"({str(e).strip().splitlines()[0][:300]})") from e
    if text_field not in ds.column_names:
        raise WmdpError(f"{spec}: dataset has no {text_field!r} column (columns: {ds.column_names})")
    return [str(t) for t in ds[text_field]]

"""Files on disk: atomic writes, output directories, content hashes, the run record."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from wmdp.errors import WmdpError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a JSONL file; bad JSON is a
    DataError naming the line."""
    from wmdp.errors import DataError

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg})", lineno) from None


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode()).hexdigest()


def prepare_output_dir(path: str | Path, overwrite: bool, resumable_marker: str | None = None,
                       expected: dict | None = None) -> Path:
    """Make `path` ready to write into, refusing to clobber what a user had.

    - missing or empty: created;
    - holds `resumable_marker` (a JSON file) whose "fingerprint" equals `expected`: kept,
      so the caller can resume;
    - anything else: refused unless `overwrite`, in which case it is emptied.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WmdpError(f"{path}: output path exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        marker = path / resumable_marker if resumable_marker else None
        if not overwrite and marker is not None and marker.is_file() and expected is not None:
            try:
                found = read_json(marker).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                found = None
            if found == expected:
                return path
            raise WmdpError(f"{path}: output directory holds a run with a different configuration "
                            "(use --overwrite to replace it, or another --output)")
        if not overwrite:
            raise WmdpError(f"{path}: output directory exists and is not empty "
                            "(use --overwrite to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a number."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("wmdp", "torch", "transformers", "tokenizers", "datasets", "accelerate",
                 "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return out

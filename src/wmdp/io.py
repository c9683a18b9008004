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
from typing import Any, Iterable, Iterator, Mapping, Tuple, Union

from wmdp.errors import DataError, WmdpError


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


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; any other encoding is a DataError naming the file and the
    line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8", line) from None


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a JSONL file; bad JSON or bytes
    that are not UTF-8 are a DataError naming the line."""
    with open(path, "rb") as f:  # bytes, decoded per line: streams, and names the bad line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                                "save the file as UTF-8", lineno) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg})", lineno) from None


def read_json(path: str | Path) -> Any:
    """Parsed JSON; a file that is not UTF-8 is a DataError (json.JSONDecodeError, a
    ValueError, stays as it was for callers that catch it)."""
    return json.loads(read_text(path))


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


Inputs = Union[Mapping[str, "str | Path | None"], Iterable[Tuple[str, "str | Path | None"]]]


def check_apart(output: str | Path, inputs: Inputs) -> None:
    """Refuse an output directory that is, holds or lies inside a local input.

    `inputs`: {what (e.g. "--model"): path or hub id}. Only inputs that exist on disk count (a
    hub id is not a path); symlinks are resolved, so a link to the model is the model. Writing
    (or `--overwrite` emptying) such an output would destroy what the command reads.
    """
    out = Path(output).expanduser().resolve()
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    for what, source in pairs:
        if source is None or str(source) == "" or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        relation = ("is" if out == src else "holds" if out in src.parents
                    else "lies inside" if src in out.parents else None)
        if relation is not None:
            raise WmdpError(f"{output}: the output directory {relation} the input {source} "
                            f"({what}); choose another output directory")


def _lock_dir() -> Path:
    # outside every output directory: a finished output holds only its files, a failed run
    # leaves nothing behind, and --overwrite never deletes a lock another run holds
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "wmdp" / "locks"


_HELD: dict[str, Any] = {}  # resolved output dir -> its FileLock, held by this process


def lock_output_dir(path: str | Path) -> None:
    """Hold an exclusive lock on `path` until `release_output_locks()` (or process exit).

    An OS lock (flock): a run that is killed releases it, so a stale lock never blocks. A second
    process locking the same directory fails at once; this process may lock it again (the
    pipeline's stages write inside directories it already holds).
    """
    from filelock import FileLock, Timeout

    key = str(Path(path).expanduser().resolve())
    if key in _HELD:
        return
    lock_dir = _lock_dir()
    lock_file = lock_dir / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file), timeout=0)
        lock.acquire()
    except Timeout:
        raise WmdpError(f"{path}: another wmdp run is writing this directory "
                        f"(lock {lock_file})") from None
    except OSError as e:
        raise WmdpError(f"{lock_file}: cannot create the output lock ({e.strerror or e})") from None
    _HELD[key] = lock


def release_output_locks() -> None:
    """Release every output lock this process holds (the command line calls it at the end)."""
    while _HELD:
        _, lock = _HELD.popitem()
        lock.release()


def _check_writable(path: Path) -> None:
    """A one-line error now rather than a traceback at the first write (read-only directory,
    read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".wmdp-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WmdpError(f"{path}: output directory is not writable ({e.strerror or e})") from None


def prepare_output_dir(path: str | Path, overwrite: bool, resumable_marker: str | None = None,
                       expected: dict | None = None, *, inputs: Inputs = ()) -> Path:
    """Make `path` ready to write into, refusing to clobber what a user had.

    - an output that is, holds or lies inside one of `inputs`: refused, nothing touched;
    - locked for this process (see `lock_output_dir`) before anything is read or removed;
    - missing or empty: created;
    - holds `resumable_marker` (a JSON file) whose "fingerprint" equals `expected`: kept,
      so the caller can resume;
    - anything else: refused unless `overwrite`, in which case it is emptied.
    """
    check_apart(path, inputs)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WmdpError(f"{path}: output path exists and is not a directory")
    lock_output_dir(path)
    if path.is_dir() and any(path.iterdir()):
        marker = path / resumable_marker if resumable_marker else None
        if not overwrite and marker is not None and marker.is_file() and expected is not None:
            try:
                found = read_json(marker).get("fingerprint")
            except (OSError, ValueError, AttributeError, WmdpError):
                found = None
            if found == expected:
                _check_writable(path)
                return path
            raise WmdpError(f"{path}: output directory holds a run with a different configuration "
                            "(use --overwrite to replace it, or another --output)")
        if not overwrite:
            raise WmdpError(f"{path}: output directory exists and is not empty "
                            "(use --overwrite to replace it)")
        _check_writable(path)  # before deleting: never half-empty a directory we cannot refill
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise WmdpError(f"{path}: cannot empty the output directory ({e.strerror or e})") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WmdpError(f"{path}: cannot create the output directory ({e.strerror or e})") from None
    _check_writable(path)
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

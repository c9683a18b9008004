"""Files on disk: atomic writes, output directories, content hashes, the run record."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Tuple, Union

from wmdp.errors import DataError, WmdpError


def umask() -> int:
    """The process's umask (Linux reads it without changing it; elsewhere set and restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, then rename.

    The file gets the mode a plain `open(path, "w")` gives (0644 under umask 022), not the
    temp file's 0600. A failed write (disk full, read-only directory) is a WmdpError naming
    `path`, and leaves `path` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WmdpError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WmdpError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def give_umask_mode(directory: str | Path) -> None:
    """Give every file in `directory` (not below) the mode `open()` gives under the umask:
    safetensors writes weights 0600 whatever the umask, which a colleague cannot read."""
    mode = 0o666 & ~umask()
    for f in Path(directory).iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


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
            except RecursionError:
                raise DataError(path, TOO_DEEP, lineno) from None


TOO_DEEP = "JSON nested too deeply to read (over Python's recursion limit)"


def read_json(path: str | Path) -> Any:
    """Parsed JSON; a file that is not UTF-8, or nested deeper than Python can parse, is a
    DataError (json.JSONDecodeError, a ValueError, stays as it was for callers that catch it)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(path, TOO_DEEP) from None


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


def _locations(path: Path) -> list[Path]:
    """Where `path` is: through every symlink and `..`, and as named (its parent resolved, the
    last part kept: a link inside a directory is deleted with the directory)."""
    resolved = path.resolve()
    if path.name in ("", ".", ".."):
        return [resolved]
    named = path.absolute().parent.resolve() / path.name
    return [resolved] if named == resolved else [resolved, named]


def check_apart(output: str | Path, inputs: Inputs, kind: str = "output directory") -> None:
    """Refuse an output that is, holds or lies inside a local input.

    `inputs`: {what (e.g. "--model"): path or hub id}. Only inputs that exist on disk count (a
    hub id is not a path); both are compared as resolved (a link to the model is the model)
    and as named (a link that lies inside the output is deleted with it). Writing (or
    `--overwrite` emptying) such an output would destroy what the command reads. `kind` names
    the output in the message ("judge cache" for a file).
    """
    outs = _locations(Path(output).expanduser())
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    for what, source in pairs:
        if source is None or str(source) == "" or not os.path.lexists(Path(source).expanduser()):
            continue
        for out in outs:
            for src in _locations(Path(source).expanduser()):
                relation = ("is" if out == src else "holds" if out in src.parents
                            else "lies inside" if src in out.parents else None)
                if relation is not None:
                    raise WmdpError(f"{output}: the {kind} {relation} the input {source} "
                                    f"({what}); choose another {kind}")


def _lock_dir() -> Path:
    # outside every output directory: a finished output holds only its files, a failed run
    # leaves nothing behind, and --overwrite never deletes a lock another run holds
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "wmdp" / "locks"


_HELD: dict[str, Any] = {}  # resolved output dir -> its FileLock, held by this process
_SHARED: set[str] = set()   # those of them that are caches shared by design (never discarded)


def _output_key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def lock_output_dir(path: str | Path, wait: str | None = None) -> None:
    """Hold an exclusive lock on `path` until `release_output_locks()` (or process exit).

    An OS lock (flock): a run that is killed releases it, so a stale lock never blocks. A second
    process locking the same directory fails at once, unless `wait` (what the directory is, for
    a cache shared by design): then it prints one line saying so and waits. This process may
    lock it again (the pipeline's stages write inside directories it already holds).
    """
    from filelock import FileLock, Timeout

    key = _output_key(path)
    if key in _HELD:
        return
    lock_dir = _lock_dir()
    lock_file = lock_dir / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock")
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            if wait is None:
                raise
            print(f"wmdp: {path}: another wmdp process is building {wait}; waiting for it "
                  f"(lock {lock_file})", file=sys.stderr, flush=True)
            lock.acquire(timeout=-1)
    except Timeout:
        raise WmdpError(f"{path}: another wmdp run is writing this directory "
                        f"(lock {lock_file})") from None
    except OSError as e:
        raise WmdpError(f"{lock_file}: cannot create the output lock ({e.strerror or e})") from None
    _HELD[key] = lock


@contextmanager
def shared_dir_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold a cache directory shared by design (the sandbox cache) while building into it: a
    second process waits for the first, saying so in one line, then finds the cache ready.
    Released on exit, so a run holds it only while it builds; what is built there is never
    discarded as a failed command's output."""
    key = _output_key(path)
    held = key in _HELD
    lock_output_dir(path, wait=what)
    if not held:
        _SHARED.add(key)
    try:
        yield
    finally:
        if not held and key in _HELD:
            _SHARED.discard(key)
            _HELD.pop(key).release()


def release_output_locks() -> None:
    """Release every output lock this process holds (the command line calls it at the end)."""
    _SHARED.clear()
    while _HELD:
        _, lock = _HELD.popitem()
        lock.release()


# While a command runs (`outputs_removed_on_error`): the output directories it made or emptied,
# as (directory, the topmost directory it created or None if `directory` existed)
_NEW_OUTPUTS: list[tuple[Path, Path | None]] | None = None


@contextmanager
def outputs_removed_on_error(errors: tuple[type[BaseException], ...] = (WmdpError, OSError)
                             ) -> Iterator[None]:
    """Run a command so that an input error (one of `errors`: a WmdpError, a failed write such
    as a full disk, ...) leaves its outputs as it found them: every output directory that
    `prepare_output_dir` made or emptied for it is removed (or emptied again). A resumed
    output, a shared cache, an output holding resumable work (`keep_outputs_holding`: a
    checkpoint, an unlearned model) and an interrupted run (Ctrl-C: rerun to resume) are
    kept."""
    global _NEW_OUTPUTS
    outer, _NEW_OUTPUTS = _NEW_OUTPUTS, []
    mine = _NEW_OUTPUTS
    try:
        yield
    except errors:
        for directory, created in reversed(mine):
            _discard(directory, created)
        raise
    finally:
        _NEW_OUTPUTS = outer


def keep_outputs_holding(path: str | Path) -> None:
    """Work worth resuming now lies at `path` (an unlearning checkpoint, the unlearned model of a
    run): a later failure of this command keeps every output directory holding it, so the
    rerun resumes instead of starting over. Before this, a failure removes what the command
    made (`outputs_removed_on_error`)."""
    if _NEW_OUTPUTS is None:
        return
    p = Path(path).absolute()
    _NEW_OUTPUTS[:] = [(d, c) for d, c in _NEW_OUTPUTS if not (p == d or d in p.parents)]


def _discard(directory: Path, created: Path | None) -> None:
    try:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif directory.is_dir():
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
    except OSError:
        pass  # the error being reported matters more than a leftover


def _topmost_missing(path: Path) -> Path | None:
    """The highest directory of `path` that does not exist yet (what mkdir -p creates)."""
    missing = None
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing = p
    return missing


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

    Inside `outputs_removed_on_error`, a directory made or emptied here is removed (emptied)
    again if the command then fails on an input error.
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
    created = _topmost_missing(path.absolute())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WmdpError(f"{path}: cannot create the output directory ({e.strerror or e})") from None
    key = _output_key(path)
    if _NEW_OUTPUTS is not None and not any(key == k or key.startswith(k + os.sep)
                                            for k in _SHARED):
        _NEW_OUTPUTS.append((path.absolute(), created))
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

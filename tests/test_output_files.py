"""What commands write, and how: a full disk or a read-only output is one line, exit 2, and no
partial output; every file has the mode the umask gives; a shared cache being built by another
process is waited for, not refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES
from wmdp.cli import main

SANDBOX = FIXTURES / "sandbox-small"
EVAL = ["eval", "--model", str(SANDBOX / "model"), "--data-dir", str(SANDBOX / "data"),
        "--tasks", "sandbox_bio", "--limit", "2", "--device", "cpu", "--output"]
UNLEARN = ["unlearn", "ga", "--model", str(SANDBOX / "model"), "--forget-corpora",
           f"{SANDBOX}/data/forget_bio.jsonl", "--retain-corpora",
           f"{SANDBOX}/data/retain_botany.jsonl", "--max-num-batches", "1", "--batch-size", "2",
           "--max-length", "32", "--device", "cpu", "--output"]
COMPARE = ["compare", str(SANDBOX / "eval"), "--output"]
AUDIT = ["audit", "--model", str(SANDBOX / "model"), "--base", str(SANDBOX / "model"),
         "--data-dir", str(SANDBOX / "data"), "--tasks", "sandbox_bio", "--limit", "12",
         "--attacks", "fewshot", "--set", "fewshot.pool_size=5", "--device", "cpu", "--output"]
PREFIX_RMU = ["unlearn", "rmu", "--preset", "sandbox", "--model", str(SANDBOX / "model"),
              "--forget-corpora", f"{SANDBOX}/data/forget_bio.jsonl", "--retain-corpora",
              f"{SANDBOX}/data/retain_botany.jsonl", "--max-num-batches", "1", "--load", "prefix",
              "--device", "cpu", "--output"]  # RMU's prefix path writes its own shards
BUILD = ["sandbox", "build", "--preset", "small", "--no-oracle", "--output"]


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the `wmdp:` lines on stderr (progress lines are not messages)."""
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("wmdp: ")]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # locks, sandbox cache


# --- a full disk, a read-only output ----------------------------------------------------------

def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB file system with no byte left."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=256k")
    try:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_filling_while_weights_are_written_is_one_line(tmp_path, capsys):
    """Room for the run's small files but not for the model's weights: safetensors' own error
    (not an OSError) is one line, and the output is removed."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=600k")  # the sandbox model's weights are 1.25 MB
    try:
        out = disk / "out"
        code, lines = _run(UNLEARN + [str(out)], capsys)
        assert code == 2 and len(lines) == 1, lines
        assert "No space left on device" in lines[0] or "os error 28" in lines[0], lines[0]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("argv", [EVAL, UNLEARN, BUILD, COMPARE],
                         ids=["eval", "unlearn", "sandbox-build", "compare"])
def test_full_disk_is_one_line_and_leaves_nothing(argv, full_disk, capsys):
    before = _digest(SANDBOX)
    out = full_disk / "out"
    code, lines = _run(argv + [str(out)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and str(full_disk) in lines[0], lines[0]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial output
    assert _digest(SANDBOX) == before


def test_read_only_output_of_general_qa(tmp_path, capsys):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=64k")
    try:
        out = ro / "general_qa.jsonl"
        code, lines = _run(["sandbox", "general-qa", str(SANDBOX), "--output", str(out)], capsys)
        assert code == 2 and lines == [f"wmdp: {out}: cannot write (Read-only file system)"]
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    """An atomic write that fails midway (here: the disk fills at the rename) keeps the file as
    it was and leaves no temp file (fault injected at the OS layer, no root needed)."""
    from wmdp.errors import WmdpError
    from wmdp.io import atomic_write_text

    path = tmp_path / "results.json"
    path.write_text("old")

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WmdpError, match=f"^{path}: cannot write \\(No space left on device\\)$"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- a failed command leaves its outputs as it found them -------------------------------------

def test_an_input_error_removes_only_what_the_command_made(tmp_path):
    """What `wmdp` runs each command inside: a failure removes the directories the command made
    (with the parents it made), keeps a resumed output and a shared cache; Ctrl-C keeps all."""
    from wmdp.errors import WmdpError
    from wmdp.io import (outputs_removed_on_error, prepare_output_dir, release_output_locks,
                         shared_dir_lock, write_json)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    write_json(resumed / "run.json", {"fingerprint": 1})
    (resumed / "stage.txt").write_text("finished before")

    def command(failure: BaseException) -> None:
        with outputs_removed_on_error():
            prepare_output_dir(resumed, False, "run.json", 1)
            new = prepare_output_dir(tmp_path / "a" / "b" / "new", False)
            (new / "results.json").write_text("partial")
            (resumed / "stage2.txt").write_text("partial")  # inside a resumed output: kept
            with shared_dir_lock(tmp_path / "shared", "a cache"):
                built = prepare_output_dir(tmp_path / "shared", False, "build.json", 1)
                write_json(built / "build.json", {"fingerprint": 1})
                (built / "model").write_text("built")
            raise failure

    try:
        with pytest.raises(WmdpError, match="^found late$"):
            command(WmdpError("found late"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "resumed", "shared"]
        assert sorted(p.name for p in resumed.iterdir()) == ["run.json", "stage.txt",
                                                              "stage2.txt"]
        assert (tmp_path / "shared" / "model").read_text() == "built"
        with pytest.raises(KeyboardInterrupt):
            command(KeyboardInterrupt())
        assert (tmp_path / "a" / "b" / "new" / "results.json").read_text() == "partial"
    finally:
        release_output_locks()


def test_a_late_failure_keeps_an_output_holding_resumable_work(tmp_path):
    """A checkpoint (or a run's unlearned model) marks its output worth keeping: a failure after
    it (a full disk at the end, a judge refusing the key) leaves it to resume, while an output
    made alongside that holds nothing resumable is still removed."""
    from wmdp.errors import WmdpError
    from wmdp.io import (keep_outputs_holding, outputs_removed_on_error, prepare_output_dir,
                         release_output_locks)

    try:
        with pytest.raises(WmdpError):
            with outputs_removed_on_error():
                run = prepare_output_dir(tmp_path / "run", False)
                other = prepare_output_dir(tmp_path / "other", False)
                (other / "partial.json").write_text("{}")
                ckpt = run / "checkpoints" / "last.pt"
                ckpt.parent.mkdir()
                ckpt.write_bytes(b"state")
                keep_outputs_holding(ckpt)
                raise WmdpError("the disk filled while saving the model")
        assert ckpt.read_bytes() == b"state"
        assert not (tmp_path / "other").exists()
    finally:
        release_output_locks()


# --- files a colleague can read -----------------------------------------------------------------

def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")] if not p.is_symlink()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_have_the_umasks_mode(mask, tmp_path, capsys):
    """Every file and directory a command writes has the mode open() and mkdir() give under the
    umask (0644 and 0755 under 022), not a temp file's 0600."""
    commands = {"compare": COMPARE, "general-qa": ["sandbox", "general-qa", str(SANDBOX)]}
    if mask == 0o027:  # the slower ones once, under the mask that differs from both bugs
        commands.update(eval=EVAL, unlearn=UNLEARN, prefix=PREFIX_RMU, audit=AUDIT,
                        build=BUILD[:-1] + ["train.epochs=1", "--output"])
    old = os.umask(mask)
    try:
        for name, argv in commands.items():
            out = tmp_path / name
            target = out / "general_qa.jsonl" if name == "general-qa" else out
            code, lines = _run(argv + ["--output", str(target)] if name == "general-qa"
                               else argv + [str(out)], capsys)
            assert code == 0, lines
    finally:
        os.umask(old)
    for name in commands:
        modes = _modes(tmp_path / name)
        assert len(modes) > 1
        for path, mode in modes.items():
            is_dir = (tmp_path / name / path).is_dir()
            assert mode == (0o777 if is_dir else 0o666) & ~mask, (name, path, oct(mode))


# --- a shared cache waits, an output refuses --------------------------------------------------

FIRST = """
import json, shutil, sys
from wmdp.io import shared_dir_lock
from wmdp.pipeline import SandboxSection, sandbox_location
from wmdp.sandbox.build import fingerprint

config, where = sandbox_location(SandboxSection())
with shared_dir_lock(where, "the sandbox cache"):
    print("building", flush=True)
    sys.stdin.readline()
    # the build, finished: the small fixture, recorded as the default build
    shutil.copytree(sys.argv[1], where)
    record = json.loads((where / "build.json").read_text())
    record["fingerprint"] = fingerprint(config)
    (where / "build.json").write_text(json.dumps(record))
print("built", flush=True)
"""

SECOND = """
import sys, time
from wmdp.pipeline import Pipeline, load_run_config

pipe = Pipeline(load_run_config(None, ["output=" + sys.argv[1]]), create=False)
t0 = time.perf_counter()
pipe.build_sandbox()  # the run's sandbox stage
print(f"ready {time.perf_counter() - t0:.1f}", flush=True)
"""


def _readline(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout:.0f} s"
    return stream.readline()


def test_second_run_waits_for_the_sandbox_cache(tmp_path):
    """Two processes on a fresh cache: the first holds the sandbox cache's lock while it
    builds; the second's sandbox stage prints one line, waits, and goes on with the first's
    build once it is released (it never trains one itself)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", FIRST, str(SANDBOX)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    second = None
    try:
        assert _readline(first.stdout, 120).strip() == "building"
        second = subprocess.Popen([sys.executable, "-c", SECOND, str(tmp_path / "run")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
        deadline = time.monotonic() + 120
        while not (line := _readline(second.stderr, deadline - time.monotonic())).startswith(
                "wmdp: "):
            pass
        assert "another wmdp process is building the sandbox cache; waiting" in line, line
        assert second.poll() is None  # waiting, not failed
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(60) == 0 and first.stdout.read().strip() == "built"
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err[-2000:]
        assert out.startswith("ready ") and float(out.split()[1]) < 60  # found it built
        assert not [x for x in err.splitlines() if x.startswith("wmdp: ")]  # said once
        assert not (tmp_path / "run").exists()  # create=False: only the shared cache
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_a_cache_lock_is_released_after_the_build(tmp_path):
    """The cache is held only while it is built: the same directory, locked again as an
    output by another holder, is refused only while the first holds it."""
    from wmdp.io import lock_output_dir, release_output_locks, shared_dir_lock

    cache = tmp_path / "shared"
    with shared_dir_lock(cache, "a cache"):
        pass
    probe = ("import sys; from wmdp.io import lock_output_dir; lock_output_dir(sys.argv[1]); "
             "print('locked')")
    p = subprocess.run([sys.executable, "-c", probe, str(cache)], capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.stdout.strip() == "locked", p.stderr[-500:]
    lock_output_dir(cache)  # an output, held to the end of the command
    try:
        p = subprocess.run([sys.executable, "-c", probe, str(cache)], capture_output=True,
                           text=True, timeout=60,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert p.returncode != 0 and "another wmdp run is writing this directory" in p.stderr
    finally:
        release_output_locks()

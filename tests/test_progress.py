"""Progress bars degrade to plain, periodic lines when the output is not a terminal."""

from __future__ import annotations

import io

from wmdp.progress import tqdm


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_plain_lines_with_total_and_time_left(monkeypatch):
    monkeypatch.setenv("WMDP_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    with tqdm(total=4, desc="unlearn (rmu)", unit="step", file=log) as bar:
        for _ in range(4):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("unlearn (rmu): 4/4 step (100%), 0:00:0")
    assert lines[-1].endswith("0:00:00 left")
    assert any(line.startswith("unlearn (rmu): 2/4 step (50%)") for line in lines)


def test_log_lines_are_spaced_by_the_interval(monkeypatch):
    monkeypatch.setenv("WMDP_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    for _ in tqdm(range(50), desc="scoring", file=log):
        pass
    lines = log.getvalue().splitlines()  # the first call and the finished bar, nothing between
    assert lines[-1].startswith("scoring: 50/50") and len(lines) <= 2


def test_a_terminal_keeps_tqdms_bar():
    tty = _Tty()
    for _ in tqdm(range(3), desc="x", file=tty):
        pass
    assert "\r" in tty.getvalue()

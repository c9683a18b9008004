"""Progress bars that stay readable in a log: `from wmdp.progress import tqdm`.

On a terminal this is tqdm as usual. When stderr is not a terminal (a log file, CI, a pipe), a
redrawn bar becomes one long line of carriage returns, or nothing; here it becomes a plain line
every `WMDP_PROGRESS_SECONDS` seconds (default 30) and one at the end, each with the count, the
total, the elapsed time and the time left:

    unlearn (rmu): 120/360 step (33%), 0:00:05 elapsed, 0:00:10 left
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm as _tqdm


def _interactive(file) -> bool:
    return bool(getattr(file, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm's name
    def __init__(self, *args, **kwargs) -> None:
        file = kwargs.get("file") or sys.stderr
        self._plain = not _interactive(file)
        if self._plain:
            kwargs.setdefault("mininterval", float(os.environ.get("WMDP_PROGRESS_SECONDS", "30")))
        self._last_line, self._last_n = 0.0, -1
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if self._plain and not self.disable:  # the last count, once; no bar to clear
            if self.n != self._last_n:
                self.fp.write(self.plain_line() + "\n")
                self.fp.flush()
            self._decr_instances(self)
            self.disable = True  # tqdm's own close then writes nothing
        super().close()

    def display(self, msg=None, pos=None):  # noqa: D102 - tqdm's hook
        if not self._plain:
            return super().display(msg, pos)
        now = time.time()
        done = self.total is not None and self.n >= self.total
        if not done and now - self._last_line < self.mininterval:
            return True
        self._last_line, self._last_n = now, self.n
        self.fp.write(self.plain_line() + "\n")
        self.fp.flush()
        return True

    def plain_line(self) -> str:
        elapsed = self.format_dict["elapsed"]
        unit = self.unit if self.unit != "it" else "steps"
        head = f"{self.desc.rstrip(': ')}: " if self.desc else ""
        if not self.total:
            return f"{head}{self.n} {unit}, {_clock(elapsed)} elapsed"
        share = self.n / self.total
        left = elapsed / share - elapsed if share > 0 else 0.0
        post = f" [{self.postfix}]" if self.postfix else ""
        return (f"{head}{self.n}/{self.total} {unit} ({share:.0%}), {_clock(elapsed)} elapsed, "
                f"{_clock(left)} left{post}")


__all__ = ["tqdm"]

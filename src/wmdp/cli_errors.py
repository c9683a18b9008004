"""How the `wmdp` command reports a bad command line: one line, `wmdp: <subcommand>: <what>`,
exit code 2 (argparse's usage block and Python's tracebacks say the same in 14 lines)."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import PurePath
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`wmdp: eval: <message>`, exit 2) instead of the
    usage block; every subcommand's parser is of this class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser_prog=self.prog)  # the innermost subcommand's wins

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports unknown flags from the top parser; name the subcommand instead
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._fail(getattr(parsed, "_parser_prog", self.prog),
                       f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self._fail(self.prog, message)

    def _fail(self, prog: str, message: str) -> NoReturn:
        command = prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"wmdp: {where}{' '.join(message.split())} (see {prog} --help)\n")


def nonnegative_fraction(value: str) -> float:
    """A share in [0, 1] (NaN and infinity are not)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0-1, got {value!r}") from None
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in 0-1, got {value}")
    return x


def failing_file(exc: BaseException) -> str:
    """The file an error from a reader that does not name it came from (a UnicodeDecodeError,
    json's RecursionError on deep nesting, csv's field-size limit): the innermost failing frame
    that holds a path or an open text file."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, PurePath):
                return str(value)
            if isinstance(value, io.TextIOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return "an input file"

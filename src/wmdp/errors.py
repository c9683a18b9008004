"""Errors a user can act on.

Every error the command line reports as one line, `wmdp: <message>`, and exit code 2, comes
from `WmdpError`. Messages name the file, line and field where there is one.
"""

from __future__ import annotations

from pathlib import Path


class WmdpError(Exception):
    """A user-facing error: bad input, a missing file, a refused overwrite."""


class DataError(WmdpError):
    """Bad content in a data file: `path line N: field "x" ...`."""

    def __init__(self, path: str | Path, message: str, line: int | None = None,
                 field: str | None = None, unit: str = "line") -> None:
        # unit: "line" in line-based files (.jsonl, .csv), "item" in .json/.parquet/hub rows
        where = f"{path}" + (f" {unit} {line}" if line is not None else "")
        what = f'field "{field}" {message}' if field else message
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.field = str(path), line, field

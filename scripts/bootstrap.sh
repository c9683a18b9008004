#!/usr/bin/env bash
# Create .venv in the repository root when missing and install the project into it.
# torch==2.13.0 goes in first: here it is the CPU build on local disk; on a GPU machine the
# same pin comes from PyPI with CUDA. Then the project itself (with dev extras for tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.wmdp-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "wmdp: creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "wmdp: installing into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2
  fi
  "$venv/bin/python" -m pip install -q -e "$root[dev]" >&2
  touch "$stamp"
fi

#!/usr/bin/env bash
# The main job: `./run.sh` runs `wmdp run` on its embedded default (the offline sandbox);
# any arguments go to the `wmdp` command instead, e.g. `./run.sh eval --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/bootstrap.sh"
if [ $# -eq 0 ]; then set -- run; fi
exec "$root/.venv/bin/wmdp" "$@"

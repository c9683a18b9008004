#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a full-page screenshot beside it:
#   scripts/screenshot_report.sh runs/sandbox            -> runs/sandbox/report.png
# Needs Chromium (Debian: apt-get install chromium). The report is self-contained (plots are
# inlined), so it renders from the file alone, with networking off.
set -euo pipefail
run_dir="${1:?usage: scripts/screenshot_report.sh RUN_DIR}"
html="$(cd "$run_dir" && pwd)/report.html"
[ -f "$html" ] || { echo "wmdp: $html: no report (run wmdp run first)" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "wmdp: no Chromium found (apt-get install chromium)" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1100,5200 \
  --screenshot="$(dirname "$html")/report.png" "file://$html" 2>/dev/null
echo "wrote $(dirname "$html")/report.png"

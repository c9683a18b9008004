#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a whole-page screenshot beside it:
#   scripts/screenshot_report.sh runs/sandbox                -> runs/sandbox/report.png (1,100 px)
#   scripts/screenshot_report.sh runs/sandbox 1600 out.png   -> out.png, 1,600 px wide
# Needs Chromium (Debian: apt-get install chromium). The report is self-contained (plots are
# inlined), so it renders from the file alone, with networking off.
# Whole page: a first pass measures the page's height at this width (a copy of the report with a
# script that writes document.documentElement.scrollHeight into the DOM, read with --dump-dom);
# the second takes the screenshot with a window exactly that tall. A fixed window height cut the
# page (and the model card) off at 5,200 px.
set -euo pipefail
run_dir="${1:?usage: scripts/screenshot_report.sh RUN_DIR [WIDTH] [OUT.png]}"
width="${2:-1100}"
html="$(cd "$run_dir" && pwd)/report.html"
out="${3:-$(dirname "$html")/report.png}"
[ -f "$html" ] || { echo "wmdp: $html: no report (run wmdp run first)" >&2; exit 2; }
[[ "$width" =~ ^[0-9]+$ ]] || { echo "wmdp: width: '$width' is not a number of pixels" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "wmdp: no Chromium found (apt-get install chromium)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chrome() {
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --hide-scrollbars --force-device-scale-factor=1 "$@" 2>/dev/null
}
# pass 1: the page's height at this width
measure="$work/measure.html"
sed 's#</body>#<script>window.addEventListener("load",()=>{document.body.setAttribute("data-height",document.documentElement.scrollHeight)})</script></body>#' \
  "$html" > "$measure"
height="$(chrome --window-size="$width,1000" --virtual-time-budget=5000 --dump-dom "file://$measure" \
  | grep -o 'data-height="[0-9]*"' | grep -o '[0-9]*' | head -1 || true)"
[[ "$height" =~ ^[0-9]+$ ]] || { echo "wmdp: could not measure the page height of $html" >&2; exit 2; }
# pass 2: the whole page
chrome --window-size="$width,$height" --screenshot="$out" "file://$html"
echo "wrote $out (${width}x${height} px)"

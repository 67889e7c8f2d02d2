#!/usr/bin/env bash
# Screenshot the documentation in headless Chromium, as a new reader would first see it.
#
#   bash docs/screenshots.sh [output-folder]        (default: docs/_build/screenshots)
#
# Needs Chromium (Debian: apt-get install -y chromium) and the docs requirements. Builds the site
# into docs/_build/screenshots-html; MathJax normally comes from its CDN, so for an offline machine
# the script takes MathJax 3 from the npm registry when npm is present (set FLASH_DOCS_MATHJAX to a
# MathJax "es5" folder to use your own). The PNGs are not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/_build/screenshots}
HTML=docs/_build/screenshots-html
mkdir -p "$OUT"

if [ -z "${FLASH_DOCS_MATHJAX:-}" ] && command -v npm >/dev/null 2>&1; then
  MATHJAX_TMP=$(mktemp -d)
  if (cd "$MATHJAX_TMP" && npm pack --silent mathjax@3 >/dev/null 2>&1 && tar xzf mathjax-*.tgz); then
    export FLASH_DOCS_MATHJAX="$MATHJAX_TMP/package/es5"
  else
    echo "MathJax not fetched: formulas will show as TeX source in the screenshots" >&2
  fi
fi

sphinx-build -q -b html docs "$HTML"

CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$CHROME" ]; then
  echo "no Chromium found (Debian: apt-get install -y chromium)" >&2
  exit 1
fi

# shot PAGE NAME [HEIGHT] [WIDTH]
shot() {
  local page=$1 name=$2 height=${3:-2000} width=${4:-1280} profile
  profile=$(mktemp -d)
  "$CHROME" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --virtual-time-budget=8000 \
    --window-size="$width,$height" --screenshot="$OUT/$name.png" "file://$PWD/$HTML/$page" >/dev/null 2>&1
  rm -rf "$profile"
  echo "$OUT/$name.png  <- $page"
}

shot index.html landing
shot getting-started.html getting-started
shot user-guide/index.html user-guide
shot user-guide/masking.html user-guide-masking 2600
shot algorithm/index.html algorithm 3000
shot algorithm/worked-example.html worked-example 3400
shot backends/support.html backend-support 3000
shot heuristics.html heuristics 2400
shot benchmarks/index.html benchmarks 2400
shot index.html landing-narrow 1400 420

#!/usr/bin/env bash
# CI: the web console in a real headless Chromium (pytest -m browser) against a live `seglock serve`.
# Installs Debian's chromium and chromium-driver when they are missing; fails CI when a test fails
# or when the browser tests were skipped (nothing was checked then).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
report=$(mktemp)
.venv/bin/python -m pytest -m browser tests/test_console_browser.py -q -rs | tee "$report"
if grep -q -E "skipped|no tests ran" "$report"; then
    echo "CI: the browser tests did not run" >&2; rm -f "$report"; exit 1
fi
rm -f "$report"

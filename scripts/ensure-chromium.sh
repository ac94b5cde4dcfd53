#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed for the browser tests (tests/e2e/test_web_browser.py):
# nothing to do when it is there; else apt-get installs it, through sudo when not root.
# Playwright's own browser download is not used: it needs the internet, the package mirror does not.
set -euo pipefail

chromium="${HELIX_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "!!! No Chromium at $chromium and no apt-get to install it: the browser tests will be SKIPPED" \
       "(a failure under CI=true)." >&2
  exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  sudo=(sudo)
fi
echo "Installing Chromium for the browser tests (apt-get install chromium)..." >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
echo "Chromium: $("$chromium" --version 2>/dev/null || echo "installed at $chromium")" >&2

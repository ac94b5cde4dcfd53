#!/usr/bin/env bash
# Helix's GPU paths on this machine's NVIDIA GPU, on tiny models built here: one line per path, PASS, FAIL
# or SKIP (see scripts/gpu_check.py). On a machine without a GPU every path says SKIP and it exits 0.
# Any FAIL exits 1; the whole run is cut off after 8 minutes (exit 124).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || command -v python3)}"
exec timeout --kill-after=15 "${GPU_CHECK_SECONDS:-480}" "$PYTHON" scripts/gpu_check.py "$@"

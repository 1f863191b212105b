#!/usr/bin/env bash
# Set up a virtual environment and run the test suite; exits non-zero if any test fails.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -e '.[test]'
# the dashboard's browser tests drive Debian's Chromium (Playwright never downloads a browser here)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
        || echo "warning: could not install chromium; the browser tests will be skipped" >&2
fi
# GNU nproc honours OMP_NUM_THREADS, so count the cores before pinning the threads per process
NPROC="$(env -u OMP_NUM_THREADS nproc 2>/dev/null || echo 2)"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ "$NPROC" -ge 2 ]; then
    exec python -m pytest -n 2 "$@"
fi
exec python -m pytest "$@"

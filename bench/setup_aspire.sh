#!/usr/bin/env bash
# ASPIRE (GPL-3) for bench/class2d.py, in its own venv .bench-envs/aspire (ignored by git), run as a separate
# process; never a dependency of cryolive. The same venv and version as bench/setup_ctf_peers.sh's "aspire"
# (ASPIRE's CTF estimator), so whichever script runs first installs it and the other finds it ready.
#
#   bash bench/setup_aspire.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.bench-envs
PY=${PYTHON:-python3}
ASPIRE_VERSION=${ASPIRE_VERSION:-0.14.3}
mkdir -p "$ROOT"
if [[ ! -x $ROOT/aspire/bin/python ]] || ! "$ROOT/aspire/bin/python" -c "import aspire" 2>/dev/null; then
  "$PY" -m venv "$ROOT/aspire"
  "$ROOT/aspire/bin/pip" install -q --upgrade pip
  "$ROOT/aspire/bin/pip" install -q "aspire==$ASPIRE_VERSION" mrcfile
fi
"$ROOT/aspire/bin/python" -c "import aspire; print('aspire ok', aspire.__version__)"

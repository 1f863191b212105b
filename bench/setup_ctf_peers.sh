#!/usr/bin/env bash
# Install the CTF-estimation peers of bench/ctf.py, each in its own virtual environment under .bench-envs/
# (ignored by git), run as separate processes by bench/ctf.py; nothing here is a dependency of cryolive.
#
#   bash bench/setup_ctf_peers.sh                 # both peers
#   bash bench/setup_ctf_peers.sh teamtomo        # only teamtomo's torch-ctf-estimation
#   bash bench/setup_ctf_peers.sh aspire          # only ASPIRE (GPL-3: own venv, own process)
#
# torch for a peer venv is installed first as torch==2.13.0 (a CPU build), so that the peer's own
# requirement on torch is already satisfied and pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.bench-envs
PY=${PYTHON:-python3}
TEAMTOMO_VERSION=${TEAMTOMO_VERSION:-0.6.0}
ASPIRE_VERSION=${ASPIRE_VERSION:-0.14.3}
want=${1:-all}

mkdir -p "$ROOT"

if [[ $want == all || $want == teamtomo ]]; then
  if [[ ! -x $ROOT/teamtomo/bin/python ]] || ! "$ROOT/teamtomo/bin/python" -c "import torch_ctf_estimation" 2>/dev/null; then
    "$PY" -m venv "$ROOT/teamtomo"
    "$ROOT/teamtomo/bin/pip" install -q --upgrade pip
    "$ROOT/teamtomo/bin/pip" install -q torch==2.13.0
    "$ROOT/teamtomo/bin/pip" install -q "torch-ctf-estimation==$TEAMTOMO_VERSION" mrcfile
  fi
  "$ROOT/teamtomo/bin/python" -c "import torch, torch_ctf_estimation; print('teamtomo ok, torch', torch.__version__)"
fi

if [[ $want == all || $want == aspire ]]; then
  if [[ ! -x $ROOT/aspire/bin/python ]] || ! "$ROOT/aspire/bin/python" -c "import aspire" 2>/dev/null; then
    "$PY" -m venv "$ROOT/aspire"
    "$ROOT/aspire/bin/pip" install -q --upgrade pip
    "$ROOT/aspire/bin/pip" install -q "aspire==$ASPIRE_VERSION" mrcfile
  fi
  "$ROOT/aspire/bin/python" -c "import aspire; print('aspire ok', aspire.__version__)"
fi

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
  if [[ ! -x $ROOT/teamtomo/bin/python ]] || ! "$ROOT/teamtomo/bin/python" bench/_peer_teamtomo.py --check >/dev/null 2>&1; then
    "$PY" -m venv "$ROOT/teamtomo"
    "$ROOT/teamtomo/bin/pip" install -q --upgrade pip
    "$ROOT/teamtomo/bin/pip" install -q torch==2.13.0
    echo "torch==2.13.0" > "$ROOT/teamtomo/constraints.txt"
    # torch-ctf-estimation declares torchvision, which PyPI builds only against other torch releases (it would
    # replace torch 2.13.0 by a CUDA build); it uses torchvision for one Gaussian blur of the spectrum's
    # background, which bench/_peer_teamtomo.py provides (same definition). So: the package without its
    # declared dependencies, then those dependencies except torchvision, torch pinned by the constraints file.
    "$ROOT/teamtomo/bin/pip" install -q --no-deps "torch-ctf-estimation==$TEAMTOMO_VERSION"
    "$ROOT/teamtomo/bin/pip" install -q -c "$ROOT/teamtomo/constraints.txt" einops numpy "pydantic>=2,<3" scipy \
      teamtomo-basemodel torch-ctf torch-cubic-spline-grids torch-fourier-filter torch-fourier-rescale \
      torch-grid-utils torch-image-interpolation mrcfile
  fi
  "$ROOT/teamtomo/bin/python" bench/_peer_teamtomo.py --check
fi

if [[ $want == all || $want == aspire ]]; then
  if [[ ! -x $ROOT/aspire/bin/python ]] || ! "$ROOT/aspire/bin/python" -c "import aspire" 2>/dev/null; then
    "$PY" -m venv "$ROOT/aspire"
    "$ROOT/aspire/bin/pip" install -q --upgrade pip
    "$ROOT/aspire/bin/pip" install -q "aspire==$ASPIRE_VERSION" mrcfile
  fi
  "$ROOT/aspire/bin/python" -c "import aspire; print('aspire ok', aspire.__version__)"
fi

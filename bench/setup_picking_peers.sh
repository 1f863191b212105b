#!/usr/bin/env bash
# Install the picking peer of bench/picking.py: topaz-em (GPL-3, Bepler et al. 2019) with its pretrained
# models, in its own virtual environment under .bench-envs/topaz (ignored by git), run by bench/picking.py as a
# separate process; nothing here is a dependency of cryolive.
#
#   bash bench/setup_picking_peers.sh
#
# torch is installed first as torch==2.13.0 (a CPU build on disk), then topaz-em with --no-deps and its other
# requirements explicitly: topaz-em asks for torchvision, which PyPI builds only against other torch releases
# (and would pull a CUDA torch); topaz uses torchvision only for training-time augmentation, not for
# preprocessing or extraction with a pretrained model.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.bench-envs
PY=${PYTHON:-python3}
TOPAZ_VERSION=${TOPAZ_VERSION:-0.3.20}

mkdir -p "$ROOT"
if [[ ! -x $ROOT/topaz/bin/python ]] || ! "$ROOT/topaz/bin/python" -c "import topaz.extract" 2>/dev/null; then
  "$PY" -m venv "$ROOT/topaz"
  "$ROOT/topaz/bin/pip" install -q --upgrade pip
  "$ROOT/topaz/bin/pip" install -q torch==2.13.0
  "$ROOT/topaz/bin/pip" install -q --no-deps "topaz-em==$TOPAZ_VERSION"
  "$ROOT/topaz/bin/pip" install -q "tqdm>=4.65.0" "h5py>=3.7.0" numpy pandas "psutil>=5.8.0" scikit-learn scipy \
    pillow future mrcfile
fi
"$ROOT/topaz/bin/python" -c "import torch, topaz, topaz.extract, topaz.model.factory; print('topaz ok', topaz.__version__, 'torch', torch.__version__)"

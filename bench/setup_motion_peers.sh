#!/usr/bin/env bash
# Install the motion-correction peer of bench/motion.py (teamtomo's torch-motion-correction) in its own
# virtual environment under .bench-envs/ (ignored by git); bench/motion.py runs it as a separate process
# (bench/_peer_tmc.py). Nothing here is imported by cryolive.
#
#   bash bench/setup_motion_peers.sh            # all motion peers (today: one)
#   bash bench/setup_motion_peers.sh torch-motion-correction
#
# torch is installed first and pinned (torch==2.13.0, the CPU wheel the project uses); every later install
# gets a constraints file holding that pin, so no peer dependency can pull in another (CUDA) torch build.
# Idempotent: an environment whose peer already imports is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVS="$ROOT/.bench-envs"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

make_env() {  # make_env NAME IMPORT_NAME PIP_SPEC...
    local name="$1" module="$2"
    shift 2
    local env="$ENVS/$name"
    if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import $module" >/dev/null 2>&1; then
        echo "$name: ready in $env ($("$env/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))"))"
        return
    fi
    echo "$name: creating $env"
    mkdir -p "$ENVS"
    "$PYTHON" -m venv "$env"
    "$env/bin/python" -m pip install --quiet --upgrade pip
    "$env/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    local cons="$env/constraints.txt"
    echo "torch==$TORCH_VERSION" > "$cons"
    "$env/bin/python" -m pip install --quiet -c "$cons" "$@"
    # the peer must import, on the pinned torch; a CUDA build only where asked for (ALLOW_CUDA_TORCH=1, on a
    # GPU machine whose torch==$TORCH_VERSION is a CUDA wheel), never pulled in by accident here
    "$env/bin/python" -c "import torch, $module; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__; \
assert torch.version.cuda is None or '${ALLOW_CUDA_TORCH:-0}' == '1', 'a CUDA torch build was installed'"
    "$env/bin/python" -c "import importlib.metadata as m; print('$name', m.version('$name'), 'with torch', m.version('torch'))"
}

want="${1:-all}"
if [ "$want" = all ] || [ "$want" = torch-motion-correction ]; then
    # teamtomo's motion correction (BSD-3-Clause). 0.6.0 imports scipy and torch-fourier-rescale without
    # declaring them; mrcfile reads the benchmark's movies.
    make_env torch-motion-correction torch_motion_correction \
        "torch-motion-correction==0.6.0" "torch-fourier-rescale==0.6.0" scipy mrcfile
fi

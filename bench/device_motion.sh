#!/usr/bin/env bash
# The GPU run of bench/motion.py, for a device machine (run there from the repository root, with .whl/
# carried: fetch it here first with `bash bench/device_wheels.sh`). Through the device tool:
#
#   run(command="bash bench/device_motion.sh", carry=[".whl"], timeout_s=600)
#
# Installs the carried wheels into /tmp/site, then times cryolive (--device cuda; the movie read from LZW
# TIFF with 16 decoding threads, and from memory) and the peer (its global estimate and optimiser, on the same
# GPU, own process) on the 4k movie, and, if time allows, on the K3 movie. Figures go to $OUT (the device
# tool brings them back) and to the output.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 CRYOLIVE_BENCH_PEER_PYTHON="$(command -v python3)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, cryolive; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for size in ${SIZES:-4k k3}; do
    python3 bench/motion.py --size "$size" --device cuda --threads 16 --repeats 3 --formats memory,tiff \
        --modes global,patch --workdir "/tmp/bm_$size" --json "$OUT/motion_$size.json" 2>&1 | tee "$OUT/motion_$size.log"
done

#!/usr/bin/env bash
# Fetch, here, the wheels that bench/motion.py needs on a device machine (an NVIDIA H100/H200 lent by the
# workplace's device tool: Python 3.12 with a CUDA torch, tifffile, numpy, scipy, pandas, but no cryolive
# dependencies such as mrcfile or imagecodecs, and no network). They land in .whl/ (ignored by git; about
# 33 MB, inside the device tool's 64 MiB limit), which the run carries; bench/device_motion.sh installs
# them there. The peer (torch-motion-correction and its torch-* packages, pure Python) comes along so that
# the GPU run measures it in the same run. Versions: those of the CPU environments here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$DEST" \
    "mrcfile==1.5.4" "imagecodecs" "starfile==0.5.13" "gemmi" "pydantic>=2" "pydantic-core" "annotated-types" \
    "typing-inspection" \
    "torch-motion-correction==0.6.0" "torch-ctf==0.6.0" "torch-cubic-spline-grids==0.6.0" \
    "torch-fourier-filter==0.6.0" "torch-fourier-rescale==0.6.0" "torch-fourier-shift==0.6.0" \
    "torch-grid-utils==0.6.0" "torch-image-interpolation==0.6.0"
# pydantic and pydantic-core must match: keep the pair pydantic asks for
need=$(unzip -p "$DEST"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
if [ -n "$need" ] && ! ls "$DEST"/pydantic_core-"$need"-* >/dev/null 2>&1; then
    rm -f "$DEST"/pydantic_core-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
        -d "$DEST" "pydantic-core==$need"
fi
du -sh "$DEST"
ls "$DEST"

#!/usr/bin/env bash
# Set up a virtual environment and run the live demo: a simulated microscope writes movies into demo_watch/
# at a steady pace (in the background) while `cryolive live` processes them as they arrive (foreground).
# Results land in demo_out/ (exposures.star, particles.star, class2d/, ...).
# Usage: bash scripts/demo.sh   (N_MOVIES, SIZE, FRAMES, INTERVAL, WORKERS override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
N_MOVIES="${N_MOVIES:-20}"
SIZE="${SIZE:-1024}"
FRAMES="${FRAMES:-24}"
INTERVAL="${INTERVAL:-2}"
WORKERS="${WORKERS:-2}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -e .
export OMP_NUM_THREADS=1

rm -rf demo_sim demo_watch demo_out
mkdir -p demo_watch
cryolive simulate demo_sim --n-movies "$N_MOVIES" --size "$SIZE" --frames "$FRAMES" --pixel-size 1.0 \
    --dose-per-frame 1.0 --format tiff --structure 6ny1 --seed 0 \
    --replay-into demo_watch --replay-interval "$INTERVAL" > demo_simulate.log 2>&1 &
SIM_PID=$!
trap 'kill "$SIM_PID" 2>/dev/null || true' EXIT
# the gain reference is written first; wait for it
for _ in $(seq 1 600); do [ -f demo_sim/gain.mrc ] && break; sleep 1; done
cryolive live demo_watch --out demo_out --pixel-size 1.0 --voltage 300 --cs 2.7 --dose-per-frame 1.0 \
    --gain demo_sim/gain.mrc --particle-diameter 150 --workers "$WORKERS" --classes 10 --min-particles-2d 200 \
    --settle 2 --stop-after-idle 120
wait "$SIM_PID" || true
echo "results: demo_out/ (exposures.star, particles.star, class2d/classes.mrcs); ground truth: demo_sim/truth/"

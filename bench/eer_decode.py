"""EER decoding benchmark: milliseconds per raw frame and per fraction at Falcon 4 size.

Writes a synthetic EER file (4096² raw frames, events Bernoulli at ``--events-per-pixel`` per fraction spread
over ``--fraction-frames`` raw frames, random sub-pixels) with ``cryolive.simulate.eer``, then reads its
fractions through ``cryolive.io.movies.open_movie`` at 1× and 2× sampling (and 2× binned by 2) on 1 and
``--threads`` threads.

Run from the repository root:

    python bench/eer_decode.py                                    # 4096², 2 fractions of 40 raw frames
    python bench/eer_decode.py --size 4096 --fractions 2 --fraction-frames 40 --events-per-pixel 1.0 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--fractions", type=int, default=2)
    ap.add_argument("--fraction-frames", type=int, default=40)
    ap.add_argument("--events-per-pixel", type=float, default=1.0, help="per fraction")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np

    from cryolive.io.movies import EerOptions, open_movie
    from cryolive.simulate.eer import poisson_eer_frames, write_eer

    n_raw = args.fractions * args.fraction_frames
    expected = np.full((args.size, args.size), args.events_per_pixel * args.fractions)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.eer"
        t0 = time.perf_counter()
        write_eer(path, poisson_eer_frames(expected, n_raw, seed=0))
        mb = path.stat().st_size / 1e6
        print(f"wrote {n_raw} raw frames {args.size}² ({mb:.1f} MB, {mb / n_raw * 1e3:.0f} kB/raw frame) "
              f"in {time.perf_counter() - t0:.1f} s")
        for u, b in ((1, 1), (2, 1), (2, 2)):
            for threads in sorted({1, args.threads}):
                movie = open_movie(path, eer=EerOptions(fraction_frames=args.fraction_frames, upsampling=u,
                                                        bin_factor=b, threads=threads))
                t0 = time.perf_counter()
                frames = movie.read_all()
                dt = time.perf_counter() - t0
                print(f"upsampling {u} bin {b} threads {threads}: {frames.shape}, mean {frames.mean():.3f} "
                      f"events/px, {dt / n_raw * 1e3:.1f} ms/raw frame, {dt / args.fractions * 1e3:.0f} ms/fraction")


if __name__ == "__main__":
    main()

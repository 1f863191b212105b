"""Acquisition metadata and optics groups: accuracy of the beam-shift grouping, and what they cost a session.

Prints, from one run (times are ratios against a baseline measured in the same run; the machine may be loaded):

1. Beam-shift optics groups (``preprocess.optics_groups.OpticsGrouper``) on simulated 3×3 multi-shot sessions
   (7 stage positions, jitter per shot σ = spacing / R and half that per stage position, streamed in random
   order), for R = 40, 20, 10, with N = 9 given and auto: how often the groups are not exactly the 9 positions,
   and after how many exposures the grouping is learned (the first ones wait until then). Also how often pure
   noise (one position, no multi-shot) is split into several groups in auto mode.
2. ``write_exposures_star`` for 2000 exposures with the metadata columns against without (same store).
3. Reading one EPU XML + FEI header (``find_metadata``) against reading the movie's MRC header
   (``io.movies.validate_movie(decode=False)``), and one ``OpticsGrouper.add`` after learning.

    python bench/metadata.py [--seeds 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def multishot(n_stage, spacing, jitter, rng):
    grid = np.array([(spacing * (c - 1), spacing * (r - 1)) for r in range(3) for c in range(3)])
    shifts, truth = [], []
    for _ in range(n_stage):
        offset = rng.normal(0, jitter / 2, 2)
        for p, g in enumerate(grid):
            shifts.append(g + offset + rng.normal(0, jitter, 2))
            truth.append(p)
    return np.asarray(shifts), np.asarray(truth)


def grouping_accuracy(seeds: int) -> None:
    from cryolive.preprocess.optics_groups import OpticsGrouper

    print("1. beam-shift optics groups, 3x3 multi-shot x 7 stage positions, random order")
    for ratio in (40, 20, 10):
        for n_groups in (9, None):
            wrong, learned = 0, []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                shifts, truth = multishot(7, 0.02, 0.02 / ratio, rng)
                order = rng.permutation(len(shifts))
                g = OpticsGrouper(n_groups=n_groups)
                at = None
                for step, i in enumerate(order):
                    g.add(str(i), tuple(shifts[i]))
                    if at is None and g.radius is not None:
                        at = step + 1
                g.finish()
                groups = [g.group_of(str(i)) for i in range(len(shifts))]
                pairs = set(zip(groups, truth.tolist()))
                wrong += not (len(pairs) == len(set(groups)) == 9)
                learned.append(at if at is not None else len(shifts))
            print(f"   jitter = spacing/{ratio:<3d} N={str(n_groups):4s}: groups wrong in {wrong}/{seeds} sessions; "
                  f"learned after {np.median(learned):.0f} exposures (median), {np.percentile(learned, 90):.0f} (90 %)")
    for m in (20, 60):
        split = 0
        for seed in range(seeds):
            rng = np.random.default_rng(10_000 + seed)
            g = OpticsGrouper(None, max_pending=m)
            for i in range(m):
                g.add(str(i), tuple(rng.normal(size=2)))
            g.finish()
            split += len(set(g.assignments.values())) > 1
        print(f"   no multi-shot (noise only), auto, {m} exposures: split into several groups in {split}/{seeds}")


def star_overhead(n: int = 2000) -> None:
    from cryolive.config import Settings
    from cryolive.session.acquisition import STAGE
    from cryolive.session.session import write_exposures_star
    from cryolive.session.store import SessionStore

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    settings = Settings()
    with SessionStore(tmp / "session.sqlite") as st:
        for i in range(n):
            eid, _ = st.add_exposure(tmp / f"m{i}.tif")
            st.record_stage(eid, "motion", "h", {"seconds": 1.0, "n_frames": 40, "accum_motion_total": 5.0})
            st.record_stage(eid, "ctf", "h", {"seconds": 1.0, "defocus_u": 1e4, "defocus_v": 1e4,
                                              "max_resolution_angstrom": 4.0})
            st.mark_done(eid, 10)

        def timed(k=7):
            ts = []
            for _ in range(k):
                t0 = time.perf_counter()
                write_exposures_star(tmp, st, settings)
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        base = timed()
        for e in st.exposures("done"):
            st.record_stage(e.id, STAGE, "h", {"seconds": 0.001, "disagreements": [], "error": None, "metadata": {
                "source": "epu", "grid_square": "123", "foil_hole": str(e.id),
                "beam_shift": list(rng.normal(size=2) * 0.01), "defocus_target_angstrom": 15000.0,
                "stage_tilt_deg": 0.0, "exposure_time_s": 5.0, "total_dose": 40.0}})
        with_md = timed()
    print(f"2. write_exposures_star, {n} exposures: with the metadata columns {with_md / base:.2f}x the time "
          f"without ({with_md * 1e3:.0f} vs {base * 1e3:.0f} ms)")


def read_cost(k: int = 50) -> None:
    import mrcfile
    from mrcfile.dtypes import get_ext_header_dtype

    from cryolive.io.metadata import find_metadata
    from cryolive.io.movies import validate_movie
    from cryolive.preprocess.optics_groups import OpticsGrouper

    tmp = Path(tempfile.mkdtemp())
    movie = tmp / "FoilHole_1_Data_2_3_20240101_120000_fractions.mrc"
    ext = np.zeros(40, dtype=get_ext_header_dtype(b"FEI1", "<"))
    ext["Metadata size"] = ext.dtype.itemsize
    ext["HT"], ext["Pixel size X"], ext["Shift X"], ext["Shift Y"] = 300e3, 0.83e-10, 0.01, -0.02
    with mrcfile.new(movie) as m:
        m.set_data(np.zeros((40, 256, 256), np.uint8))
        m.set_extended_header(ext)
        m.header.exttyp = b"FEI1"
    (tmp / "FoilHole_1_Data_2_3_20240101_120000.xml").write_text(
        '<MicroscopeImage xmlns="http://schemas.datacontract.org/2004/07/Fei.SharedObjects"><microscopeData><gun>'
        '<AccelerationVoltage>300000</AccelerationVoltage></gun></microscopeData></MicroscopeImage>')

    def per_call(fn):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k

    t_md = per_call(lambda: find_metadata(movie))
    t_hdr = per_call(lambda: validate_movie(movie, decode=False))
    g = OpticsGrouper(9)
    rng = np.random.default_rng(1)
    shifts, _ = multishot(50, 0.02, 0.0005, rng)
    for i, s in enumerate(shifts[:20]):
        g.add(f"w{i}", tuple(s))
    t0 = time.perf_counter()
    for i, s in enumerate(shifts[20:]):
        g.add(str(i), tuple(s))
    t_add = (time.perf_counter() - t0) / len(shifts[20:])
    print(f"3. find_metadata (EPU XML + FEI header) {t_md * 1e3:.2f} ms = {t_md / t_hdr:.1f}x validate_movie's header "
          f"check ({t_hdr * 1e3:.2f} ms); OpticsGrouper.add after learning {t_add * 1e6:.0f} µs "
          f"({t_add / t_hdr:.2f}x the header check)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    args = ap.parse_args()
    grouping_accuracy(args.seeds)
    star_overhead()
    read_cost()


if __name__ == "__main__":
    main()

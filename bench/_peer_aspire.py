"""bench/ctf.py peer runner: ASPIRE's CTF estimator (GPL-3) on micrographs listed in a manifest, in its own venv.

Run by bench/ctf.py as ``.bench-envs/aspire/bin/python bench/_peer_aspire.py MANIFEST OUT_JSON``, a separate
process; cryolive never imports ASPIRE. ``aspire.ctf.estimate_ctf`` is called on a folder holding one micrograph
(symbolic link) at a time, with ASPIRE's defaults (psd_size 512, 2 tapers) and the fit band of the manifest
(``g_min``/``g_max`` in Å), so each micrograph's time includes ASPIRE's per-call set-up (its basis).

Conventions (checked against the simulator's truth by bench/ctf.py): ``defocus_u/defocus_v`` in Å, ``defocus_ang``
in radians. ASPIRE builds its grid with ``indexing="yx"`` and measures the angle from the other axis: RELION's angle
(of U from the X axis, degrees) is ``90° − degrees(defocus_ang)`` (``ANGLE_SIGN`` / ``ANGLE_OFFSET_DEG`` below),
found on simulated micrographs with astigmatism > 200 Å (e.g. truth 72.6° ← ASPIRE 16.4°, 129.8° ← −40.7°) and
shown by bench/ctf.py's "convention check" line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time

ANGLE_SIGN = -1.0
ANGLE_OFFSET_DEG = 90.0


def main(argv: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.disable(logging.WARNING)
    import numpy as np
    import aspire
    from aspire.ctf import estimate_ctf

    if argv and argv[0] == "--check":
        print("aspire ok", aspire.__version__)
        return
    manifest_path, out_path = argv[:2]
    man = json.load(open(manifest_path))
    o = man["optics"]
    low, high = man["band_angstrom"]
    results = {}
    for item in man["micrographs"]:
        with tempfile.TemporaryDirectory() as d:
            os.symlink(os.path.abspath(item["path"]), os.path.join(d, item["name"] + ".mrc"))
            t0 = time.perf_counter()
            res = estimate_ctf(d, pixel_size=o["pixel_size_angstrom"], cs=o["cs_mm"],
                               amplitude_contrast=o["amplitude_contrast"], voltage=o["voltage_kv"],
                               psd_size=man.get("tile_size_px", 512), num_tapers=2, g_min=low, g_max=high,
                               output_dir=os.path.join(d, "out"))
            seconds = time.perf_counter() - t0
        r = res[item["name"] + ".mrc"]
        u, v = float(r["defocus_u"]), float(r["defocus_v"])
        ang = ANGLE_SIGN * float(np.degrees(r["defocus_ang"])) + ANGLE_OFFSET_DEG
        if v > u:
            u, v, ang = v, u, ang + 90.0
        ang = (ang + 90.0) % 180.0 - 90.0
        results[item["name"]] = dict(defocus_u=u, defocus_v=v, defocus_angle_deg=ang, seconds=seconds,
                                     raw=dict(defocus_u=float(r["defocus_u"]), defocus_v=float(r["defocus_v"]),
                                              defocus_ang_rad=float(r["defocus_ang"])))
        print(item["name"], results[item["name"]], flush=True)
    json.dump({"peer": "ASPIRE " + aspire.__version__, "results": results}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])

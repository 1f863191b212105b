"""``write_star(..., fast=True)`` writes the same text as starfile (and reads back the same tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryolive.io.star import read_star, write_star


def test_fast_writer_matches_starfile(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({f"rlnValue{i}": rng.normal(size=n) * 10.0**i for i in range(4)})
    df.loc[::7, "rlnValue2"] = np.nan
    df["rlnMicrographMovieName"] = [f"/data/my movies/m_{i}.tif" if i % 3 == 0 else f"/d/m_{i}.tif" for i in range(n)]
    df["cryoliveNote"] = ["" if i % 5 == 0 else "ctf_resolution_angstrom>6,manual_reject" for i in range(n)]
    df["rlnOpticsGroup"] = rng.integers(1, 3, n)
    blocks = {"general": {"rlnImageSizeX": 4096, "rlnMicrographMovieName": "a b.tif", "rlnVoltage": 300.0},
              "optics": df.iloc[:1], "micrographs": df, "empty": df.iloc[:0]}
    write_star(tmp_path / "slow.star", blocks)
    write_star(tmp_path / "fast.star", blocks, fast=True)
    slow = (tmp_path / "slow.star").read_text().split("\n", 1)[1]  # first line: starfile's time-stamped comment
    fast = (tmp_path / "fast.star").read_text().split("\n", 1)[1]
    assert fast == slow
    back = read_star(tmp_path / "fast.star")["micrographs"]
    assert len(back) == n and back["rlnValue2"].isna().sum() == df["rlnValue2"].isna().sum()
    assert back["rlnMicrographMovieName"].tolist() == df["rlnMicrographMovieName"].tolist()

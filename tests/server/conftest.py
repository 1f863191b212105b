"""Fixtures for the server tests: a facility with two users and two sessions built from simulated data.

``alpha`` (owned by alice) has 40 exposures done, 3 of them with physically simulated micrographs, picks and
2D classes, plus a 3D map and FSC curve; ``beta`` (owned by bob) has 12 exposures. Tokens: each user's valid
token, plus an expired one, a revoked one and one of a disabled user.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:  # the server's dependencies come with the test extra; without them the server tests are not collected
    import fastapi  # noqa: F401
    import httpx  # noqa: F401
except ImportError:  # pragma: no cover
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic_session import SyntheticSession  # noqa: E402

from cryolive.io.mrc import write_mrc  # noqa: E402
from cryolive.io.star import write_star  # noqa: E402
from cryolive.server.registry import REGISTRY_FILE, Registry, hash_token  # noqa: E402

SECRET_MARKER = "CRYOLIVE-SECRET-7f3a9c"  # content of a file outside every session folder


def write_map_and_fsc(out: Path, box: int = 48, pixel_size: float = 3.0, seed: int = 0) -> None:
    """A small density (a few Gaussian sub-units) and a falling FSC, laid out as CONTRACT's refine3d/."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((box, box, box)) - box / 2
    vol = np.zeros((box, box, box), np.float32)
    for c in rng.normal(0, box / 10, size=(12, 3)):
        vol += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)
    write_mrc(out / "refine3d" / "map.mrc", vol, pixel_size)
    k = np.arange(1, box // 2) / (box * pixel_size)
    fsc = 1 / (1 + np.exp((k - 0.1) / 0.01))
    write_star(out / "refine3d" / "fsc.star", {"fsc": pd.DataFrame({
        "rlnSpectralIndex": np.arange(1, box // 2), "rlnResolution": k, "rlnAngstromResolution": 1 / k,
        "rlnFourierShellCorrelationCorrected": fsc})})


class Facility:
    def __init__(self, root: Path, sessions: dict[str, SyntheticSession], tokens: dict[str, str]):
        self.root = root
        self.sessions = sessions
        self.tokens = tokens

    def headers(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


def make_facility(base: Path) -> Facility:
    root = base / "root"
    (base / "secret.txt").write_text(SECRET_MARKER + "\n")
    alpha = SyntheticSession(base / "sessions" / "alpha", seed=1)
    alpha.add_exposures(3, with_micrographs=3, finished=time.time() - 600)
    alpha.add_exposures(37)
    alpha.write_classes(8)
    write_map_and_fsc(alpha.out)
    beta = SyntheticSession(base / "sessions" / "beta", seed=2)
    beta.add_exposures(12)
    reg = Registry(root)
    for user in ("alice", "bob", "carol"):
        reg.add_user(user)
    tokens = {"alice": reg.issue_token("alice"), "bob": reg.issue_token("bob"), "carol": reg.issue_token("carol")}
    tokens["expired"] = reg.issue_token("alice", days=1)
    tokens["revoked"] = reg.issue_token("bob", days=1)
    reg.add_session("alpha", alpha.out, owner="alice", title="Krios 1 — alpha")
    reg.add_session("beta", beta.out, owner="bob")
    reg.add_user("mallory")
    tokens["disabled"] = reg.issue_token("mallory")
    reg.set_disabled("mallory")
    reg.close()
    db = sqlite3.connect(str(root / REGISTRY_FILE))
    db.execute("UPDATE tokens SET expires=? WHERE hash=?", (time.time() - 60, hash_token(tokens["expired"])))
    db.execute("UPDATE tokens SET revoked=1 WHERE hash=?", (hash_token(tokens["revoked"]),))
    db.commit()
    db.close()
    return Facility(root, {"alpha": alpha, "beta": beta}, tokens)


@pytest.fixture(scope="session")
def facility(tmp_path_factory) -> Facility:
    return make_facility(tmp_path_factory.mktemp("facility"))


@pytest.fixture(scope="session")
def app(facility):
    from cryolive.server.app import create_app

    return create_app(facility.root, poll_s=0.1)


@pytest.fixture()
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c

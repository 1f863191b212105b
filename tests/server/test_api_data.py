"""What the API serves agrees with the session's store and files (the dashboard shows the session, not a copy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from cryolive.session.curation import curate


def _same(a, b, tol=1e-3):
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return a is None and (b is None or math.isnan(b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_exposure_table_and_decisions_match_the_store(client, facility):
    s = facility.sessions["beta"]
    table = client.get("/api/sessions/beta/exposures", headers=facility.headers("bob")).json()
    with s.store() as store:
        summary = curate(store, record=False)
        ctf = {r["exposure_id"]: r["metrics"] for r in store.stage_results("ctf")}
        motion = {r["exposure_id"]: r["metrics"] for r in store.stage_results("motion")}
        done = [e.id for e in store.exposures("done")]
    assert table["ids"] == done
    for i, eid in enumerate(table["ids"]):
        c, m = ctf[eid], motion[eid]
        assert _same(table["metrics"]["defocus_angstrom"][i], 0.5 * (c["defocus_u"] + c["defocus_v"]))
        assert _same(table["metrics"]["ctf_resolution_angstrom"][i], c["max_resolution_angstrom"])
        assert _same(table["metrics"]["motion_total_angstrom"][i], m["accum_motion_total"])
        assert _same(table["metrics"]["ice_thickness"][i], c["ice_thickness_angstrom"])
    # the page's colours are the session's own decision
    frame_ids = summary.table.frame["exposure_id"].to_numpy()
    expected = dict(zip(frame_ids.tolist(), summary.decision.status.tolist()))
    assert table["status"] == [expected[e] for e in table["ids"]]


def test_websocket_pushes_exposures_finishing_out_of_order(client, facility):
    """Two workers: an exposure registered first may finish last. Both must reach the page."""
    s = facility.sessions["beta"]
    with client.websocket_connect("/api/sessions/beta/ws", headers=facility.headers("bob")) as ws:
        first = ws.receive_json()
        n0 = len(first["exposures"]["ids"])
        assert len(first["exposures"]["status"]) == n0 and "thresholds" in first
        with s.store() as store:
            early, _ = store.add_exposure(s.out / "movies" / "slow_one.tif")  # registered first, still running
            store.mark_processing(early)
        late = s.add_exposures(1)[0]  # registered after it, done first
        got = []
        while late not in got:
            got += ws.receive_json()["exposures"]["ids"]
        with s.store() as store:  # now the slow one finishes (its stages recorded, then done)
            for r in store.stage_results():
                if r["exposure_id"] == late:
                    store.record_stage(early, r["stage"], r["settings_hash"], r["metrics"], r["outputs"])
            store.mark_done(early, 10)
        while early not in got:
            got += ws.receive_json()["exposures"]["ids"]
        assert early < late and got.index(late) < got.index(early)


def test_websocket_refuses_other_origins(client, facility):
    h = facility.headers("alice")
    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect("/api/sessions/alpha/ws", headers={**h, "Origin": "http://127.0.0.1:9999"}) as ws:
            ws.receive_json()
    assert exc.value.code == 1008
    with client.websocket_connect("/api/sessions/alpha/ws", headers={**h, "Origin": "http://testserver"}) as ws:
        assert ws.receive_json()["type"] == "update"


def test_images_classes_and_3d(client, facility):
    h = facility.headers("alice")
    import imagecodecs

    mic = imagecodecs.png_decode(client.get("/api/sessions/alpha/exposures/1/micrograph.png", headers=h).content)
    assert mic.shape == (384, 384)
    small = imagecodecs.png_decode(
        client.get("/api/sessions/alpha/exposures/1/micrograph.png?size=100", headers=h).content)
    assert max(small.shape) <= 100
    picks = client.get("/api/sessions/alpha/exposures/1/picks", headers=h).json()
    assert len(picks["x"]) == len(picks["y"]) > 0 and picks["radius_px"] == pytest.approx(50.0)
    assert client.get("/api/sessions/alpha/exposures/10/micrograph.png", headers=h).status_code == 404
    profile = client.get("/api/sessions/alpha/exposures/1/ctf_profile", headers=h).json()
    assert len(profile["k_inv_angstrom"]) == len(profile["spectrum"]) == len(profile["ctf2"]) > 10
    classes = client.get("/api/sessions/alpha/classes", headers=h).json()["classes"]
    sprite = imagecodecs.png_decode(client.get("/api/sessions/alpha/classes.png", headers=h).content)
    assert len(classes) == 8 and sprite.shape[1] == 8 * sprite.shape[0]
    slices = imagecodecs.png_decode(client.get("/api/sessions/alpha/map/slices.png", headers=h).content)
    assert slices.shape == (48, 3 * 48)
    fsc = client.get("/api/sessions/alpha/fsc", headers=h).json()
    assert np.all(np.diff(fsc["fsc"]) <= 1e-6) and fsc["fsc"][0] > 0.9
    # beta has no 3D: the summary says so and the routes answer 404 (no placeholder data)
    beta = client.get("/api/sessions/beta", headers=facility.headers("bob")).json()
    assert beta["has_map"] is False and beta["has_fsc"] is False
    assert client.get("/api/sessions/beta/fsc", headers=facility.headers("bob")).status_code == 404


def test_bad_commands_are_refused_with_a_reason(client, facility):
    h = facility.headers("alice")
    r = client.put("/api/sessions/alpha/thresholds", headers=h, json={"changes": {"max_banana": 3}})
    assert r.status_code == 422 and "banana" in r.text
    r = client.put("/api/sessions/alpha/thresholds", headers=h,
                   json={"changes": {"min_defocus_angstrom": 30000, "max_defocus_angstrom": 10000}})
    assert r.status_code == 422 and "above" in r.text
    r = client.put("/api/sessions/alpha/classes/selection", headers=h, json={"selected": [99]})
    assert r.status_code == 422 and "99" in r.text
    r = client.put("/api/sessions/alpha/pause", headers=h, json={"paused": "maybe"})
    assert r.status_code == 422

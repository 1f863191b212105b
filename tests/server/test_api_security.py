"""The server's security properties, checked over every route the app has (not a hand-kept list):

- every route in ``/openapi.json`` (and every WebSocket route) refuses a missing, expired, revoked, forged or
  disabled user's token — so a route added without authentication fails here;
- a user gets nothing of another user's sessions, on every session-scoped route, WebSockets included;
- path-traversal payloads in every path and query parameter (and the static files) leak nothing.
"""

from __future__ import annotations

import re
import secrets

import pytest
from conftest import SECRET_MARKER
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.websockets import WebSocketDisconnect

VALID = {"session_id": "alpha", "exposure_id": "1"}
BODIES = {  # a valid body per (method, path) that takes one
    ("put", "/api/sessions/{session_id}/thresholds"): {"changes": {"max_motion_total_angstrom": 500.0}},
    ("put", "/api/sessions/{session_id}/classes/selection"): {"selected": [1, 3]},
    ("put", "/api/sessions/{session_id}/pause"): {"paused": False},
}


def _operations(schema: dict) -> list[tuple[str, str]]:
    return [(method, path) for path, item in schema["paths"].items() for method in item
            if method in ("get", "put", "post", "delete", "patch")]


def _fill(path: str, values: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def _bad_tokens(facility) -> dict[str, dict]:
    alice = facility.tokens["alice"]
    forged_same_shape = "cl_" + secrets.token_urlsafe(32)
    flipped = alice[:-1] + ("A" if alice[-1] != "A" else "B")
    return {
        "missing": {},
        "expired": {"Authorization": f"Bearer {facility.tokens['expired']}"},
        "revoked": {"Authorization": f"Bearer {facility.tokens['revoked']}"},
        "disabled user": {"Authorization": f"Bearer {facility.tokens['disabled']}"},
        "forged": {"Authorization": f"Bearer {forged_same_shape}"},
        "one character changed": {"Authorization": f"Bearer {flipped}"},
        "hash instead of token": {"Authorization": "Bearer " + __import__("hashlib").sha256(alice.encode()).hexdigest()},
        "empty bearer": {"Authorization": "Bearer "},
        "basic auth": {"Authorization": "Basic YWxpY2U6YWxpY2U="},
        "forged cookie": {"Cookie": f"cryolive_token={forged_same_shape}"},
        "expired cookie": {"Cookie": f"cryolive_token={facility.tokens['expired']}"},
        "very long": {"Authorization": "Bearer " + "x" * 5000},
    }


def routes_accepting_bad_tokens(client, facility) -> list[str]:
    """Every (method, path) of the OpenAPI schema that does not answer 401 to each bad token."""
    schema = client.get("/openapi.json").json()
    bad = []
    for method, path in _operations(schema):
        url = _fill(path, VALID)
        body = BODIES.get((method, path))
        for name, headers in _bad_tokens(facility).items():
            client.cookies.clear()
            r = client.request(method.upper(), url, headers=headers, json=body)
            if r.status_code != 401:
                bad.append(f"{method.upper()} {path} with {name} token: {r.status_code}")
    return bad


def test_openapi_is_public_and_lists_every_http_route(client, app):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = set(r.json()["paths"])
    routes = {route.path for route in app.routes if isinstance(route, APIRoute)}
    assert routes == paths  # nothing hidden from the schema (so the checks below see everything)
    assert len(paths) >= 15


def test_every_route_refuses_missing_expired_and_forged_tokens(client, facility):
    assert routes_accepting_bad_tokens(client, facility) == []


def test_every_route_works_with_a_valid_token(client, facility):
    """The same enumeration with alice's token: every route answers (so the 401s above are about the token)."""
    schema = client.get("/openapi.json").json()
    for method, path in _operations(schema):
        r = client.request(method.upper(), _fill(path, VALID), headers=facility.headers("alice"),
                           json=BODIES.get((method, path)))
        assert r.status_code == 200, (method, path, r.status_code, r.text[:200])


def test_a_route_added_without_auth_is_caught(app, facility):
    """Plant a route that bypasses the app's dependencies: both the route check and the enumeration catch it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cryolive.server.app import check_routes, create_app

    planted = create_app(facility.root)
    planted.router.routes.append(APIRoute("/api/leak", lambda: {"data": "everything"}, methods=["GET"]))
    planted.openapi_schema = None
    with pytest.raises(RuntimeError, match="/api/leak is not authenticated"):
        check_routes(planted)
    with TestClient(planted) as c:
        assert any("/api/leak" in b for b in routes_accepting_bad_tokens(c, facility))
    assert isinstance(app, FastAPI)


def _ws_routes(app) -> list[str]:
    return [route.path for route in app.routes if isinstance(route, APIWebSocketRoute)]


def test_websockets_refuse_bad_tokens(client, app, facility):
    assert _ws_routes(app), "the app should push over a WebSocket"
    for path in _ws_routes(app):
        url = _fill(path, VALID)
        for name, headers in _bad_tokens(facility).items():
            client.cookies.clear()
            with pytest.raises(WebSocketDisconnect) as exc:
                with client.websocket_connect(url, headers=headers) as ws:
                    ws.receive_json()
            assert exc.value.code == 1008, (path, name)
        with client.websocket_connect(url, headers=facility.headers("alice")) as ws:
            msg = ws.receive_json()
            assert msg["type"] == "update" and len(msg["exposures"]["ids"]) == 40


def test_login_sets_an_httponly_cookie_that_authenticates(client, facility):
    client.cookies.clear()
    assert client.get("/api/me").status_code == 401
    assert client.post("/api/login", headers={"Authorization": "Bearer forged"}).status_code == 401
    r = client.post("/api/login", headers=facility.headers("alice"))
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/me").json() == {"user": "alice"}
    client.post("/api/logout")
    client.cookies.clear()
    assert client.get("/api/me").status_code == 401


# ---------------------------------------------------------------------------------------------- isolation
def test_a_user_gets_nothing_of_another_users_sessions(client, facility, app):
    schema = client.get("/openapi.json").json()
    session_ops = [(m, p) for m, p in _operations(schema) if "{session_id}" in p]
    assert len(session_ops) >= 12
    alpha_store = facility.sessions["alpha"].store()
    before = (alpha_store.current_thresholds(), alpha_store.get_value("class2d_manual_selection"),
              alpha_store.get_value("paused"))
    names = {e.name for e in alpha_store.exposures()}
    for who in ("bob", "carol"):
        listed = client.get("/api/sessions", headers=facility.headers(who)).json()
        assert "alpha" not in {s["id"] for s in listed}
        for method, path in session_ops:
            r = client.request(method.upper(), _fill(path, VALID), headers=facility.headers(who),
                               json=BODIES.get((method, path)))
            assert r.status_code == 404, (who, method, path, r.status_code)
            assert not any(n in r.text for n in names)
            # and an unknown session looks exactly the same (no existence oracle)
            r2 = client.request(method.upper(), _fill(path, {**VALID, "session_id": "nosuch"}),
                                headers=facility.headers(who), json=BODIES.get((method, path)))
            assert (r2.status_code, r2.json()) == (r.status_code, r.json())
        for path in _ws_routes(app):
            with pytest.raises(WebSocketDisconnect) as exc:
                with client.websocket_connect(_fill(path, VALID), headers=facility.headers(who)) as ws:
                    ws.receive_json()
            assert exc.value.code == 1008
    after = (alpha_store.current_thresholds(), alpha_store.get_value("class2d_manual_selection"),
             alpha_store.get_value("paused"))
    assert after == before  # bob's and carol's commands changed nothing
    # bob sees his own session, and granting alice's to carol lets carol in
    assert client.get("/api/sessions/beta", headers=facility.headers("bob")).status_code == 200
    from cryolive.server.registry import Registry

    reg = Registry(facility.root)
    reg.grant("alpha", "carol")
    try:
        assert client.get("/api/sessions/alpha", headers=facility.headers("carol")).status_code == 200
        assert client.get("/api/sessions/alpha", headers=facility.headers("bob")).status_code == 404
    finally:
        reg._q("DELETE FROM grants WHERE session_id='alpha' AND user='carol'")
        reg.close()


# ---------------------------------------------------------------------------------------------- traversal
def traversal_payloads(secret_path: str) -> list[str]:
    targets = ["etc/passwd", "etc/shadow", "secret.txt", "root/server.sqlite", "server.sqlite", "session.sqlite",
               "proc/self/environ", "windows/win.ini"]
    ups = ["../", "..%2f", "%2e%2e%2f", "%2e%2e/", "..%252f", "....//", "..\\", "..%5c", "%c0%ae%c0%ae/",
           "..;/", ".%2e/", "%252e%252e%252f"]
    out = []
    for up in ups:
        for t in targets:
            out.append(up * 8 + t)
    out += ["/etc/passwd", "%2fetc%2fpasswd", secret_path, secret_path.replace("/", "%2f"), "file:///etc/passwd",
            "alpha/../beta", "alpha%00", "alpha%00.png", "../alpha", "./alpha", "~/.ssh/id_rsa", "$HOME",
            "..", ".", "%2e%2e", "alpha/..%2f..%2f..%2fetc%2fpasswd", "1/../../../etc/passwd", "1%2f..%2f..",
            "-1", "0", "1e3", "1.0", "0x1", "99999999999999999999999", "NaN", "' OR '1'='1", "1; DROP TABLE users",
            "<script>alert(1)</script>", "alpha\\..\\..\\etc\\passwd", "\u2025/etc/passwd", "%u002e%u002e/etc/passwd"]
    return out


def test_path_traversal_payloads_leak_nothing(client, facility):
    secret = str(facility.root.parent / "secret.txt")
    payloads = traversal_payloads(secret)
    assert len(payloads) >= 100
    schema = client.get("/openapi.json").json()
    forbidden = [SECRET_MARKER, "root:x:0:0", "SQLite format 3", "[boot loader]", "BEGIN OPENSSH"]
    n = 0
    for method, path in _operations(schema):
        if method != "get":
            continue
        params = re.findall(r"\{(\w+)\}", path)
        query = [p["name"] for p in schema["paths"][path]["get"].get("parameters", []) if p["in"] == "query"]
        for payload in payloads:
            for p in params:
                url = _fill(path, {**VALID, p: payload})
                r = client.get(url, headers=facility.headers("alice"))
                n += 1
                assert not any(f in r.text for f in forbidden), url
                sent = (r.history[0] if r.history else r).request.url.raw_path.decode()
                if sent != url:
                    continue  # the client itself resolved dot segments (e.g. "./alpha"): a legitimate URL was sent
                assert 400 <= r.status_code < 500, (url, r.status_code)
                assert not any(f in r.text for f in forbidden), url
            for q in query:
                r = client.get(_fill(path, VALID), params={q: payload}, headers=facility.headers("alice"))
                n += 1
                assert r.status_code in (200, 422) and not any(f in r.text for f in forbidden), (path, q, payload)
                if r.status_code == 200:  # a payload that parses (e.g. "0") must not change what is served
                    assert float(payload) == int(float(payload))  # an integer written another way
    for payload in payloads:  # the UI's static files
        r = client.get("/static/" + payload)
        n += 1
        assert not any(f in r.text for f in forbidden), payload
        if (r.history[0] if r.history else r).request.url.raw_path.decode() == "/static/" + payload:
            assert r.status_code in (400, 404, 405), payload
    assert n > 1000


def test_a_tampered_store_cannot_point_outside_the_session(client, facility, tmp_path):
    """Even if a store row names a file outside OUT/, the server refuses to read it."""
    import json

    from cryolive.server.app import create_app
    from cryolive.server.registry import Registry

    s = facility.sessions["alpha"]
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(s.out, copy)
    db = __import__("sqlite3").connect(str(copy / "session.sqlite"))
    secret = str(facility.root.parent / "secret.txt")
    for target in ("../../../secret.txt", secret, "../alpha/micrographs/../../secret.txt"):
        db.execute("UPDATE stage_results SET outputs=? WHERE exposure_id=1 AND stage='motion'",
                   (json.dumps({"micrograph": target}),))
        db.execute("UPDATE stage_results SET outputs=? WHERE exposure_id=1 AND stage='extraction'",
                   (json.dumps({"particles_star": target}),))
        db.execute("UPDATE stage_results SET outputs=? WHERE exposure_id=1 AND stage='ctf'",
                   (json.dumps({"ctf_star": target, "ctf_diag_png": target}),))
        db.commit()
        root = tmp_path / f"root{abs(hash(target))}"
        reg = Registry(root)
        reg.add_user("alice")
        token = reg.issue_token("alice")
        reg.add_session("t", copy, owner="alice")
        reg.close()
        from fastapi.testclient import TestClient

        with TestClient(create_app(root)) as c:
            h = {"Authorization": f"Bearer {token}"}
            for suffix in ("micrograph.png", "power_spectrum.png", "ctf_profile", "picks"):
                r = c.get(f"/api/sessions/t/exposures/1/{suffix}", headers=h)
                assert SECRET_MARKER not in r.text, (target, suffix)
                if suffix == "picks":  # the exposure is there, its particle file is not readable: no picks
                    assert r.status_code == 200 and r.json()["x"] == [], target
                else:
                    assert r.status_code == 404, (target, suffix)
    db.close()

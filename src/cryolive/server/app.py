"""The FastAPI application: REST + WebSocket push over the registered sessions, and the web UI.

Security model (tested in ``tests/server``):

- **Every API route is authenticated** by an application-wide dependency (:func:`authenticate`), so a route
  added later is authenticated without anyone remembering to; :func:`check_routes` refuses to build an app in
  which a route (HTTP or WebSocket) lacks it, or a route taking ``{session_id}`` lacks :func:`session_access`.
  Tokens come as ``Authorization: Bearer <token>`` or in the HttpOnly, SameSite=Strict cookie set by
  ``POST /api/login`` (which itself needs the bearer token). Public without a token: ``/openapi.json`` (no data),
  the UI's static files (``/`` and ``/static/...``, no data).
- **A user sees only their sessions**: every route with a session id goes through :func:`session_access`, which
  answers 404 alike for a session that does not exist and one the user may not see (WebSockets: close 1008).
- **No route takes a filesystem path**: sessions are named by registered ids, exposures by integer ids, classes by
  integer numbers; files are found from the store's records and checked to lie inside the session folder.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path as FsPath
from urllib.parse import urlsplit

from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Response, WebSocket, WebSocketDisconnect
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import WebSocketException
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection
from starlette.routing import Mount, Route

from .data import NotFound, SessionData
from .registry import NAME_RE, Registry

COOKIE = "cryolive_token"
STATIC = FsPath(__file__).parent / "static"
SESSION_ID = Path(..., min_length=1, max_length=64, pattern=NAME_RE.pattern, description="registered session id")
EXPOSURE_ID = Path(..., pattern=r"^[1-9][0-9]{0,17}$", description="exposure id (decimal digits only)")


# ---------------------------------------------------------------------------------------------- auth
def _token(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return conn.cookies.get(COOKIE)


def authenticate(conn: HTTPConnection) -> str:
    """The user behind the request's token; 401 (WebSocket: close 1008) without a valid one."""
    registry: Registry = conn.app.state.registry
    user = registry.authenticate(_token(conn))
    if conn.scope.get("type") == "websocket":
        # a browser sends the cookie with a WebSocket opened by any page of the same site (another port of this
        # host, say): only pages served by this server may open one
        origin = conn.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != conn.headers.get("host"):
            raise WebSocketException(code=1008, reason="cross-origin WebSocket refused")
    if user is None:
        if conn.scope.get("type") == "websocket":
            raise WebSocketException(code=1008, reason="not authenticated")
        raise HTTPException(status_code=401, detail="missing, expired or invalid token",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


def session_access(conn: HTTPConnection, session_id: str = SESSION_ID, user: str = Depends(authenticate)) -> SessionData:
    """The session if the user may see it; 404 otherwise (unknown and forbidden look the same)."""
    record = conn.app.state.registry.session_for_user(user, session_id)
    if record is None:
        if conn.scope.get("type") == "websocket":
            raise WebSocketException(code=1008, reason="no such session")
        raise HTTPException(status_code=404, detail="no such session")
    return conn.app.state.sessions.get(record.id, record.out_dir)


class SessionCache:
    """Open :class:`SessionData` objects by id (opened on first use)."""

    def __init__(self):
        import threading

        self._open: dict[str, SessionData] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str, out_dir: str) -> SessionData:
        with self._lock:
            sd = self._open.get(session_id)
            if sd is None or str(sd.out) != str(FsPath(out_dir).resolve()):
                try:
                    sd = SessionData(session_id, out_dir)
                except NotFound:
                    raise HTTPException(status_code=404, detail="session store missing") from None
                self._open[session_id] = sd
            return sd

    def close(self) -> None:
        with self._lock:
            for sd in self._open.values():
                sd.close()
            self._open.clear()


# ---------------------------------------------------------------------------------------------- models
class ThresholdChanges(BaseModel):
    """Bounds to change: ``{"max_ctf_resolution_angstrom": 6.0, "min_particle_count": null}`` (null removes)."""

    model_config = ConfigDict(extra="forbid")
    changes: dict[str, float | None] = Field(default_factory=dict)


class ClassSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    selected: list[int] = Field(default_factory=list, max_length=10000)


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paused: bool


def _not_found(fn, *args):
    try:
        return fn(*args)
    except NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def _png(data: bytes) -> Response:
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "private, max-age=5"})


def _clean(obj):
    """JSON-safe: NaN / inf → None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- app
def _warm(app: FastAPI) -> None:
    """Open every registered session and build its exposure table, so the first visitor waits for nothing."""
    for rec in app.state.registry.sessions():
        try:
            app.state.sessions.get(rec.id, rec.out_dir).summary()
        except Exception:  # a missing or broken session folder: its routes will say so
            continue


def create_app(root: str | os.PathLike, poll_s: float = 0.5, warm: bool = True) -> FastAPI:
    """The server over the facility registry at ``root`` (``root/server.sqlite``, see :mod:`.registry`).

    ``warm``: at start-up, build every registered session's tables in a background thread."""
    import contextlib
    import threading

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:
            threading.Thread(target=_warm, args=(app,), daemon=True, name="cryolive-warm").start()
        yield
        app.state.sessions.close()

    app = FastAPI(title="cryolive", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(authenticate)],
                  description="Live cryo-EM sessions: REST + WebSocket push. Every route needs a token "
                              "(Authorization: Bearer, or the cookie from POST /api/login).")
    app.state.registry = Registry(root, create=False)
    app.state.sessions = SessionCache()
    app.state.poll_s = float(poll_s)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' ws: wss:; "
                                    "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
        if request.url.path.startswith("/api/") and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    # -------------------------------------------------------------- login
    @app.post("/api/login", tags=["auth"])
    def login(response: Response, conn: HTTPConnection, user: str = Depends(authenticate)) -> dict:
        """Exchange the bearer token for an HttpOnly cookie (the browser UI's login)."""
        response.set_cookie(COOKIE, _token(conn) or "", httponly=True, samesite="strict",
                            secure=conn.url.scheme == "https", path="/")
        return {"user": user}

    @app.post("/api/logout", tags=["auth"])
    def logout(response: Response, user: str = Depends(authenticate)) -> dict:
        response.delete_cookie(COOKIE, path="/")
        return {"user": user}

    @app.get("/api/me", tags=["auth"])
    def me(user: str = Depends(authenticate)) -> dict:
        return {"user": user}

    # -------------------------------------------------------------- sessions
    @app.get("/api/sessions", tags=["sessions"])
    def list_sessions(conn: HTTPConnection, user: str = Depends(authenticate)) -> list[dict]:
        out = []
        for rec in conn.app.state.registry.sessions_for_user(user):
            item = {"id": rec.id, "title": rec.title, "owner": rec.owner}
            try:
                s = conn.app.state.sessions.get(rec.id, rec.out_dir).summary()
                item.update({k: s[k] for k in ("counts", "n_particles", "exposures_per_hour", "paused")})
            except HTTPException:
                item["error"] = "session store missing"
            out.append(_clean(item))
        return out

    @app.get("/api/sessions/{session_id}", tags=["sessions"])
    def session_summary(sd: SessionData = Depends(session_access)) -> dict:
        return _clean(sd.summary())

    @app.get("/api/sessions/{session_id}/exposures", tags=["exposures"])
    def exposures(sd: SessionData = Depends(session_access),
                  since_id: int = Query(0, ge=0, le=2**62, description="only exposures with a larger id")) -> dict:
        """The exposures done, columnar: ids, names, times, every metric, and the curation decision."""
        return sd.exposure_table(since_id)

    @app.get("/api/sessions/{session_id}/exposures/{exposure_id}", tags=["exposures"])
    def exposure(sd: SessionData = Depends(session_access), exposure_id: str = EXPOSURE_ID) -> dict:
        return _clean(_not_found(sd.exposure, int(exposure_id)))

    @app.get("/api/sessions/{session_id}/exposures/{exposure_id}/micrograph.png", tags=["exposures"],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def micrograph_png(sd: SessionData = Depends(session_access), exposure_id: str = EXPOSURE_ID,
                       size: int = Query(768, ge=64, le=2048)) -> Response:
        return _png(_not_found(sd.micrograph_png, int(exposure_id), size))

    @app.get("/api/sessions/{session_id}/exposures/{exposure_id}/picks", tags=["exposures"])
    def picks(sd: SessionData = Depends(session_access), exposure_id: str = EXPOSURE_ID) -> dict:
        return _not_found(sd.picks, int(exposure_id))

    @app.get("/api/sessions/{session_id}/exposures/{exposure_id}/power_spectrum.png", tags=["exposures"],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def power_spectrum_png(sd: SessionData = Depends(session_access), exposure_id: str = EXPOSURE_ID) -> Response:
        return _png(_not_found(sd.power_spectrum, int(exposure_id))[0])

    @app.get("/api/sessions/{session_id}/exposures/{exposure_id}/ctf_profile", tags=["exposures"])
    def ctf_profile(sd: SessionData = Depends(session_access), exposure_id: str = EXPOSURE_ID) -> dict:
        return _not_found(sd.power_spectrum, int(exposure_id))[1]

    # -------------------------------------------------------------- curation
    @app.get("/api/sessions/{session_id}/thresholds", tags=["curation"])
    def get_thresholds(sd: SessionData = Depends(session_access)) -> dict:
        from .curation_bridge import METRICS

        t = sd.thresholds()
        return {"thresholds": t.model_dump(),
                "metrics": {k: {"unit": m.unit, "description": m.description} for k, m in METRICS.items()}}

    @app.put("/api/sessions/{session_id}/thresholds", tags=["curation"])
    def put_thresholds(body: ThresholdChanges, sd: SessionData = Depends(session_access),
                       user: str = Depends(authenticate)) -> dict:
        """Change some bounds; every exposure is decided again at once and the decisions saved in the store."""
        try:
            t = sd.set_thresholds(body.changes, user)
        except (ValueError, TypeError) as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {"thresholds": t.model_dump(), "counts": sd.decision_arrays()["counts"]}

    @app.get("/api/sessions/{session_id}/decisions", tags=["curation"])
    def decisions(sd: SessionData = Depends(session_access)) -> dict:
        return sd.decision_arrays()

    # -------------------------------------------------------------- 2D
    @app.get("/api/sessions/{session_id}/classes", tags=["class2d"])
    def classes(sd: SessionData = Depends(session_access)) -> dict:
        return sd.classes()

    @app.get("/api/sessions/{session_id}/classes.png", tags=["class2d"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def classes_png(sd: SessionData = Depends(session_access)) -> Response:
        return _png(_not_found(sd.classes_png))

    @app.put("/api/sessions/{session_id}/classes/selection", tags=["class2d"])
    def put_class_selection(body: ClassSelection, sd: SessionData = Depends(session_access),
                            user: str = Depends(authenticate)) -> dict:
        """Select classes by number (1-based); saved in the store, where the session takes it up."""
        try:
            return _not_found(sd.set_class_selection, body.selected, user)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    # -------------------------------------------------------------- controls
    @app.put("/api/sessions/{session_id}/pause", tags=["controls"])
    def put_pause(body: PauseRequest, sd: SessionData = Depends(session_access),
                  user: str = Depends(authenticate)) -> dict:
        """Pause (no new exposures are started; work in flight finishes) or resume the session."""
        sd.set_paused(body.paused, user)
        return {"paused": body.paused}

    # -------------------------------------------------------------- 3D
    @app.get("/api/sessions/{session_id}/map/slices.png", tags=["3d"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def map_slices(sd: SessionData = Depends(session_access)) -> Response:
        return _png(_not_found(sd.map_slices_png))

    @app.get("/api/sessions/{session_id}/fsc", tags=["3d"])
    def fsc(sd: SessionData = Depends(session_access)) -> dict:
        return _not_found(sd.fsc)

    # -------------------------------------------------------------- push
    @app.websocket("/api/sessions/{session_id}/ws")
    async def session_ws(websocket: WebSocket, sd: SessionData = Depends(session_access),
                         since_id: int = Query(0, ge=0, le=2**62, description="skip exposures up to this id")):
        """Pushes ``{"type": "update", "summary", "exposures", "decisions"?, "thresholds"?}`` whenever the store
        changes (polled server-side every ``poll_s``). ``exposures``: the rows done that this connection has not
        sent yet (columnar; the first message has them all), whatever order they finished in. ``decisions`` (every
        exposure's status and reasons) and ``thresholds`` come first and whenever thresholds or manual overrides
        change. The client sends nothing but may close."""
        await websocket.accept()
        last_version = None
        sent: set[int] = set()
        last_curation = None
        try:
            while True:
                version = await asyncio.to_thread(sd.version)
                if version != last_version:
                    last_version = version
                    table = await asyncio.to_thread(sd.exposure_table, since_id, sent)
                    summary = await asyncio.to_thread(sd.summary)
                    curation = await asyncio.to_thread(lambda: (sd.store.curation_version(),
                                                                sd.thresholds().model_dump()))
                    msg = {"type": "update", "summary": _clean(summary), "exposures": table}
                    if curation != last_curation:  # first message, or thresholds / overrides changed
                        if last_curation is not None:  # (the first message's rows carry their decisions)
                            msg["decisions"] = await asyncio.to_thread(sd.decision_arrays)
                        msg["thresholds"] = curation[1]
                    last_curation = curation
                    sent.update(table["ids"])
                    await websocket.send_json(msg)
                try:
                    await asyncio.wait_for(websocket.receive_text(), timeout=websocket.app.state.poll_s)
                except asyncio.TimeoutError:
                    pass
        except WebSocketDisconnect:
            return

    # -------------------------------------------------------------- UI (static, no data, no token)
    async def index(request):
        return FileResponse(STATIC / "index.html")

    app.router.routes.append(Route("/", index, include_in_schema=False))
    app.router.routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))

    check_routes(app)
    return app


def _dependency_calls(dep: Dependant) -> set:
    out = {dep.call} if dep.call is not None else set()
    for sub in dep.dependencies:
        out |= _dependency_calls(sub)
    return out


def check_routes(app: FastAPI) -> None:
    """Refuse an app in which an API route lacks authentication, or a session route lacks the access check."""
    for route in app.routes:
        if isinstance(route, (APIRoute, APIWebSocketRoute)):
            calls = _dependency_calls(route.dependant)
            if authenticate not in calls:
                raise RuntimeError(f"route {route.path} is not authenticated")
            if "{session_id}" in route.path and session_access not in calls:
                raise RuntimeError(f"route {route.path} takes a session id without checking access to it")
        elif isinstance(route, Route) and route.path not in ("/", "/openapi.json"):
            raise RuntimeError(f"unexpected unauthenticated route {route.path}")


__all__ = ["create_app", "authenticate", "session_access", "check_routes", "JSONResponse"]

"""Is the dashboard usable within 1 s on a session of 10,000 exposures?

Builds a session folder with N exposures (store rows as the session writes them, metrics of a realistic
collection; a few simulated micrographs and 2D classes — ``tests/server/_synthetic_session.py``), registers it,
starts ``cryolive serve`` as a separate process, and measures:

1. the API requests the session page makes when it opens (``/api/me``, the session summary, the exposure table,
   thresholds, classes; then the WebSocket's first message), cold (first request after the server started: the
   store is opened and the table built) and warm (median of repeats);
2. in Debian's Chromium (Playwright, headless), the time from navigating to the session page to every metric
   plot drawn with all N exposures (``document.body.dataset.draws``), and
3. a threshold change (what a drag sends): re-deciding and recording N exposures and rewriting exposures.star.

Each is also measured on a baseline session of 100 exposures in the same run, and printed as a ratio (the
machine is shared, so absolute seconds are noisy; the ratio says how the page scales).

Usage::

    python bench/dashboard.py                  # 10,000 exposures (about a minute to build)
    python bench/dashboard.py --n 2000 --no-browser
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "server"))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(base: Path, n: int) -> Path:
    """A session folder with n exposures (3 with micrographs) and 8 classes."""
    from _synthetic_session import SyntheticSession

    s = SyntheticSession(base / f"session_{n}", seed=3)
    s.add_exposures(3, with_micrographs=3)
    s.add_exposures_bulk(n - 3)
    s.write_classes(8)
    return s.out


def _get(url: str, token: str, method: str = "GET", body: dict | None = None) -> tuple[float, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        payload = r.read()
    return time.perf_counter() - t0, payload


def _ws_first_message(base: str, sid: str, token: str) -> float:
    import asyncio

    import websockets

    async def go():
        t0 = time.perf_counter()
        async with websockets.connect(base.replace("http", "ws") + f"/api/sessions/{sid}/ws",
                                      additional_headers={"Authorization": f"Bearer {token}"},
                                      max_size=2**26) as ws:
            await ws.recv()
        return time.perf_counter() - t0

    return asyncio.run(go())


PAGE_REQUESTS = ["/api/me", "/api/sessions/{sid}", "/api/sessions/{sid}/exposures", "/api/sessions/{sid}/thresholds",
                 "/api/sessions/{sid}/classes"]


class Server:
    """``cryolive serve`` in its own process, on a free port."""

    def __init__(self, root: Path):
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from cryolive.cli import app; app()", "serve", "--root",
                                      str(root), "--port", str(port)], env=env)
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(self.base + "/openapi.json", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() - t0 < 60 and self.proc.poll() is None, "server did not start"
                time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def measure(root: Path, sid: str, token: str, browser: bool, repeats: int = 5) -> dict:
    """API timings on a freshly started server (its first requests are 'cold': the session's metrics cache in the
    store has never been built — a session folder no server or curation has read yet), then browser timings on a
    second fresh server (the store's cache now warm, as a running session keeps it)."""
    with Server(root) as server:
        out = _measure_api(server.base, sid, token, repeats)
    if browser:
        with Server(root) as server:
            out["browser"] = page_load(server.base, sid, token)
    return out


def _measure_api(base: str, sid: str, token: str, repeats: int) -> dict:
    out = {"cold": {}, "warm": {}}
    sizes = {}
    for path in PAGE_REQUESTS:  # cold: in the page's order, the first touches of the store
        dt, payload = _get(base + path.format(sid=sid), token)
        out["cold"][path] = dt
        sizes[path] = len(payload)
    for path in PAGE_REQUESTS:
        out["warm"][path] = statistics.median(_get(base + path.format(sid=sid), token)[0] for _ in range(repeats))
    out["sizes"] = sizes
    out["ws_first_message"] = statistics.median(_ws_first_message(base, sid, token) for _ in range(3))
    # a threshold change as a drag sends it (alternating values so each one re-decides)
    times = []
    for i in range(3):
        dt, _ = _get(base + f"/api/sessions/{sid}/thresholds", token, "PUT",
                     {"changes": {"max_ctf_resolution_angstrom": 6.0 + (i % 2)}})
        times.append(dt)
    out["threshold_change"] = statistics.median(times)
    return out


def page_load(base: str, sid: str, token: str, repeats: int = 3) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = b.new_context(viewport={"width": 1500, "height": 1100}, bypass_csp=True)
        page = ctx.new_page()
        page.goto(base + "/")
        page.fill("#token", token)
        page.click("#login-form button")
        page.wait_for_selector("#sessions:not([hidden]) .card")
        first_plot, all_done = [], []
        for _ in range(repeats):  # the first: right after the server started (and the login)
            page.goto("about:blank")
            t0 = time.perf_counter()
            page.goto(f"{base}/#/session/{sid}")
            page.wait_for_function("Number(document.body.dataset.draws || 0) >= 1", timeout=60000, polling=10)
            first_plot.append(time.perf_counter() - t0)
            page.wait_for_function("document.querySelectorAll('.cls').length > 0 && "
                                   "document.getElementById('live').classList.contains('on')", timeout=60000,
                                   polling=10)
            all_done.append(time.perf_counter() - t0)
        n_points = page.get_attribute("#series-defocus_angstrom", "data-n-points")
        b.close()
    return {"first_visit_s": first_plot[0], "first_plot_s": statistics.median(first_plot),
            "page_complete_s": statistics.median(all_done), "points_drawn": int(n_points)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="exposures in the session")
    ap.add_argument("--baseline", type=int, default=100, help="exposures in the baseline session")
    ap.add_argument("--no-browser", action="store_true", help="API timings only")
    ap.add_argument("--keep", type=Path, default=None, help="build the sessions here (default: a temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    browser = not args.no_browser and os.path.exists(CHROMIUM)
    from cryolive.server.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        t0 = time.perf_counter()
        outs = {n: build(base, n) for n in (args.baseline, args.n)}
        print(f"built sessions of {args.baseline} and {args.n} exposures in {time.perf_counter() - t0:.1f} s")
        root = base / "root"
        reg = Registry(root)
        reg.add_user("bench")
        token = reg.issue_token("bench", days=1)
        for n, out in outs.items():
            reg.add_session(f"s{n}", out, owner="bench")
        reg.close()
        results = {n: measure(root, f"s{n}", token, browser) for n in outs}

    small, big = results[args.baseline], results[args.n]
    print(f"\nsession page of {args.n} exposures vs {args.baseline} (same run; seconds are wall time on a shared "
          "machine, ratios are the figure to compare)")
    print(f"{'request':45s} {'cold s':>8s} {'warm s':>8s} {'bytes':>9s} {'warm ratio':>10s}")
    for path in PAGE_REQUESTS:
        print(f"{path:45s} {big['cold'][path]:8.3f} {big['warm'][path]:8.3f} {big['sizes'][path]:9d} "
              f"{big['warm'][path] / max(small['warm'][path], 1e-6):10.1f}")
    cold_total = sum(big["cold"].values())
    warm_total = sum(big["warm"].values())
    print(f"{'all initial requests, one after the other':45s} {cold_total:8.3f} {warm_total:8.3f}")
    print(f"{'WebSocket first message (the whole table)':45s} {'':8s} {big['ws_first_message']:8.3f} {'':9s} "
          f"{big['ws_first_message'] / max(small['ws_first_message'], 1e-6):10.1f}")
    print(f"{'threshold change (re-decide + record + STAR)':45s} {'':8s} {big['threshold_change']:8.3f} {'':9s} "
          f"{big['threshold_change'] / max(small['threshold_change'], 1e-6):10.1f}")
    if browser:
        bb, sb = big["browser"], small["browser"]
        print(f"\nChromium (headless), a new server on the same store: navigate → every metric plot drawn with "
              f"{bb['points_drawn']} points: first visit {bb['first_visit_s']:.3f} s, median of 3 "
              f"{bb['first_plot_s']:.3f} s (baseline {args.baseline} exposures: {sb['first_plot_s']:.3f} s, ratio "
              f"{bb['first_plot_s'] / sb['first_plot_s']:.1f}); page complete (classes, live link): "
              f"{bb['page_complete_s']:.3f} s")
        worst = max(bb["first_visit_s"], bb["first_plot_s"])
        print(f"usable within 1 s: {'yes' if worst < 1.0 else 'no'} (plots drawn at {worst:.2f} s at worst)")
    else:
        print(f"usable within 1 s (API only, cold): {'yes' if cold_total < 1.0 else 'no'} ({cold_total:.2f} s)")


if __name__ == "__main__":
    main()

"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against a live server.

The server runs in a thread (uvicorn) over a facility whose session ``alpha`` is built from simulated data
(:mod:`_synthetic_session`); the test writes new exposures into the session's store while the page is open, as
the session process does. Screenshots go to ``tests/server/screenshots/`` (or ``$CRYOLIVE_SCREENSHOTS``), their
paths printed (``pytest -s``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian's chromium is not installed (scripts/test.sh installs it)")
sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from conftest import make_facility  # noqa: E402

SCREENSHOTS = Path(os.environ.get("CRYOLIVE_SCREENSHOTS", Path(__file__).parent / "screenshots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from cryolive.server.app import create_app

    facility = make_facility(tmp_path_factory.mktemp("browser"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(facility.root, poll_s=0.2), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 20, "server did not start"
        time.sleep(0.05)
    yield facility, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, live):
    facility, url = live
    # bypass_csp: Playwright evaluates the tests' own wait conditions as strings (the app's CSP forbids eval)
    context = browser.new_context(viewport={"width": 1500, "height": 1100}, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", facility.tokens["alice"])
    page.click("#login-form button")
    page.wait_for_selector("#sessions:not([hidden]) .card")
    yield page
    context.close()
    assert errors == [], errors  # no JavaScript errors


def _shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _open_alpha(page, n: int) -> None:
    page.click(".card[data-session=alpha]")
    page.wait_for_function(f"document.body.dataset.nExposures === '{n}'", timeout=10000)


def test_plots_update_as_exposures_arrive(page, live):
    facility, _ = live
    session = facility.sessions["alpha"]
    n0 = session.n
    _open_alpha(page, n0)
    assert page.locator("#count-done").inner_text() == str(n0)
    assert page.get_attribute("#series-defocus_angstrom", "data-n-points") == str(n0)
    # the exposure browser: the first exposure has a simulated micrograph, its picks and its spectrum
    box = page.locator("#series-defocus_angstrom").bounding_box()
    page.mouse.click(box["x"] + 45, box["y"] + box["height"] / 2)  # the earliest exposures (left edge)
    page.wait_for_function("document.querySelectorAll('#picks circle').length > 0", timeout=10000)
    page.wait_for_function("document.getElementById('micrograph').naturalWidth > 0 && "
                           "document.getElementById('spectrum').naturalWidth > 0", timeout=10000)
    assert "FoilHole_1000_Data_0000" in page.locator("#exposure-title").inner_text()
    _shot(page, "dashboard_exposure_browser")

    # the session records new exposures while the page is open: the page follows without a reload
    page.check("#follow")
    t0 = time.monotonic()
    session.add_exposures(5)
    n1 = n0 + 5
    page.wait_for_function(f"document.body.dataset.nExposures === '{n1}' && "
                           f"document.getElementById('count-done').textContent === '{n1}'", timeout=10000)
    latency = time.monotonic() - t0
    for key in ("defocus_angstrom", "ctf_resolution_angstrom", "motion_total_angstrom", "ice_thickness",
                "particle_count"):
        assert page.get_attribute(f"#series-{key}", "data-n-points") == str(n1), key
    page.wait_for_function(f"document.getElementById('exposure-title').textContent.includes('Data_{n1 - 1:05d}')",
                           timeout=10000)
    print(f"new exposures shown {latency:.2f} s after they were recorded")
    _shot(page, "dashboard_live_update")


def _store_decisions(session):
    with session.store() as store:
        decisions = store.decisions()
        thresholds = store.current_thresholds()
        res = {e: r["metrics"]["max_resolution_angstrom"] for e, r in
               ((r["exposure_id"], r) for r in store.stage_results("ctf"))}
    return decisions, thresholds, res


def test_dragging_a_threshold_recurates(page, live):
    facility, _ = live
    session = facility.sessions["alpha"]
    _open_alpha(page, session.n)
    key = "ctf_resolution_angstrom"
    canvas = page.locator(f"#hist-{key}")
    lo, hi = (float(v) for v in canvas.get_attribute("data-range").split(","))
    width = float(page.evaluate(f"document.getElementById('hist-{key}').width"))
    box = canvas.bounding_box()

    def x_of(value):  # canvas pixels are CSS pixels here (370 × 110)
        return box["x"] + 44 + (value - lo) / (hi - lo) * (width - 44 - 8)

    before, _, res = _store_decisions(session)
    old_max = 10.0  # the session's default: settings.acceptance.max_ctf_resolution_angstrom
    target = 5.0
    page.mouse.move(x_of(old_max), box["y"] + 40)
    page.mouse.down()
    page.mouse.move(x_of(7.0), box["y"] + 40, steps=4)
    page.mouse.move(x_of(target), box["y"] + 40, steps=4)
    page.mouse.up()
    page.wait_for_function("document.body.dataset.thresholdSaves === '1'", timeout=10000)

    decisions, (tid, thresholds), res = _store_decisions(session)
    new_max = thresholds["max_ctf_resolution_angstrom"]
    assert abs(new_max - target) < 0.25, new_max
    assert thresholds["min_ctf_resolution_angstrom"] is None
    # every exposure's decision in the store follows the dragged bound, and some changed
    expected = {eid: int(r <= new_max) for eid, r in res.items()}
    assert {eid: s for eid, (s, _) in decisions.items()} == expected
    changed = [eid for eid in expected if before.get(eid, (int(res[eid] <= old_max),))[0] != expected[eid]]
    assert changed, "the drag should re-decide some exposures"
    assert all(f"ctf_resolution_angstrom>{new_max:g}" in decisions[e][1] for e in expected if not expected[e])
    # exposures.star, rewritten by the re-curation, agrees
    from cryolive.io.star import read_star

    star = read_star(session.out / "exposures.star")["micrographs"]
    assert int(star["cryoliveAccepted"].sum()) == sum(expected.values())
    # and the page shows the store's counts and colours
    n_rejected = len(expected) - sum(expected.values())
    page.wait_for_function(f"document.getElementById('count-rejected').textContent === '{n_rejected}'",
                           timeout=10000)
    status = page.evaluate("state.status")
    ids = page.evaluate("state.ids")
    assert [expected[i] for i in ids] == status
    _shot(page, "dashboard_threshold_drag")


def test_class_selection_is_saved_and_reaches_the_session(page, live):
    facility, _ = live
    session = facility.sessions["alpha"]
    _open_alpha(page, session.n)
    page.wait_for_function("document.querySelectorAll('.cls').length === 8", timeout=10000)
    auto = {int(c) for c in page.eval_on_selector_all(".cls.selected", "els => els.map(e => e.dataset['class'])")}
    assert auto == {1, 3, 5, 7}  # as classes.star says (cryoliveSelected)
    page.click(".cls[data-class='2']")
    page.click(".cls[data-class='3']")
    page.click("#save-selection")
    page.wait_for_function("document.getElementById('selection-status').dataset.saved === '1,2,5,7'", timeout=10000)
    _shot(page, "dashboard_class_selection")
    with session.store() as store:
        saved = store.get_value("class2d_manual_selection")
    assert saved["selected"] == [1, 2, 5, 7] and saved["by"] == "alice"
    from cryolive.classify2d import ClassSelection

    overrides = ClassSelection.from_dict(saved["class_selection"]).overrides  # 0-based, for classify2d
    assert overrides == {k: k + 1 in (1, 2, 5, 7) for k in range(8)}

    # the session takes it up: its 2D stage rewrites classes.star's selection from the store
    from cryolive.io.star import read_star
    from cryolive.session.session import Class2DStage

    with session.store() as store:
        stage = Class2DStage(session.out, session.settings, store, "cpu")
        assert stage.apply_selection() is True
        assert stage.apply_selection() is False  # once
    table = read_star(session.out / "class2d" / "classes.star")["model_classes"]
    chosen = table.loc[table["cryoliveSelected"] == 1, "rlnClassNumber"].to_numpy()
    np.testing.assert_array_equal(chosen, [1, 2, 5, 7])


def test_pause_button_pauses_the_session(page, live, tmp_path):
    import concurrent.futures as cf

    from cryolive.session.session import Session

    facility, _ = live
    session = facility.sessions["alpha"]
    _open_alpha(page, session.n)
    page.click("#pause")
    page.wait_for_function("document.getElementById('pause').textContent === 'Resume'", timeout=10000)
    with session.store() as store:
        assert store.get_value("paused")["paused"] is True

    class RecordingExecutor:  # the session's executor interface; records what the session starts
        capacity = 2

        def __init__(self):
            self.submitted = []

        def submit(self, fn, path, *args):
            self.submitted.append(path)
            return cf.Future()

        def shutdown(self, **kw):
            pass

    executor = RecordingExecutor()
    with Session(session.out, session.settings, executor=executor) as s:
        s.store.add_exposure(tmp_path / "new_movie.tif")
        s._submit_pending()
        assert executor.submitted == []  # paused: nothing new is started
        page.click("#pause")  # resume from the page
        page.wait_for_function("document.getElementById('pause').textContent === 'Pause'", timeout=10000)
        s._submit_pending()
        assert [Path(p).name for p in executor.submitted] == ["new_movie.tif"]
        s._in_flight.clear()
    _shot(page, "dashboard_resumed")

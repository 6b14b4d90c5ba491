"""The browser app under real use (issue 13), in real Chromium: downloads only through the UI,
errors that leave the page as it was, two editors, a dead server, feedback and timings.

One data folder is prepared through the CLI (a project of small synthetic scenes and a
finished run with the tiny test backbone), then `app.py serve` runs on it in a subprocess.
"""
from __future__ import annotations

import re
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stego_app import cli
from stego_app.ui.common import REFUSED_TITLE
from tests.test_ui_browser import (BACKBONE, CHROMIUM, CHROMIUM_ARGS, MISSING, AppServer, choose, close_toasts,
                                   expect, field, open_accordion, playwright_api, scene, shots, tab)

pytestmark = [pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    if MISSING:
        pytest.fail("; ".join(MISSING), pytrace=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data folder with project 'Streets' (8 images), run 1 done (4 clusters) and export 1."""
    base = tmp_path_factory.mktemp("realuse")
    photos = base / "photos"
    photos.mkdir()
    for i in range(8):
        scene(i).save(photos / f"street_{i}.png")
    data = base / "data"
    common = ["--data-dir", str(data), "--backbone", BACKBONE, "--device", "cpu"]
    assert cli.main(["ingest", "--project", "Streets", "--create", str(photos), *common]) == 0
    assert cli.main(["run", "--project", "Streets", "--resolution", "64", "--clusters", "4", "--steps", "20",
                     "--batch-size", "4", "--code-dim", "8", "--no-crf", "--quiet", *common]) == 0
    assert cli.main(["label", "1", "name", "0", "sky", *common]) == 0
    assert cli.main(["export", "1", *common]) == 0
    return base, data


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _status(url: str, cookies: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Cookie": cookies} if cookies else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _download_url(pg, server: AppServer) -> str:
    tab(pg, "Export")
    btn = pg.locator("#btn-download")
    expect(btn).to_be_visible(timeout=30_000)
    with pg.expect_download() as dl:
        btn.click()
    return dl.value.url


def _login(pg, user: str, password: str) -> None:
    pg.locator("input[type=text], input:not([type])").first.fill(user)
    pg.locator("input[type=password]").fill(password)
    pg.get_by_role("button", name=re.compile("login", re.I)).click()
    expect(pg.locator("#tabs")).to_be_visible(timeout=30_000)


@pytest.mark.parametrize("auth", [None, "tester:s3cret-pw"], ids=["no-auth", "auth"])
def test_exports_are_served_only_through_the_ui_under_unguessable_names(browser, prepared, auth, tmp_path):
    base, data = prepared
    export_zip = next((data / "exports").rglob("*.zip"))
    args = ["--backbone", BACKBONE, "--no-demo"] + (["--auth", auth] if auth else [])
    server = AppServer(data, args, tmp_path / "app.log")
    server.start(timeout=300)
    try:
        context = browser.new_context(accept_downloads=True)
        pg = context.new_page()
        pg.goto(server.url)
        if auth:
            _login(pg, *auth.split(":"))
        expect(pg.locator("#tabs")).to_be_visible(timeout=30_000)
        url = _download_url(pg, server)
        path = urllib.parse.unquote(url.split("file=", 1)[1])
        assert "/exports/" not in path and str(data) not in path, url
        assert any(len(part) >= 32 for part in Path(path).parts), url     # a random or secret-hashed folder
        cookies = "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())
        assert _status(url, cookies) == 200
        guessable = f"{server.url}gradio_api/file={export_zip}"
        assert _status(guessable, cookies) == 403                        # not even for a logged-in session
        assert _status(f"{server.url}gradio_api/file={data / 'stego.db'}", cookies) == 403
        if auth:
            assert _status(url) in (401, 403)                            # the real link, but not logged in
        context.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


# ---------------------------------------------------------------- one app for the page tests

@pytest.fixture(scope="module")
def app(prepared, tmp_path_factory):
    base, data = prepared
    server = AppServer(data, ["--backbone", BACKBONE, "--no-demo"], tmp_path_factory.mktemp("log") / "app.log")
    server.start(timeout=300)
    yield server
    server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()[-6000:]


@pytest.fixture(scope="module")
def db(prepared):
    import sqlite3

    path = prepared[1] / "stego.db"

    def query(sql: str, *params):
        con = sqlite3.connect(path, timeout=30)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    return query


def _open(browser, app, with_run: bool = True):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(app.url)
    expect(pg.locator("#tabs")).to_be_visible(timeout=120_000)
    if with_run:
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run \d"), timeout=30_000)
    return context, pg


def _toast(pg, text: str, title: str | None = None):
    toast = pg.locator(".toast-body").filter(has_text=text).first
    expect(toast).to_be_visible(timeout=20_000)
    if title:
        expect(toast).to_contain_text(title)
    return toast


def _error_badges(pg) -> int:
    """Gradio's red per-component "Error" status badges (what a raised gr.Error leaves behind)."""
    return pg.locator(".wrap span.error, .wrap .error").count()


def _card(pg, index: int):
    return pg.locator(f"#cluster-cards .stego-card[data-cluster='{index}']")


def _select(pg, *indices: int) -> None:
    for i in indices:
        pg.locator("#cluster-select label").filter(has_text=re.compile(rf"(^|\s)#{i}(\s|$)")).click()


def test_errors_leave_every_component_as_it_was(browser, app, db):
    context, pg = _open(browser, app)
    try:
        project = field(pg, "project-select").input_value()
        expect(pg.locator("#project-info")).to_contain_text("8 usable images")
        n_thumbs = pg.locator("#project-images .thumbnail-item").count()
        assert project == "Streets (8 images)" and n_thumbs == 8
        for action, message in ((lambda: pg.locator("#btn-ingest-upload").click(), "upload box"),
                                (lambda: (field(pg, "new-project-name").fill("   "),
                                          pg.locator("#btn-create-project").click()), "must not be empty"),
                                (lambda: (field(pg, "new-project-name").fill("streets"),
                                          pg.locator("#btn-create-project").click()), "already exists"),
                                (lambda: (field(pg, "server-folder").fill("/etc"),
                                          pg.locator("#btn-ingest-folder").click()), "disabled")):
            action()
            _toast(pg, message, REFUSED_TITLE)
            pg.wait_for_timeout(500)
            assert _error_badges(pg) == 0
            expect(field(pg, "project-select")).to_have_value(project)
            expect(pg.locator("#project-info")).to_contain_text("8 usable images in this project")
            assert "Error" not in pg.locator("#project-info").inner_text()
            expect(pg.locator("#project-images .thumbnail-item")).to_have_count(n_thumbs)
            expect(field(pg, "run-select")).to_have_value(re.compile(r"Run 1"))
            close_toasts(pg)
        assert db("SELECT COUNT(*) FROM projects")[0][0] == 1
    finally:
        context.close()


def _dependency_ids(app, trigger: str) -> set[int]:
    """The fn_index values (list position and id) of the page's events fired by ``trigger``."""
    import json

    with urllib.request.urlopen(f"{app.url}config", timeout=30) as r:
        config = json.loads(r.read())
    return {i for i, dep in enumerate(config["dependencies"])
            if any(t[1] == trigger for t in dep.get("targets", []))} | \
        {dep["id"] for dep in config["dependencies"] if any(t[1] == trigger for t in dep.get("targets", []))}


def _fn_index(route) -> int | None:
    """The event a queued Gradio request (a route of **/queue/join) is for."""
    import json

    try:
        return json.loads(route.request.post_data or "{}").get("fn_index")
    except ValueError:
        return None


def test_nothing_is_pressed_before_the_page_has_loaded_its_project(browser, app, db):
    """A click landing before the page's first load answered used to reach the server without a
    project and was refused ("create or choose a project with images first") although the project
    showed a moment later. Now nothing can be pressed until that load is in."""
    loads = _dependency_ids(app, "load")
    assert loads
    held = []

    def hold_load(route):
        if _fn_index(route) in loads and not held:
            held.append(route)               # answered below, when the test lets it go
        else:
            route.continue_()

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.route("**/queue/join*", hold_load)
    try:
        pg.goto(app.url)
        expect(pg.locator("#tabs")).to_be_visible(timeout=120_000)
        for _ in range(100):
            if held:
                break
            pg.wait_for_timeout(100)
        assert held, "the page's load event was never sent"
        assert pg.evaluate("() => getComputedStyle(document.querySelector('#tabs')).pointerEvents") == "none"
        with pytest.raises(playwright_api.TimeoutError):
            pg.get_by_role("tab", name=re.compile("Discover")).click(timeout=2_000)
        with pytest.raises(playwright_api.TimeoutError):
            pg.locator("#btn-refresh").click(timeout=1_000)
        held.pop().continue_()
        expect(field(pg, "project-select")).to_have_value("Streets (8 images)")
        tab(pg, "Discover")                            # pressable now, and Start carries the project
        field(pg, "n-clusters").fill("500")
        pg.locator("#btn-start").click()
        _toast(pg, "Number of clusters 500 must be between 2 and 256", REFUSED_TITLE)
        assert pg.locator(".toast-body").filter(has_text="choose a project").count() == 0
        assert db("SELECT COUNT(*) FROM runs")[0][0] == 1
    finally:
        context.close()


def _tick_ids(app) -> set[int]:
    return _dependency_ids(app, "tick")


def test_two_tabs_stale_edit_refused_and_changes_picked_up(browser, app, db):
    ctx_a, a = _open(browser, app)
    ctx_b, b = _open(browser, app)
    try:
        for pg in (a, b):
            tab(pg, "Clusters")
            expect(_card(pg, 0)).to_have_attribute("data-label", "sky")
        ticks = _tick_ids(app)
        blocked = {"on": True}

        def hold_ticks(route):        # tab B does not poll for now: it keeps showing what it showed
            if blocked["on"] and _fn_index(route) in ticks:
                route.abort()
            else:
                route.continue_()
        b.route("**/queue/join*", hold_ticks)
        b.wait_for_timeout(1500)

        _select(a, 1)
        field(a, "label-name").fill("road")
        a.locator("#btn-name").click()
        _toast(a, "Cluster #1 is now 'road'")
        expect(_card(a, 1)).to_have_attribute("data-label", "road")

        _select(b, 1)                                    # B still shows cluster 1 unnamed
        expect(_card(b, 1)).to_have_attribute("data-label", "")
        field(b, "label-name").fill("grass")
        b.locator("#btn-name").click()
        _toast(b, "changed elsewhere", "Not saved")
        expect(_card(b, 1)).to_have_attribute("data-label", "road")    # refreshed to the current state
        assert db("SELECT l.name FROM clusters c JOIN labels l ON c.label_id = l.id "
                  "WHERE c.run_id = 1 AND c.\"index\" = 1")[0][0] == "road"
        assert db("SELECT COUNT(*) FROM labels WHERE name = 'grass'")[0][0] == 0

        # the quick-naming box states its page's version too
        close_toasts(a)
        close_toasts(b)
        _select(a, 1)
        field(a, "label-name").fill("asphalt")
        a.locator("#btn-name").click()
        _toast(a, "Cluster #1 is now 'asphalt'")
        focus = b.locator("#quick-focus-inner").get_attribute("data-cluster")
        box = field(b, "quick-name")
        box.fill("hedge")
        box.press("Enter")
        _toast(b, "changed elsewhere", "Not saved")
        expect(_card(b, 1)).to_have_attribute("data-label", "asphalt")
        assert db("SELECT COUNT(*) FROM labels WHERE name = 'hedge'")[0][0] == 0, focus

        # with polling back on, B picks up A's next edit by itself
        blocked["on"] = False
        close_toasts(a)
        _select(a, 3)
        field(a, "label-name").fill("tree")
        a.locator("#btn-name").click()
        _toast(a, "Cluster #3 is now 'tree'")
        expect(_card(b, 3)).to_have_attribute("data-label", "tree", timeout=8_000)
    finally:
        ctx_a.close()
        ctx_b.close()


def test_feedback_toasts_and_confirmation_before_deleting_a_name(browser, app, db):
    context, pg = _open(browser, app)
    try:
        tab(pg, "Clusters")
        expect(_card(pg, 0)).to_have_attribute("data-label", "sky")
        _select(pg, 2)
        pg.locator("#btn-ignore").click()
        _toast(pg, "Cluster #2 ignored")
        expect(_card(pg, 2)).to_have_attribute("data-ignored", "1")
        _select(pg, 2)
        pg.locator("#btn-unignore").click()
        _toast(pg, "Cluster #2 no longer ignored")
        expect(_card(pg, 2)).to_have_attribute("data-ignored", "0")

        choose(pg, "colour-label", "sky")
        pg.locator("#colour-picker .dialog-button").click()
        hex_box = pg.locator("#colour-picker .input-wrap input")
        hex_box.fill("#123456")
        hex_box.press("Enter")
        pg.locator("#colour-label").click()
        pg.locator("#btn-colour").click()
        _toast(pg, "'sky' is now shown in #123456")

        # thing or stuff, per label: guessed from the name until a person chooses
        expect(pg.locator("#label-kinds")).to_contain_text("sky (guessed)")
        close_toasts(pg)
        choose(pg, "colour-label", "sky")
        pg.locator("#kind-pick label").filter(has_text="thing: one object per region").click()
        pg.locator("#btn-kind").click()
        _toast(pg, "'sky' is exported as thing.")
        assert db("SELECT isthing FROM labels WHERE name = 'sky'")[0][0] == 1
        expect(pg.locator("#label-kinds")).to_contain_text("Things (one annotation per object): sky")

        # "sky" names cluster 0 only: undoing deletes the name, so it asks first
        close_toasts(pg)
        _select(pg, 0)
        pg.locator("#btn-unmerge").click()
        expect(pg.locator("#unname-confirm")).to_be_visible()
        expect(pg.locator("#unname-question")).to_contain_text("deletes the name 'sky'")
        pg.locator("#btn-unname-no").click()
        expect(pg.locator("#unname-confirm")).to_be_hidden()
        assert db("SELECT COUNT(*) FROM labels WHERE run_id = 1 AND name = 'sky'")[0][0] == 1
        expect(_card(pg, 0)).to_have_attribute("data-label", "sky")
        pg.locator("#btn-unmerge").click()                      # cluster 0 is still selected
        pg.locator("#btn-unname-yes").click()
        _toast(pg, "Cluster #0 is unnamed again")
        expect(_card(pg, 0)).to_have_attribute("data-label", "")
        expect(pg.locator("#unname-confirm")).to_be_hidden()
        assert db("SELECT COUNT(*) FROM labels WHERE run_id = 1 AND name = 'sky'")[0][0] == 0
    finally:
        context.close()


def test_discover_form_shows_the_run_settings_and_limits_are_said(browser, app, db):
    context, pg = _open(browser, app)
    try:
        tab(pg, "Discover")
        expect(field(pg, "n-clusters")).to_have_value("4")
        expect(field(pg, "resolution")).to_have_value("64")
        expect(pg.locator("#crf input")).not_to_be_checked()
        open_accordion(pg, "advanced")
        expect(field(pg, "steps")).to_have_value("20")
        expect(field(pg, "code-dim")).to_have_value("8")
        field(pg, "n-clusters").fill("500")
        pg.locator("#btn-start").click()
        _toast(pg, "Number of clusters 500 must be between 2 and 256", REFUSED_TITLE)
        assert db("SELECT COUNT(*) FROM runs")[0][0] == 1
        expect(field(pg, "n-clusters")).to_have_value("500")       # not clamped behind the user's back
        assert _error_badges(pg) == 0
    finally:
        context.close()


def test_status_panel_times_and_no_dimming_on_polls(browser, app, db, shots):
    context, pg = _open(browser, app)
    try:
        tab(pg, "Discover")
        box = pg.locator("#run-status-box")
        expect(box).to_have_attribute("data-status", "done")
        expect(box.locator("tr[data-stage='training'] .stego-stage-time")).to_have_text(re.compile(r"\d"))
        # the panel is polled every second; sample its opacity for 4 s
        low = pg.evaluate("""() => new Promise(done => {
            const el = document.querySelector('#run-status .html-container') || document.querySelector('#run-status');
            let low = 1; const t0 = performance.now();
            const look = () => { low = Math.min(low, parseFloat(getComputedStyle(el).opacity));
                                 if (performance.now() - t0 < 4000) requestAnimationFrame(look); else done(low); };
            look(); })""")
        assert low == 1.0, f"the status panel dimmed to opacity {low}"

        # a long run: elapsed and remaining time per stage and for the run
        open_accordion(pg, "advanced")
        field(pg, "steps").fill("100000")
        pg.locator("#btn-start").click()
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run 2"))
        expect(box.locator("tr.stego-stage-active[data-stage='training']")).to_be_visible(timeout=120_000)
        expect(box.locator("tr[data-stage='training'] .stego-stage-time")).to_have_text(
            re.compile(r"\d.* s · about .* left"), timeout=60_000)
        expect(box.locator(".stego-run-time")).to_have_text(re.compile(r"\d.* s · about .* left"))
        expect(box.locator("tr[data-stage='segments'] .stego-stage-time")).to_contain_text("about")
        shoot_path = shots / "status_times.png"
        pg.screenshot(path=str(shoot_path), full_page=True)
        pg.locator("#btn-cancel").click()
        expect(box).to_have_attribute("data-status", "cancelled", timeout=60_000)
    finally:
        context.close()


def test_a_run_started_on_one_page_shows_there_while_another_page_polls(browser, app, db):
    """Two pages on one server, both polling: the page that presses Start gets its run at once
    (seen once with real weights: the answer came minutes late and the run list never showed it);
    the other page finds it with Refresh, and a cancel from there shows on the first."""
    ctx_a, a = _open(browser, app)
    ctx_b, b = _open(browser, app)
    try:
        tab(a, "Discover")                                   # A polls its run every second
        expect(a.locator("#run-status-box")).to_have_attribute("data-status", re.compile(r"done|cancelled"))
        new = db("SELECT MAX(id) FROM runs")[0][0] + 1
        tab(b, "Discover")
        open_accordion(b, "advanced")
        field(b, "steps").fill("100000")
        b.locator("#btn-start").click()
        _toast(b, f"Run {new} started")
        expect(field(b, "run-select")).to_have_value(re.compile(rf"Run {new} "))
        expect(b.locator("#run-status-box")).to_have_attribute("data-status", re.compile(r"queued|running"))
        a.locator("#btn-refresh").click()
        choose(a, "run-select", f"Run {new} ")
        expect(a.locator("#run-status-box")).to_have_attribute("data-status", re.compile(r"queued|running"))
        a.locator("#btn-cancel").click()
        expect(b.locator("#run-status-box")).to_have_attribute("data-status", "cancelled", timeout=60_000)
        assert db("SELECT status FROM runs WHERE id = ?", new)[0][0] == "cancelled"
    finally:
        ctx_a.close()
        ctx_b.close()


def test_a_busy_server_is_not_taken_for_a_dead_one(browser, app):
    """A server that answers slowly (busy ingesting, say) must not make the tab reload itself:
    that closed the open form and dropped what was typed (seen under CI load)."""
    context, pg = _open(browser, app)
    try:
        pg.evaluate("() => { window.__stego_same_page = true; }")
        tab(pg, "Discover")
        open_accordion(pg, "advanced")
        assert pg.evaluate("() => window.__stego_same_page === true"), "the page reloaded itself on opening"
        field(pg, "steps").fill("1234")
        banner = pg.locator("#stego-connection-lost")
        app.proc.send_signal(signal.SIGSTOP)           # no answers, but the connection stays open
        try:
            expect(banner).to_be_visible(timeout=45_000)   # two pings in a row timed out
        finally:
            app.proc.send_signal(signal.SIGCONT)
        expect(banner).to_be_hidden(timeout=30_000)    # the same server answers again
        pg.wait_for_timeout(3_000)                     # a reload would have happened by now
        assert pg.evaluate("() => window.__stego_same_page === true"), "the page reloaded itself"
        expect(field(pg, "steps")).to_be_visible()
        expect(field(pg, "steps")).to_have_value("1234")
    finally:
        context.close()


def test_dead_server_is_shown_and_the_tab_comes_back_to_its_project_and_run(browser, app, db):
    context, pg = _open(browser, app)
    try:
        field(pg, "new-project-name").fill("Other")              # the newest project, not the one in use
        pg.locator("#btn-create-project").click()
        expect(field(pg, "project-select")).to_have_value("Other (0 images)")
        expect(field(pg, "run-select")).to_have_value("")       # the switch to Other is complete
        choose(pg, "project-select", "Streets")
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run \d"))   # so this is Streets' list
        tab(pg, "Discover")                                      # where the run's status shows
        choose(pg, "run-select", "Run 1")
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run 1"))
        # the list opened again while the run loads keeps every run: the run's views must not
        # send new choices, which would make Gradio filter the open list down to the selected run
        field(pg, "run-select").click()
        expect(pg.locator("#run-status-box")).to_have_attribute("data-status", "done")
        expect(pg.locator("ul.options li", has_text="Run 2")).to_be_visible()
        pg.keyboard.press("Escape")
        field(pg, "run-select").blur()
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run 1"))
        pg.wait_for_function("() => location.search.includes('run=1')")
        banner = pg.locator("#stego-connection-lost")
        expect(banner).to_be_hidden()

        app.proc.send_signal(signal.SIGKILL)                     # kill -9: no goodbye to the page
        app.proc.wait(timeout=30)
        expect(banner).to_be_visible(timeout=15_000)
        expect(banner).to_contain_text("Connection to the server lost")
        with pg.expect_navigation(timeout=120_000):              # back by itself once the server is
            app.stop()
            app.start()
        expect(pg.locator("#tabs")).to_be_visible()
        expect(field(pg, "project-select")).to_have_value("Streets (8 images)", timeout=30_000)
        expect(field(pg, "run-select")).to_have_value(re.compile(r"Run 1 · Finished"), timeout=30_000)
        expect(banner).to_be_hidden()
    finally:
        context.close()


def test_one_image_project_and_removing_images(browser, app, db, prepared, shots, tmp_path):
    context, pg = _open(browser, app, with_run=False)
    try:
        choose(pg, "project-select", "Other")
        expect(field(pg, "project-select")).to_have_value("Other (0 images)")
        one = tmp_path / "solo.png"
        scene(42).save(one)
        pg.locator("#upload-files input[type=file]").set_input_files([str(one)])
        expect(pg.locator("#upload-files tbody tr")).to_have_count(1, timeout=30_000)
        pg.locator("#btn-ingest-upload").click()
        expect(field(pg, "project-select")).to_have_value("Other (1 image)", timeout=60_000)
        thumb = pg.locator("#project-images .thumbnail-item")
        expect(thumb).to_have_count(1)
        box = thumb.bounding_box()
        assert box["width"] <= 160 and box["height"] <= 160, box        # a thumbnail, not a poster
        pg.screenshot(path=str(shots / "one_image.png"), full_page=True)

        thumb.click()
        expect(pg.locator("#remove-select")).to_contain_text("solo.png")   # picked before Remove is pressed
        pg.locator("#btn-remove").click()                     # asked first; "Keep them" keeps them
        expect(pg.locator("#remove-question")).to_contain_text("Remove 1 image from the project?")
        pg.locator("#btn-remove-no").click()
        expect(pg.locator("#remove-confirm")).to_be_hidden()
        assert db("SELECT COUNT(*) FROM images i JOIN projects p ON i.project_id = p.id WHERE p.name = 'Other'")[0][0] == 1
        pg.locator("#btn-remove").click()
        pg.locator("#btn-remove-yes").click()
        _toast(pg, "1 image removed from the project")
        expect(pg.locator("#remove-confirm")).to_be_hidden()
        expect(field(pg, "project-select")).to_have_value("Other (0 images)")
        expect(thumb).to_have_count(0)

        # an image run 1 used: gone from the project, still shown by run 1, which says so
        close_toasts(pg)
        choose(pg, "project-select", "Streets")
        expect(pg.locator("#project-images .thumbnail-item")).to_have_count(8)
        pg.locator("#project-images .thumbnail-item").nth(0).click()
        expect(pg.locator("#remove-select")).to_contain_text("street_0.png")
        pg.locator("#btn-remove").click()
        pg.locator("#btn-remove-yes").click()
        _toast(pg, "stay readable in the run")
        expect(field(pg, "project-select")).to_have_value("Streets (7 images)")
        choose(pg, "run-select", "Run 1")
        tab(pg, "Discover")
        expect(pg.locator("#run-stale-note")).to_contain_text("1 image of this run was removed")
        tab(pg, "Explore")
        expect(pg.locator("#explore-gallery .thumbnail-item")).to_have_count(8)
        assert db("SELECT status FROM images WHERE name = 'street_0.png'")[0][0] == "removed"
    finally:
        context.close()

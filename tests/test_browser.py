"""The app in a real browser: Playwright driving Debian's chromium against the app served on loopback.

Two annotators log in and each annotates three items with the keyboard alone; a researcher sees
the six annotations and downloads an export, whose contents are checked; an item carrying
`<script>` and `<img onerror>` payloads shows them as text and runs nothing. One screenshot per
page goes to tests/artifacts/ (ignored by git) for a person to look at.

    .venv/bin/pytest tests/test_browser.py -m browser

Skipped, with the reason, where /usr/bin/chromium is absent (`make test` installs it).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation.store import Annotation, User, make_engine, session_factory
from browser_helpers import IMG_PAYLOAD, MD_PAYLOAD, PASSWORD, PROJECT, SCRIPT_PAYLOAD, free_port, prepare_store, start_app

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STRENGTH_NAMES = {"Q": "slight", "W": "clear", "E": "strong"}
WAIT_MS = 60_000  # per step; on a shared, loaded machine a Streamlit rerun can take many seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; make test does it)"),
]


@pytest.fixture(scope="module")
def app_db(tmp_path_factory) -> str:
    where = tmp_path_factory.mktemp("browser_app")
    db_url = f"sqlite:///{where / 'rlhf.db'}"
    prepare_store(where / "data", db_url).dispose()
    return db_url


@pytest.fixture(scope="module")
def app_url(app_db):
    where = Path(app_db.split("///", 1)[1]).parent
    data_dir, db_url = where / "data", app_db
    port = free_port()
    proc = start_app(REPO, {"RLHF_DATA_DIR": str(data_dir), "RLHF_DB_URL": db_url, "HF_HUB_OFFLINE": "1"}, port, where / "streamlit.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


OPEN_PAGES: list = []
# Every request a page made to anywhere but the app's own origin (a remote image in item text, say).
FOREIGN_REQUESTS: list[str] = []


def new_page(browser, origin: str | None = None):
    # Tall enough that a whole annotation screen fits in one screenshot (Streamlit scrolls inside the page).
    context = browser.new_context(viewport={"width": 1400, "height": 1900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    if origin is not None:
        def record(request):
            if not (request.url.startswith(origin + "/") or request.url == origin or request.url.startswith(("data:", "blob:"))):
                FOREIGN_REQUESTS.append(request.url)
        page.on("request", record)
    OPEN_PAGES.append(page)
    return page


@contextlib.contextmanager
def screenshots_on_failure():
    """When a step fails, keep what each open browser page showed (tests/artifacts/failure-N.png)."""
    OPEN_PAGES.clear()
    try:
        yield
    except BaseException:
        for i, page in enumerate(p for p in OPEN_PAGES if not p.is_closed()):
            page.screenshot(path=str(ARTIFACTS / f"failure-{i}.png"))
        raise


def log_in(page, url: str, username: str, screenshot: str | None = None):
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("textbox", name="Username").fill(username)
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    if screenshot:
        page.screenshot(path=str(ARTIFACTS / screenshot))
    page.keyboard.press("Enter")
    expect(page.get_by_text(f"Welcome, {username}")).to_be_visible()


def go_to(page, title: str):
    """Open a page from the sidebar menu: a click keeps the Streamlit session (a reload would log out)."""
    from playwright.sync_api import expect

    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible()


def settle(page):
    """Wait until Streamlit has finished the current script run and the page has drawn it."""
    page.wait_for_function(
        "() => document.querySelector('[data-test-script-state]')?.getAttribute('data-test-script-state') === 'notRunning'"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')",
        timeout=WAIT_MS,
    )


def metric_value(page, label: str):
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")


def annotate_by_keyboard(page, n_items: int, done_before: int, strength_key: str | None,
                         check_xss: bool = False, screenshot: str | None = None) -> int:
    """Annotate items pressing only keys: 1 or 2 (whichever side holds the GOOD response), optionally a
    strength key (Q/W/E), then Enter. Returns how many of the items shown carried the HTML payloads."""
    from playwright.sync_api import expect

    payload_items = 0
    for n in range(done_before, done_before + n_items):
        left, right = page.locator(".st-key-ann_left"), page.locator(".st-key-ann_right")
        expect(left).to_be_visible()
        settle(page)
        left_text, right_text = left.inner_text(), right.inner_text()
        if SCRIPT_PAYLOAD in left_text + right_text:
            payload_items += 1
            if check_xss:
                assert_payloads_inert(page)
                if screenshot:
                    page.screenshot(path=str(ARTIFACTS / screenshot))
        key = "1" if "GOOD" in left_text else "2"
        assert ("GOOD" in right_text) == (key == "2"), "exactly one side holds the better response"
        page.keyboard.press(key)
        expect(page.get_by_text(f"Your choice: Response {key} better")).to_be_visible()
        if strength_key:
            page.keyboard.press(strength_key)
            expect(page.get_by_text(f"Your choice: Response {key} better, {STRENGTH_NAMES[strength_key]}")).to_be_visible()
        page.keyboard.press("Enter")
        confirm_if_asked(page, n + 1)
        expect(page.get_by_text("Your choice:")).to_have_count(0)
    return payload_items


def confirm_if_asked(page, total: int, strength_key: str | None = None) -> None:
    """Wait for the submission to count; if the page refused an Enter that came right after the
    choice with no strength (a strength key may have been lost on the way), answer it: the strength
    key and Enter, or Enter again to save without one."""
    from playwright.sync_api import expect

    saved, asked = metric_value(page, "My annotations in total"), page.get_by_text("Not saved yet")
    expect(saved.filter(has_text=str(total)).or_(asked).first).to_be_visible()
    if asked.count():
        settle(page)  # a person reads the message first
        if strength_key:  # pressed like a person who read the message: the key, then Enter once it shows
            page.keyboard.press(strength_key)
            expect(page.get_by_text(re.compile(rf"Your choice: .*, {STRENGTH_NAMES[strength_key]}"))).to_be_visible()
        page.keyboard.press("Enter")
    expect(saved).to_have_text(str(total))


def assert_payloads_inert(page):
    from playwright.sync_api import expect

    assert page.evaluate("() => typeof window.__xss") == "undefined", "a payload in item text ran as script"
    assert page.locator('img[src="x"]').count() == 0, "an <img> from item text reached the DOM"
    expect(page.get_by_text(SCRIPT_PAYLOAD).first).to_be_visible()
    expect(page.get_by_text(IMG_PAYLOAD).first).to_be_visible()
    # Markdown in item text is shown as written: no image element, no javascript: link, no rewriting.
    expect(page.get_by_text(MD_PAYLOAD).first).to_be_visible()
    assert page.locator('img[src*="127.0.0.9"]').count() == 0, "a remote markdown image from item text was rendered"
    assert page.locator('a[href^="javascript:"]').count() == 0, "a javascript: link from item text was rendered"


def answer_fast(page, done_before: int, strength_key: str) -> None:
    """Side, strength and Enter typed 40 ms apart, faster than a rerun lands: the strength must not be
    lost silently (it is kept, or the submit is refused with a message)."""
    from playwright.sync_api import expect

    left, right = page.locator(".st-key-ann_left"), page.locator(".st-key-ann_right")
    expect(left).to_be_visible()
    settle(page)
    key = "1" if "GOOD" in left.inner_text() else "2"
    for k in (key, strength_key, "Enter"):
        page.keyboard.press(k)
        page.wait_for_timeout(40)
    # Saved with the strength, or refused with a message (the strength not applied yet, or the choice
    # key itself dropped by a busy browser); never saved without the strength.
    no_choice = page.get_by_text("Pick a choice first")
    expect(metric_value(page, "My annotations in total").filter(has_text=str(done_before + 1))
           .or_(page.get_by_text("Not saved yet")).or_(no_choice).first).to_be_visible()
    if no_choice.count():  # typed again at a person's pace
        settle(page)
        page.keyboard.press(key)
        expect(page.get_by_text(f"Your choice: Response {key}")).to_be_visible()
        page.keyboard.press(strength_key)
        expect(page.get_by_text(re.compile(rf"Your choice: .*, {STRENGTH_NAMES[strength_key]}"))).to_be_visible()
        page.keyboard.press("Enter")
    confirm_if_asked(page, done_before + 1, strength_key)


def test_two_annotators_by_keyboard_then_researcher_exports(app_url, app_db, browser, tmp_path):
    with screenshots_on_failure():
        _scenario(app_url, app_db, browser, tmp_path)


def _scenario(app_url, app_db, browser, tmp_path):
    from playwright.sync_api import expect

    # --- annotators: log in, then keys only
    payload_items = 0
    for i, username in enumerate(["ann1", "ann2"]):
        page = new_page(browser, origin=app_url)
        log_in(page, app_url, username, screenshot="01_login.png" if i == 0 else None)
        if i == 0:
            page.screenshot(path=str(ARTIFACTS / "02_home_annotator.png"))
        go_to(page, "Annotate")
        if i == 0:
            settle(page)
            page.screenshot(path=str(ARTIFACTS / "03_annotate.png"))
        done = 0
        if username == "ann1":
            # The first item typed fast: side, strength and Enter 40 ms apart, before any rerun lands.
            left_text = page.locator(".st-key-ann_left").inner_text()
            payload_items += SCRIPT_PAYLOAD in left_text + page.locator(".st-key-ann_right").inner_text()
            answer_fast(page, 0, "W")
            done = 1
        payload_items += annotate_by_keyboard(page, 3 - done, done, "W" if username == "ann1" else None, check_xss=True,
                                              screenshot="04_annotate_payload_item.png" if i == 0 else None)
        expect(page.get_by_text("No items left for you in this project")).to_be_visible()
        if username == "ann2":
            # Undo by key: the last item comes back and is answered again, still without the mouse.
            page.keyboard.press("Z")
            expect(page.get_by_text("Your last annotation was undone")).to_be_visible()
            expect(metric_value(page, "My annotations in total")).to_have_text("2")
            annotate_by_keyboard(page, 1, 2, "E")
            expect(page.get_by_text("No items left for you in this project")).to_be_visible()
        assert page.evaluate("() => typeof window.__xss") == "undefined"
        # An annotator's menu offers no researcher page.
        assert page.get_by_test_id("stSidebarNav").get_by_role("link", name="Data").count() == 0
        page.context.close()
    assert payload_items == 2, "each annotator met the item with the payloads"
    assert FOREIGN_REQUESTS == [], f"requests left the app's origin: {FOREIGN_REQUESTS}"
    engine = make_engine(app_db)
    with session_factory(engine)() as session:
        rows = session.execute(select(User.username, Annotation).join(Annotation, Annotation.annotator_id == User.id)
                               .order_by(Annotation.id)).all()
    engine.dispose()
    assert len(rows) == 6
    assert [a.strength for name, a in rows if name == "ann1"] == [2, 2, 2]
    assert [a.strength for name, a in rows if name == "ann2"] == [None, None, 3]  # the redone item last
    assert all(a.duration_ms > 0 for _, a in rows)

    # --- researcher: six annotations, an export downloaded and read back
    page = new_page(browser)
    log_in(page, app_url, "res")
    go_to(page, "Projects")
    settle(page)
    page.screenshot(path=str(ARTIFACTS / "05_projects.png"))
    go_to(page, "Data")
    page.get_by_role("tab", name="Annotations").click()
    expect(page.get_by_text("6 annotations match")).to_be_visible()
    expect(metric_value(page, "Annotations")).to_have_text("6")
    settle(page)
    page.screenshot(path=str(ARTIFACTS / "06_data_annotations.png"))
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Prepare export").click()
    download_button = page.get_by_role("button", name=f"Download {PROJECT}-trl.jsonl")
    expect(download_button).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "07_data_export.png"))
    with page.expect_download() as download_info:
        download_button.click()
    download = download_info.value
    assert download.suggested_filename == f"{PROJECT}-trl.jsonl"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    rows = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3, rows
    assert all(set(row) >= {"prompt", "chosen", "rejected"} for row in rows)
    # Both annotators picked the GOOD response of every item, so every pair's chosen side is it.
    assert all(re.match(r"\s*GOOD", row["chosen"]) and "GOOD" not in row["rejected"] for row in rows), rows
    assert any(SCRIPT_PAYLOAD in row["chosen"] for row in rows)
    page.context.close()

    # --- admin: the Users page
    page = new_page(browser)
    log_in(page, app_url, "admin")
    go_to(page, "Users")
    expect(page.get_by_test_id("stDataFrame")).to_be_visible()
    settle(page)
    page.screenshot(path=str(ARTIFACTS / "08_users.png"))
    # No Deploy button or developer menu for anyone (client.toolbarMode minimal).
    assert page.get_by_role("button", name="Deploy").count() == 0
    # After an action the page stays on the tab it was done in (it used to jump back to "Create user").
    page.get_by_role("tab", name="Manage a user").click()
    settle(page)
    page.get_by_role("combobox", name="User").click()
    page.get_by_role("option", name="res").click()
    settle(page)
    for action, done in (("Deactivate", "'res' deactivated."), ("Reactivate", "'res' reactivated.")):
        page.get_by_role("button", name=action).click()
        expect(page.get_by_text(done)).to_be_visible()
        settle(page)
        expect(page.get_by_role("tab", name="Manage a user")).to_have_attribute("aria-selected", "true")
    page.context.close()


def test_login_survives_a_reload_and_a_bookmark_and_logout_ends_it(app_url, browser):
    """The session cookie: a reload and a deep link keep the login and land on the page asked for; an
    annotator opening a researcher page by URL is refused by that page; logging out ends it."""
    with screenshots_on_failure():
        from playwright.sync_api import expect

        page = new_page(browser, origin=app_url)
        log_in(page, app_url, "ann1")
        # The cookie is written by a script the page runs just after the welcome shows (Streamlit
        # cannot set cookies itself): a reload before it has run would find no session to resume.
        from app.ui import SESSION_COOKIE

        page.wait_for_function(f"document.cookie.split('; ').some(c => c.startsWith('{SESSION_COOKIE}=') "
                               f"&& c.length > {len(SESSION_COOKIE) + 1})")
        page.reload()
        expect(page.get_by_text("Welcome, ann1")).to_be_visible()
        page.goto(f"{app_url}/Annotate")  # a bookmark, in a fresh Streamlit session
        expect(page.get_by_role("heading", name="Annotate", exact=True)).to_be_visible()
        expect(page.get_by_test_id("stMainBlockContainer").get_by_text("Logged in as ann1 (annotator)")).to_be_visible()
        for researcher_page in ("Projects", "Data", "Quality", "Reward_Models", "PPO", "Users"):
            page.goto(f"{app_url}/{researcher_page}")
            expect(page.get_by_text("This page is for")).to_be_visible()
            assert page.get_by_test_id("stDataFrame").count() == 0
        page.goto(app_url)
        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_role("textbox", name="Username")).to_be_visible()
        page.reload()
        expect(page.get_by_role("textbox", name="Username")).to_be_visible()
        page.goto(f"{app_url}/Annotate")
        expect(page.get_by_text("Please log in on the Home page first")).to_be_visible()
        page.context.close()
    assert FOREIGN_REQUESTS == []


@pytest.fixture
def two_apps_on_one_database(db_url, tmp_path):
    """Two app processes serving one database, as behind a load balancer."""
    if db_url.startswith("sqlite"):
        pytest.skip("the two-process deployment is shown on PostgreSQL, the database it is documented for")
    prepare_store(tmp_path / "data", db_url).dispose()
    env = {"RLHF_DATA_DIR": str(tmp_path / "data"), "RLHF_DB_URL": db_url, "HF_HUB_OFFLINE": "1"}
    procs, urls = [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            procs.append(start_app(REPO, env, port, tmp_path / f"streamlit-{name}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls, db_url
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()


def test_two_app_processes_on_one_postgresql_keep_every_guarantee(two_apps_on_one_database, browser):
    """A login made on one process is valid on the other (the session lives in the database); an
    annotator moving between processes mid-work and another on the second process give every item
    exactly its k=2 annotations, nobody twice, nothing lost; a third finds nothing left."""
    from playwright.sync_api import expect

    (url_a, url_b), db_url = two_apps_on_one_database
    with screenshots_on_failure():
        ann1 = new_page(browser)
        log_in(ann1, url_a, "ann1")
        ann1.goto(f"{url_b}/Annotate")  # the other process: same cookie, no second login
        expect(ann1.get_by_test_id("stMainBlockContainer").get_by_text("Logged in as ann1 (annotator)")).to_be_visible()
        annotate_by_keyboard(ann1, 1, 0, "Q")
        ann1.goto(f"{url_a}/Annotate")
        annotate_by_keyboard(ann1, 2, 1, "Q")
        expect(ann1.get_by_text("No items left for you in this project")).to_be_visible()
        ann2 = new_page(browser)
        log_in(ann2, url_b, "ann2")
        go_to(ann2, "Annotate")
        annotate_by_keyboard(ann2, 3, 0, None)
        res = new_page(browser)
        log_in(res, url_a, "res")
        go_to(res, "Annotate")
        expect(res.get_by_text("No items left for you in this project")).to_be_visible()
        for page in (ann1, ann2, res):
            page.context.close()
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        rows = session.execute(select(User.username, Annotation.item_id)
                               .join(Annotation, Annotation.annotator_id == User.id)).all()
    engine.dispose()
    per_item: dict[int, list[str]] = {}
    for name, item_id in rows:
        per_item.setdefault(item_id, []).append(name)
    assert len(rows) == 6 and len(per_item) == 3
    assert all(sorted(names) == ["ann1", "ann2"] for names in per_item.values()), per_item

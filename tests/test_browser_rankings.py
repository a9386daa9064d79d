"""Ranking in a real browser: an annotator ranks 4-response items with the keyboard alone (numbers
from best to worst, T for a tie, Backspace to take a key back, Enter), and the saved rankings are
read back from the database. Reuses tests/test_browser.py's browser, pages and helpers.

    .venv/bin/pytest tests/test_browser_rankings.py -m browser

Skipped, with the reason, where /usr/bin/chromium is absent (`make test` installs it).
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from annotation.assign import shown_order_for
from annotation.store import Annotation, Item, User, make_engine, session_factory
from browser_helpers import (
    RANK_WORDS,
    RANKING_ITEMS,
    RANKING_PROJECT,
    SCRIPT_PAYLOAD,
    add_ranking_project,
    free_port,
    prepare_store,
    ranking_order,
    start_app,
)
from test_browser import (  # noqa: F401  (browser: a fixture)
    ARTIFACTS,
    CHROMIUM,
    REPO,
    browser,
    go_to,
    log_in,
    metric_value,
    new_page,
    screenshots_on_failure,
    settle,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; make test does it)"),
]


@pytest.fixture(scope="module")
def ranking_app(tmp_path_factory):
    where = tmp_path_factory.mktemp("browser_rankings")
    db_url = f"sqlite:///{where / 'rlhf.db'}"
    engine = prepare_store(where / "data", db_url)
    add_ranking_project(engine, where / "data")
    engine.dispose()
    port = free_port()
    proc = start_app(REPO, {"RLHF_DATA_DIR": str(where / "data"), "RLHF_DB_URL": db_url, "HF_HUB_OFFLINE": "1"}, port,
                     where / "streamlit.log")
    try:
        yield f"http://127.0.0.1:{port}", db_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()


def shown_texts(page, n: int) -> list[str]:
    texts = []
    for position in range(1, n + 1):
        box = page.locator(f".st-key-ann_resp_{position}")
        text = box.inner_text()
        texts.append(next(line for line in text.splitlines() if line.startswith(RANK_WORDS)))
    return texts


def ranking_text(keys: list[str]) -> str:
    """What the page shows as "Your ranking: ..." after these keys (numbers, T before a tied one)."""
    groups, tie_next = [], False
    for key in keys:
        if key == "T":
            tie_next = True
        elif tie_next:
            groups[-1].append(key)
            tie_next = False
        else:
            groups.append([key])
    return " > ".join(" = ".join(g) for g in groups) + (" = …" if tie_next else "")


def press_and_see(page, keys_so_far: list[str], key: str, n: int) -> None:
    """Press one key and wait until the page shows the ranking it makes: one key per rerun, since keys
    merged into one rerun are refused (their order is lost)."""
    from playwright.sync_api import expect

    page.keyboard.press(key)
    if key == "Backspace":
        keys_so_far.pop()
    else:
        keys_so_far.append(key)
    if not keys_so_far:
        expect(page.get_by_text("Your ranking:")).to_have_count(0)
        return
    placed = sum(k != "T" for k in keys_so_far)
    tail = "complete: Enter submits" if placed == n else "still to place:"
    expect(page.get_by_text(f"Your ranking: {ranking_text(keys_so_far)} · {tail}")).to_be_visible()


def rank_by_keyboard(page, done_before: int, *, with_mistake: bool) -> list[str]:
    """Rank the item shown by pressing its response numbers best first (T before a tied one), after
    an optional wrong key taken back with Backspace, then Enter; returns the keys that made the ranking."""
    from playwright.sync_api import expect

    expect(page.locator(".st-key-ann_resp_4")).to_be_visible()
    settle(page)
    texts = shown_texts(page, 4)
    if any(SCRIPT_PAYLOAD in t for t in texts):  # item text is shown as text, and runs nothing
        expect(page.get_by_text(SCRIPT_PAYLOAD).first).to_be_visible()
        assert page.evaluate("() => typeof window.__xss") == "undefined"
        assert page.locator("script", has_text="window.__xss").count() == 0
    groups = ranking_order(texts)
    keys = []
    for group in groups:
        keys += [str(group[0] + 1)] + [k for p in group[1:] for k in ("T", str(p + 1))]
    typed: list[str] = []
    if with_mistake:
        press_and_see(page, typed, next(str(p + 1) for p in range(4) if p != groups[0][0]), 4)
        press_and_see(page, typed, "Backspace", 4)
    for key in keys:
        press_and_see(page, typed, key, 4)
    page.keyboard.press("Enter")
    expect(metric_value(page, "My annotations in total")).to_have_text(str(done_before + 1))
    expect(page.get_by_text("Your ranking:")).to_have_count(0)
    return keys


def test_an_annotator_ranks_four_response_items_by_keyboard(ranking_app, browser):  # noqa: F811
    from playwright.sync_api import expect

    url, db_url = ranking_app
    with screenshots_on_failure():
        page = new_page(browser, origin=url)
        log_in(page, url, "ann1")
        go_to(page, "Annotate")
        # The project is picked once (mouse); the ranking itself uses keys only.
        page.get_by_test_id("stSelectbox").click()
        page.get_by_role("option", name=RANKING_PROJECT).click()
        page.evaluate("() => document.activeElement && document.activeElement.blur()")  # keys go to the page, not the box
        expect(page.locator(".st-key-ann_resp_1")).to_be_visible()
        settle(page)
        page.screenshot(path=str(ARTIFACTS / "09_annotate_ranking.png"))
        keys = [rank_by_keyboard(page, 0, with_mistake=True)]
        keys.append(rank_by_keyboard(page, 1, with_mistake=False))
        expect(page.get_by_text("No items left for you in this project")).to_be_visible()
        assert page.evaluate("() => typeof window.__xss") == "undefined"
        page.context.close()
    assert any("T" in k for k in keys), "the item with a tie was ranked with the tie key"

    # Two keys typed at once: applied in the order typed, or (merged into one rerun) refused with a
    # warning; never applied in another order.
    with screenshots_on_failure():
        page = new_page(browser, origin=url)
        log_in(page, url, "ann2")
        go_to(page, "Annotate")
        page.get_by_test_id("stSelectbox").click()
        page.get_by_role("option", name=RANKING_PROJECT).click()
        page.evaluate("() => document.activeElement && document.activeElement.blur()")
        expect(page.locator(".st-key-ann_resp_4")).to_be_visible()
        settle(page)
        page.keyboard.press("4")
        page.keyboard.press("1")
        together = page.get_by_text("Keys arrived together")
        in_order = page.get_by_text("Your ranking: 4 > 1 · still to place:")
        expect(together.or_(in_order)).to_be_visible()
        settle(page)
        assert page.get_by_text("Your ranking: 1 > 4").count() == 0
        page.context.close()

    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        rows = session.execute(select(Annotation, Item).join(Item).join(User, User.id == Annotation.annotator_id)
                               .where(User.username == "ann1").order_by(Annotation.id)).all()
    engine.dispose()
    assert len(rows) == len(RANKING_ITEMS) == 2
    for annotation, item in rows:
        place = [RANK_WORDS.index(r["text"].split(":")[0]) for r in item.responses]
        assert annotation.ranking == [1 + sum(other < p for other in place) for p in place]
        assert annotation.choice is None
        assert annotation.shown_order == list(shown_order_for(annotation.annotator_id, item.id, 4))
        assert annotation.duration_ms > 0
    # THIRD, BEST, WORST, SECOND and SECOND, WORST, BEST, SECOND in stored order
    assert sorted(a.ranking for a, _ in rows) == [[2, 4, 1, 2], [3, 1, 4, 2]]

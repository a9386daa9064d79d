"""Streamlit AppTest tests of every page of the app, for every role, including the refusals.

The pages run in-process against a SQLite store prepared per test (tests/browser_helpers.py).
The browse queries behind the Data page also run on PostgreSQL (the `engine` fixture).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from annotation.store import Annotation, Item, ItemFlag, Project, User, session_factory, utcnow
from browser_helpers import GUIDELINES, IMG_PAYLOAD, ITEMS, MD_PAYLOAD, PASSWORD, PROJECT, SCRIPT_PAYLOAD, prepare_store, set_login

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app"
PAGES = {
    "annotate": APP / "pages" / "1_Annotate.py",
    "projects": APP / "pages" / "2_Projects.py",
    "data": APP / "pages" / "3_Data.py",
    "users": APP / "pages" / "7_Users.py",
}
TIMEOUT = 60  # seconds per script run; generous because the machine is shared


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """The prepared store, built once (migrations and password hashing are the slow part) and copied per test."""
    where = tmp_path_factory.mktemp("app_template")
    engine = prepare_store(where / "data", f"sqlite:///{where / 'rlhf.db'}", criteria=["helpfulness"])
    engine.dispose()  # the last connection closing folds the WAL into the file, so a copy is complete
    return where / "rlhf.db"


@pytest.fixture
def store(tmp_path, monkeypatch, template_db):
    """A fresh copy of the prepared SQLite store that the app's settings point at; yields its engine."""
    from annotation.store import make_engine
    from app import settings as settings_mod

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(template_db, tmp_path / "rlhf.db")
    db_url = f"sqlite:///{tmp_path / 'rlhf.db'}"
    monkeypatch.setenv("RLHF_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RLHF_DB_URL", db_url)
    monkeypatch.delenv("RLHF_CONFIG", raising=False)
    settings_mod.get_settings.cache_clear()
    engine = make_engine(db_url)
    yield engine
    settings_mod.get_settings.cache_clear()
    engine.dispose()


def user_id(engine, name: str) -> int:
    with session_factory(engine)() as session:
        return session.scalar(select(User.id).where(User.username == name))


def open_page(page: str | Path, engine=None, username: str | None = None, *, expires_in_min: float = 60) -> AppTest:
    at = AppTest.from_file(str(PAGES.get(page, page)), default_timeout=TIMEOUT)
    if username is not None:
        set_login(at, engine, user_id(engine, username), minutes=expires_in_min)
    return at.run()


def all_text(at: AppTest) -> str:
    """Every piece of text the page rendered (markdown, captions, alerts, metrics, labels, tables)."""
    parts = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success", "text", "code"):
        parts += [str(el.value) for el in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [b.label for b in at.button]
    for frame in at.dataframe:
        parts.append(frame.value.to_csv())
    return "\n".join(parts)


def refused(at: AppTest) -> bool:
    """The page showed one refusal and nothing else: no title, table, button or input."""
    return (
        len(at.error) == 1
        and not at.exception
        and not at.title and not at.dataframe and not at.button and not at.text_input and not at.selectbox
    )


# ----------------------------------------------------------------------------- refusals

REFUSALS = [
    ("annotate", None),
    ("projects", None), ("projects", "ann1"),
    ("data", None), ("data", "ann1"),
    ("users", None), ("users", "ann1"), ("users", "res"),
]


@pytest.mark.parametrize("page,username", REFUSALS)
def test_page_refuses_wrong_role_or_no_login(store, page, username):
    at = open_page(page, store, username)
    assert refused(at), all_text(at)
    expected = "Please log in" if username is None else "This page is for"
    assert expected in at.error[0].value


ALL_PAGES = sorted((APP / "pages").glob("[0-9]*_*.py"))


@pytest.mark.parametrize("path", ALL_PAGES, ids=[p.stem for p in ALL_PAGES])
def test_every_page_refuses_by_the_menu_roles(store, path):
    """Every page file, whoever wrote it, refuses a visitor who is not logged in and each role that the
    menu (app.ui.PAGE_ROLES) does not offer it to: an opened URL shows nothing but the refusal."""
    from app.ui import allowed_pages

    assert refused(open_page(path))
    for username, role in (("ann1", "annotator"), ("res", "researcher")):
        if path not in allowed_pages(role):
            assert refused(open_page(path, store, username)), f"{path.name} did not refuse a {role}"


@pytest.mark.parametrize("page,username", [("annotate", "ann1"), ("annotate", "res"), ("projects", "res"), ("data", "res"),
                                           ("users", "admin"), ("projects", "admin"), ("data", "admin")])
def test_page_opens_for_allowed_role(store, page, username):
    at = open_page(page, store, username)
    assert not at.exception and not at.error, all_text(at)
    assert at.title[0].value.lower().startswith(page[:4])


def test_expired_session_is_refused(store):
    at = open_page("data", store, "res", expires_in_min=-1)
    assert refused(at)
    assert "user_id" not in at.session_state


def test_deactivated_user_is_refused_at_once(store):
    at = AppTest.from_file(str(PAGES["annotate"]), default_timeout=TIMEOUT)
    set_login(at, store, user_id(store, "ann1"))
    at.run()
    assert not at.error
    from annotation.store import transaction

    with transaction(store) as session:
        session.scalar(select(User).where(User.username == "ann1")).active = False
    at.run()
    assert refused(at)


def _set_user(store, username: str, **values) -> None:
    from annotation.store import transaction

    with transaction(store) as session:
        user = session.scalar(select(User).where(User.username == username))
        for key, value in values.items():
            setattr(user, key, value)


def test_callbacks_check_the_user_inside_the_action(store):
    """Button callbacks run before the page's own check: a tab left open by a user who has since been
    deactivated must neither save (Enter) nor undo (Z)."""
    def annotations():
        with session_factory(store)() as session:
            return len(session.scalars(select(Annotation)).all())

    at = open_page("annotate", store, "ann1")
    at.button(key="ann_choice_left").click().run()
    at.button(key="ann_strength_2").click().run()
    at.button(key="ann_submit").click().run()
    assert annotations() == 1
    _set_user(store, "ann1", active=False)
    at.button(key="ann_undo").click().run()
    assert annotations() == 1 and refused(at)

    at = open_page("annotate", store, "ann2")
    at.button(key="ann_choice_left").click().run()
    _set_user(store, "ann2", active=False)
    at.button(key="ann_submit").click().run()
    assert annotations() == 1 and refused(at)


def test_a_page_rerun_takes_no_write_lock(store):
    """The login check on every rerun reads; while another writer holds SQLite's write lock (an import,
    say), a researcher's read-only page still draws at once instead of waiting for it."""
    import sqlite3

    at = AppTest.from_file(str(PAGES["projects"]), default_timeout=TIMEOUT)
    set_login(at, store, user_id(store, "res"))
    writer = sqlite3.connect(str(store.url.database), isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        at.run()
        assert not at.exception and not at.error, all_text(at)
        assert time.monotonic() - started < 4  # SQLite's busy wait would be the store's timeout, not this
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize("change", [{"role": "researcher"}, {"password_hash": "reset-elsewhere"}])
def test_password_reset_and_role_change_end_open_sessions(store, change):
    at = open_page("annotate", store, "ann1")
    assert not at.error
    _set_user(store, "ann1", **change)
    at.run()
    assert refused(at) and "user_id" not in at.session_state


def test_undo_restores_the_earlier_choice(store):
    at = open_page("annotate", store, "ann1")
    first = current_task(at).item_id
    at.button(key="ann_choice_right").click().run()
    at.button(key="ann_strength_3").click().run()
    at.button(key="ann_submit").click().run()
    at.button(key="ann_undo").click().run()
    assert current_task(at).item_id == first
    assert at.session_state["ann_answer"].choice == "right" and at.session_state["ann_answer"].strength == 3


def test_strength_pressed_before_the_choice_rerun_is_kept(store):
    """1, E, Enter typed 40 ms apart: E reaches the server before the rerun that enabled the strength
    buttons. The strength buttons are never disabled, so the key is not lost."""
    at = open_page("annotate", store, "ann1")
    assert not any(b.disabled for b in at.button if b.key.startswith("ann_strength_"))
    at.button(key="ann_strength_3").click()
    at.button(key="ann_choice_left").click().run()
    at.button(key="ann_submit").click().run()
    with session_factory(store)() as session:
        saved = session.scalars(select(Annotation)).one()
    assert saved.strength == 3


# ----------------------------------------------------------------------------- home, login, logout


def login_form(at: AppTest, username: str, password: str) -> AppTest:
    at.text_input(key="login_username").input(username)
    at.text_input(key="login_password").input(password)
    return at.button[0].click().run()


def test_home_login_shows_pages_for_role_and_status(store):
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT).run()
    assert at.text_input(key="login_username") is not None and "user_id" not in at.session_state
    at = login_form(at, "res", PASSWORD)
    assert not at.exception
    assert at.session_state["user_id"] == user_id(store, "res")
    text = all_text(at)
    assert "Welcome, **res**" in text and "Database ready" in text
    assert "Models missing" in text and "SmolLM2-135M-Instruct" in text
    links = [link.label for link in at.get("page_link")]
    assert {"Annotate", "Projects", "Data"} <= set(links) and "Users" not in links
    expires = at.session_state["login_expires"] - utcnow()
    assert dt.timedelta(minutes=479) < expires <= dt.timedelta(minutes=480)  # settings.session_minutes


def test_home_page_links_by_role(store):
    from app.ui import allowed_pages

    assert [p.name for p in allowed_pages("annotator")] == ["1_Annotate.py"]
    assert "7_Users.py" not in [p.name for p in allowed_pages("researcher")]
    assert "7_Users.py" in [p.name for p in allowed_pages("admin")]
    assert allowed_pages(None) == []


def test_home_says_models_ready_when_present(store):
    from app.settings import get_settings

    for name in ("SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"):
        (get_settings().model_dir / name).mkdir(parents=True)
    at = open_page(APP / "Home.py", store, "res")
    text = all_text(at)
    assert "Models ready" in text and "Models missing" not in text
    # Annotators are not shown the database URL or the server's paths.
    text = all_text(open_page(APP / "Home.py", store, "ann1"))
    assert "Welcome, **ann1**" in text and "Database" not in text and "Models" not in text


@pytest.mark.parametrize("username,password", [("ann1", "wrong-password"), ("nobody", PASSWORD)])
def test_wrong_login_is_plain_and_slow(store, username, password):
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT).run()
    start = time.monotonic()
    at = login_form(at, username, password)
    assert time.monotonic() - start >= 1.0
    assert [e.value for e in at.error] == ["Wrong username or password."]
    assert "user_id" not in at.session_state


def test_logout_clears_session(store):
    at = open_page(APP / "Home.py", store, "ann1")
    at.sidebar.button(key="logout").click().run()
    assert "user_id" not in at.session_state
    assert at.text_input(key="login_username") is not None


def test_login_opens_a_server_session_that_logout_revokes(store):
    from annotation.sessions import session_user

    at = login_form(AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT).run(), "ann1", PASSWORD)
    token = at.session_state["session_token"]
    assert session_user(store, token)[0].username == "ann1"
    at.sidebar.button(key="logout").click().run()
    assert session_user(store, token) is None and "session_token" not in at.session_state


def test_guessing_is_throttled_per_username_without_checking_the_password(store, monkeypatch):
    import app.ui as ui
    from annotation.sessions import FAILURES_PER_USERNAME

    monkeypatch.setattr(ui, "FAILED_LOGIN_DELAY_S", 0.0)
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT).run()
    for _ in range(FAILURES_PER_USERNAME):
        at = login_form(at, "ann1", "wrong-password")
        assert [e.value for e in at.error] == [ui.WRONG_LOGIN_MESSAGE]
    checked = []
    monkeypatch.setattr(ui, "authenticate", lambda *a: checked.append(a))
    at = login_form(at, "ann1", PASSWORD)  # the right password, too late
    assert [e.value for e in at.error] == [ui.TOO_MANY_LOGINS_MESSAGE] and "user_id" not in at.session_state
    assert checked == []  # refused before any argon2 work
    monkeypatch.undo()
    at = login_form(AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT).run(), "res", PASSWORD)
    assert at.session_state["user_id"] == user_id(store, "res")  # other accounts are not locked out


# ----------------------------------------------------------------------------- annotate

def item_by_marker(engine):
    with session_factory(engine)() as session:
        return {i.external_id: i for i in session.scalars(select(Item))}


def current_task(at: AppTest):
    return at.session_state["ann_task"]


def good_side(task) -> str:
    return "left" if "GOOD" in task.left_text else "right"


def test_annotate_three_items_stores_choices_in_ab_terms(store):
    at = open_page("annotate", store, "ann1")
    seen_sides = set()
    for n in range(3):
        task = current_task(at)
        text = all_text(at)
        assert "Response 1" in text and "Response 2" in text
        assert "model-alpha" not in text and "model-beta" not in text, "model names must never be shown"
        side = good_side(task)
        seen_sides.add(task.shown_swapped)
        at.button(key=f"ann_choice_{side}").click().run()
        at.button(key="ann_strength_3").click().run()
        at.button(key="ann_submit").click().run()
        assert not at.exception
        assert at.metric[1].value == str(n + 1)  # my annotations in total
    assert "No items left for you" in all_text(at)
    with session_factory(store)() as session:
        rows = session.execute(select(Annotation, Item).join(Item)).all()
    assert len(rows) == 3
    for annotation, item in rows:
        good = "a" if "GOOD" in item.response_a else "b"
        assert annotation.choice == good  # left/right mapped back to A/B whatever the order shown
        assert annotation.strength == 3
        assert annotation.duration_ms is not None and annotation.duration_ms >= 0
    # The order shown is recorded with each annotation, as the lease gave it.
    from annotation.assign import shown_swapped_for

    assert all(a.shown_swapped == shown_swapped_for(a.annotator_id, a.item_id) for a, _ in rows)


def test_annotate_renders_chat_turns_and_html_as_text(store):
    at = open_page("annotate", store, "ann1")
    # Move to the item with the payloads (skip others), then check it is rendered as markdown text.
    for _ in range(3):
        if SCRIPT_PAYLOAD in current_task(at).left_text + current_task(at).right_text:
            break
        at.button(key="ann_skip").click().run()
    assert [m.name for m in at.chat_message] == ["user"]
    # Item text reaches the annotator as written: plain text elements, never Markdown (which would
    # fetch the remote image, colour :red[...], typeset $...$ and turn -> into an arrow) or HTML.
    shown = [t.value for t in at.text]
    task = current_task(at)
    assert f"Say hi {SCRIPT_PAYLOAD}" in shown and task.left_text in shown and task.right_text in shown
    assert any(MD_PAYLOAD in value for value in shown)
    assert not any(SCRIPT_PAYLOAD in m.value or MD_PAYLOAD in m.value or IMG_PAYLOAD in m.value for m in at.markdown)
    assert not at.get("html")


def test_submit_without_choice_warns_and_saves_nothing(store):
    at = open_page("annotate", store, "ann1")
    first = current_task(at).item_id
    at.button(key="ann_submit").click().run()
    assert any("Pick a choice first" in w.value for w in at.warning)
    assert current_task(at).item_id == first
    with session_factory(store)() as session:
        assert session.scalars(select(Annotation)).all() == []


def test_criteria_and_rationale_are_saved_in_ab_terms(store):
    at = open_page("annotate", store, "ann1")
    task = current_task(at)
    at.button(key="ann_choice_tie").click().run()
    at.radio(key=f"ann_crit_{task.item_id}_helpfulness").set_value("Response 1").run()
    at.text_area(key=f"ann_rationale_{task.item_id}").input("both fine, left more useful").run()
    at.button(key="ann_submit").click().run()
    with session_factory(store)() as session:
        annotation = session.scalars(select(Annotation)).one()
    assert annotation.choice == "tie" and annotation.strength is None
    assert annotation.criteria == {"helpfulness": "b" if task.shown_swapped else "a"}
    assert annotation.rationale == "both fine, left more useful"


def test_skip_flag_and_undo(store):
    at = open_page("annotate", store, "ann1")
    skipped = current_task(at).item_id
    at.button(key="ann_skip").click().run()
    flagged = current_task(at).item_id
    assert flagged != skipped
    at.text_area(key=f"ann_rationale_{flagged}").input("response cut off").run()
    at.button(key="ann_flag_broken").click().run()
    last = current_task(at)
    assert last.item_id not in (skipped, flagged)
    at.button(key=f"ann_choice_{good_side(last)}").click().run()
    at.button(key="ann_strength_1").click().run()
    at.button(key="ann_submit").click().run()
    assert "No items left for you" in all_text(at)
    at.button(key="ann_undo").click().run()
    assert current_task(at).item_id == last.item_id  # the undone item comes back
    with session_factory(store)() as session:
        assert session.scalars(select(Annotation)).all() == []
        flags = {(f.item_id, f.kind, f.note) for f in session.scalars(select(ItemFlag))}
    assert flags == {(skipped, "skip", None), (flagged, "broken", "response cut off")}
    at.button(key="ann_undo").click().run()
    assert any("Nothing to undo" in w.value for w in at.warning)


def test_guidelines_one_key_away(store):
    at = open_page("annotate", store, "ann1")
    assert GUIDELINES not in [m.value for m in at.markdown]
    at.button(key="ann_guidelines").click().run()
    # The guidelines' Markdown is kept, but its image becomes a link: nothing is fetched on render.
    shown = [m.value for m in at.markdown]
    assert GUIDELINES.replace("![logo]", "\\![logo]") in shown and GUIDELINES not in shown


def test_every_action_has_a_keyboard_shortcut_shown(store):
    at = open_page("annotate", store, "ann1")
    shortcuts = {b.key: b.proto.shortcut for b in at.button}
    assert {shortcuts[f"ann_choice_{c}"] for c in ("left", "right", "tie", "both_bad")} == {"1", "2", "3", "4"}
    assert shortcuts["ann_submit"] == "enter" and shortcuts["ann_skip"] == "s"
    assert all(shortcuts[k] for k in ("ann_flag_broken", "ann_flag_unsafe", "ann_undo", "ann_guidelines",
                                      "ann_strength_1", "ann_strength_2", "ann_strength_3"))
    legend = " ".join(c.value for c in at.caption)
    assert "**Enter** submit" in legend and "**S** skip" in legend and "**1**" in legend


def test_annotators_never_see_other_annotators_labels(store):
    first = open_page("annotate", store, "ann1")
    task = current_task(first)
    first.text_area(key=f"ann_rationale_{task.item_id}").input("SECRET-RATIONALE-ann1").run()
    first.button(key=f"ann_choice_{good_side(task)}").click().run()
    first.button(key="ann_strength_2").click().run()
    first.button(key="ann_submit").click().run()
    second = open_page("annotate", store, "ann2")
    assert current_task(second).item_id == task.item_id  # items closest to completion go first
    text = all_text(second)
    assert "SECRET-RATIONALE-ann1" not in text and "ann1" not in text
    assert second.metric[1].value == "0"
    # ...while a researcher does see it on the Data page.
    data = open_page("data", store, "res")
    assert "SECRET-RATIONALE-ann1" in all_text(data)


def test_tie_and_both_bad_hidden_when_project_disallows(store):
    from annotation.projects import get_project, update_project
    from annotation.store import transaction

    with transaction(store) as session:
        update_project(session, get_project(session, PROJECT), choices=["a", "b"])
    at = open_page("annotate", store, "ann1")
    keys = {b.key for b in at.button}
    assert "ann_choice_left" in keys and "ann_choice_tie" not in keys and "ann_choice_both_bad" not in keys
    assert at.radio[0].options == ["Response 1", "Response 2"]  # per-criterion choices follow the project too


# ----------------------------------------------------------------------------- projects

def test_create_project_and_duplicate_error(store):
    at = open_page("projects", store, "res")
    at.text_input(key="proj_new_name").input("second")
    at.number_input(key="proj_new_k").set_value(4)
    at.text_input(key="proj_new_criteria").input("helpfulness, honesty")
    at.text_area(key="proj_new_guidelines").input("Be *careful*.")
    at.button(key="FormSubmitter:proj_create-Create project").click().run()
    assert not at.exception and not at.error
    assert any("Project 'second' created" in s.value for s in at.success)
    from annotation.projects import get_project

    with session_factory(store)() as session:
        project = get_project(session, "second")
        assert (project.overlap, project.criteria, project.guidelines) == (4, ["helpfulness", "honesty"], "Be *careful*.")
    at.text_input(key="proj_new_name").input(PROJECT)
    at.button(key="FormSubmitter:proj_create-Create project").click().run()
    assert [e.value for e in at.error] == [f"project '{PROJECT}' already exists"]


def test_edit_project_settings(store):
    at = open_page("projects", store, "res")
    form_numbers = [n for n in at.number_input if n.label == "Overlap k"]
    form_numbers[0].set_value(3)
    [t for t in at.text_area if t.label == "Guidelines (markdown)" and t.key != "proj_new_guidelines"][0].input("New rules")
    [b for b in at.button if b.label == "Save settings"][0].click().run()
    assert any("Settings saved" in s.value for s in at.success), all_text(at)
    from annotation.projects import get_project

    with session_factory(store)() as session:
        project = get_project(session, PROJECT)
    assert project.overlap == 3 and project.guidelines == "New rules"
    # Invalid settings are refused with the validator's message and change nothing.
    [n for n in at.number_input if n.label == "Gold item rate" and n.key != "proj_new_gold"][0].set_value(0.5)
    [m for m in at.multiselect if m.label == "Choices"][0].set_value(["a", "tie"])
    [b for b in at.button if b.label == "Save settings"][0].click().run()
    assert any("choices must include a and b" in e.value for e in at.error)
    with session_factory(store)() as session:
        assert get_project(session, PROJECT).gold_rate == 0.0


def test_upload_imports_through_the_cli_code(store):
    at = open_page("projects", store, "res")
    lines = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    at.file_uploader(key="proj_upload").set_value(("new_pairs.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode(), "application/jsonl"))
    at.run()
    at.button(key="proj_import").click().run()
    assert not at.exception and not at.error, all_text(at)
    assert any("Imported new_pairs.jsonl: 4 items" in s.value and "4 annotations" in s.value for s in at.success)
    with session_factory(store)() as session:
        assert len(session.scalars(select(Item)).all()) == len(ITEMS) + 4


def test_bad_upload_names_file_and_line_and_adds_nothing(store):
    at = open_page("projects", store, "res")
    body = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "q2", "chosen": 5, "rejected": "b"}\n'
    at.file_uploader(key="proj_upload").set_value(("broken.jsonl", body.encode(), "application/jsonl"))
    at.run()
    at.button(key="proj_import").click().run()
    assert len(at.error) == 1
    message = at.error[0].value
    assert message.startswith("Import failed, nothing was added: broken.jsonl:2:") and "chosen" in message
    assert "rlhf-upload-" not in message  # the temp dir is not part of what the researcher sees
    with session_factory(store)() as session:
        assert len(session.scalars(select(Item)).all()) == len(ITEMS)


def test_projects_overview_shows_completion(store):
    at = open_page("projects", store, "res")
    table = at.dataframe[0].value
    row = table[table["name"] == PROJECT].iloc[0]
    assert (row["items"], row["annotations"], row["completion"]) == (3, 0, 0.0)


# ----------------------------------------------------------------------------- data

def annotate_all(engine, username: str) -> None:
    """Annotate every item the way the browser test's annotators do: the GOOD response wins."""
    from annotation import assign

    uid = user_id(engine, username)
    project_id = next(iter(item_by_marker(engine).values())).project_id
    while (task := assign.next_item(engine, project_id, uid)) is not None:
        left_good = "GOOD" in task.left_text
        choice = ("a" if left_good else "b") if not task.shown_swapped else ("b" if left_good else "a")
        assign.submit(engine, uid, task.item_id, choice, strength=2, duration_ms=1000)


def test_data_page_shows_annotations_and_filters(store):
    annotate_all(store, "ann1")
    annotate_all(store, "ann2")
    at = open_page("data", store, "res")
    assert not at.exception
    items = at.tabs[0].dataframe[0].value
    assert list(items["annotations"]) == [2, 2, 2]
    annotations = at.tabs[1].dataframe[0].value
    assert len(annotations) == 6 and set(annotations["annotator"]) == {"ann1", "ann2"}
    assert at.metric[0].value == "6"
    at.selectbox(key="data_annotator").set_value("ann2").run()
    assert set(at.tabs[1].dataframe[0].value["annotator"]) == {"ann2"}
    at.text_input(key="data_search").input("haiku").run()
    assert list(at.tabs[0].dataframe[0].value["external_id"]) == ["haiku"]
    # A researcher sees where each response came from.
    assert "model-alpha" in all_text(at)


def test_data_page_export_trl(store):
    annotate_all(store, "ann1")
    annotate_all(store, "ann2")
    at = open_page("data", store, "res")
    at.button(key="data_export_prepare").click().run()
    assert not at.exception and not at.error, all_text(at)
    prepared = at.session_state["data_export"]
    assert prepared["file_name"] == f"{PROJECT}-trl.jsonl"
    rows = [json.loads(line) for line in prepared["data"].decode().splitlines()]
    assert len(rows) == 3 and all(row["chosen"].lstrip().startswith("GOOD") for row in rows)
    assert at.download_button(key="data_export_download").label == f"Download {PROJECT}-trl.jsonl"


def test_data_page_export_annotations(store):
    annotate_all(store, "ann1")
    at = open_page("data", store, "res")
    at.selectbox(key="data_export_format").set_value("annotations").run()
    at.button(key="data_export_prepare").click().run()
    rows = [json.loads(line) for line in at.session_state["data_export"]["data"].decode().splitlines()]
    assert len(rows) == 3


def test_data_page_sets_gold(store):
    at = open_page("data", store, "res")
    item_id = at.selectbox(key="data_item_id").value
    at.selectbox(key=f"data_gold_{item_id}").set_value("a").run()
    at.button(key="data_gold_save").click().run()
    assert any("Gold answer saved" in s.value for s in at.success)
    with session_factory(store)() as session:
        assert session.get(Item, item_id).gold_choice == "a"


# ----------------------------------------------------------------------------- users

def role_box(at: AppTest):
    return next(box for box in at.selectbox if box.key.startswith("users_set_role_"))


def test_role_box_shows_the_selected_users_role_and_set_role_keeps_it(store):
    """The Role box had one fixed key, so it kept showing the first user's value ("admin") for everyone
    and "Set role" then promoted whoever was selected to admin."""
    at = open_page("users", store, "admin")
    for name, role in (("admin", "admin"), ("ann1", "annotator"), ("res", "researcher"), ("ann2", "annotator")):
        at.selectbox(key="users_target").set_value(name).run()
        assert role_box(at).value == role, name
    at.button(key="users_set_role_btn").click().run()
    with session_factory(store)() as session:
        assert {u.username: u.role for u in session.scalars(select(User))} == {
            "admin": "admin", "ann1": "annotator", "ann2": "annotator", "res": "researcher"}


def test_admin_creates_user_sets_role_deactivates_and_resets_password(store):
    from annotation.auth import authenticate

    at = open_page("users", store, "admin")
    at.text_input(key="users_new_name").input("carol")
    at.text_input(key="users_new_password").input("carols-password")
    at.selectbox(key="users_new_role").set_value("annotator")
    at.button(key="FormSubmitter:users_create-Create user").click().run()
    assert any("User 'carol' created" in s.value for s in at.success), all_text(at)

    at.selectbox(key="users_target").set_value("carol").run()
    role_box(at).set_value("researcher").run()
    at.button(key="users_set_role_btn").click().run()
    at.text_input(key="users_reset_password").input("a-new-password")
    at.button(key="FormSubmitter:users_reset-Reset password").click().run()
    with session_factory(store)() as session:
        assert session.scalar(select(User).where(User.username == "carol")).role == "researcher"
        assert authenticate(session, "carol", "a-new-password") is not None
        assert authenticate(session, "carol", "carols-password") is None
    at.button(key="users_deactivate").click().run()
    with session_factory(store)() as session:
        assert authenticate(session, "carol", "a-new-password") is None
    at.button(key="users_reactivate").click().run()
    with session_factory(store)() as session:
        assert authenticate(session, "carol", "a-new-password") is not None


def test_last_admin_cannot_be_demoted_or_deactivated(store):
    at = open_page("users", store, "admin")
    at.selectbox(key="users_target").set_value("admin").run()
    at.button(key="users_deactivate").click().run()
    assert any("last active admin" in e.value for e in at.error)
    role_box(at).set_value("annotator").run()
    at.button(key="users_set_role_btn").click().run()
    assert any("last active admin" in e.value for e in at.error)


def test_short_password_is_refused(store):
    at = open_page("users", store, "admin")
    at.text_input(key="users_new_name").input("dave")
    at.text_input(key="users_new_password").input("short")
    at.button(key="FormSubmitter:users_create-Create user").click().run()
    assert any("password too short" in e.value for e in at.error)


# ----------------------------------------------------------------------------- the functions behind the pages, both databases

def test_browse_filters_on_both_databases(db_url, tmp_path):
    from annotation import assign, browse

    engine = prepare_store(tmp_path / "data", db_url)
    try:
        annotate_all(engine, "ann1")
        project = browse.list_projects(engine)[0]
        ids = {row.external_id: row.id for row in item_by_marker(engine).values()}
        assign.next_item(engine, project.id, user_id(engine, "ann2"))
        assign.flag(engine, user_id(engine, "ann2"), ids["egg"], "unsafe", note="worrying")
        assign.set_gold(engine, ids["haiku"], "b")

        def external(**filters):
            frame, total = browse.items_frame(engine, project.id, **filters)
            assert total == len(frame)
            return sorted(frame["external_id"])

        assert external() == ["egg", "haiku", "xss"]
        assert external(search="BOIL") == ["egg"]          # text prompt, case-insensitive
        assert external(search="say hi") == ["xss"]        # chat-message prompt
        assert external(search="gutters") == ["haiku"]     # a response
        assert external(min_annotations=1) == ["egg", "haiku", "xss"]
        assert external(max_annotations=0) == []
        assert external(flagged=True) == ["egg"] and external(flagged=False) == ["haiku", "xss"]
        assert external(gold=True) == ["haiku"]
        frame, total = browse.items_frame(engine, project.id, limit=2)
        assert (len(frame), total) == (2, 3)

        annotations, total = browse.annotations_frame(engine, project.id)
        assert total == 3 and set(annotations["annotator"]) == {"ann1"}
        assert browse.annotations_frame(engine, project.id, annotator="ann2")[1] == 0
        assert browse.annotations_frame(engine, project.id, item_id=ids["xss"])[1] == 1
        assert browse.annotator_names(engine, project.id) == ["ann1"]
        detail = browse.item_detail(engine, project.id, ids["egg"])
        assert [(f["kind"], f["note"], f["annotator"]) for f in detail["flags"]] == [("unsafe", "worrying", "ann2")]
        assert detail["source_a"] == "model-alpha"
    finally:
        engine.dispose()


def test_chat_turns():
    from annotation.browse import chat_turns

    assert chat_turns("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    assert chat_turns("Write a poem about Human: nature") is None
    assert chat_turns([{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}])[0]["role"] == "system"


def test_user_management_checks_the_actor_on_the_server(engine):
    from annotation import users
    from annotation.auth import create_user
    from annotation.errors import AnnotationError
    from annotation.store import transaction

    with transaction(engine) as session:
        admin = create_user(session, "root", PASSWORD, "admin")
        researcher = create_user(session, "rita", PASSWORD, "researcher")
    for action, args in [(users.add_user, ("eve", PASSWORD)), (users.set_role, ("rita", "admin")),
                         (users.set_active, ("root", False)), (users.reset_password, ("root", "new-password-1"))]:
        with pytest.raises(AnnotationError, match="permission denied"), transaction(engine) as session:
            action(session, researcher, *args)
    with transaction(engine) as session:
        users.set_role(session, admin, "rita", "admin")
    # rita's page still holds her old researcher User object: the check re-reads her role, now admin.
    with transaction(engine) as session:
        users.set_active(session, researcher, "root", False)
    with transaction(engine) as session:
        assert [u["active"] for u in users.list_users(session, researcher)] == [True, False]
        with pytest.raises(AnnotationError, match="last active admin"):
            users.set_role(session, researcher, "rita", "annotator")
    # ...and a deactivated admin can do nothing any more.
    with pytest.raises(AnnotationError, match="not logged in"), transaction(engine) as session:
        users.list_users(session, admin)


def _job_panel_script(job_id):
    from app.ui import job_panel

    job_panel(job_id, cancel_key="panel_cancel")


def test_the_live_job_panel_checks_the_user_on_every_rerun(store):
    """The Reward Models and PPO pages draw a job in a fragment that reruns alone, without the page's
    check: the panel checks the user itself, so a deactivated or demoted researcher sees (and can
    cancel) nothing more."""
    from app.jobs import get_job, submit_job
    from app.ui import REFUSED_MESSAGE

    job_id = submit_job(store, "export", {"project": PROJECT, "format": "trl"})
    at = AppTest.from_function(_job_panel_script, args=(job_id,), default_timeout=TIMEOUT)
    set_login(at, store, user_id(store, "res"))
    at.run()
    assert not at.error and [b.key for b in at.button] == ["panel_cancel"]
    _set_user(store, "res", active=False)
    at.button(key="panel_cancel").click().run()
    assert [e.value for e in at.error] == [REFUSED_MESSAGE] and not at.button
    assert get_job(store, job_id)["status"] == "queued"  # the click did not cancel it


def test_users_table_says_a_deactivated_user_cannot_log_in(store):
    _set_user(store, "ann2", active=False)
    at = open_page("users", store, "admin")
    table = at.dataframe[0].value.set_index("username")
    assert not table.loc["ann2", "can_log_in"] and table.loc["ann1", "can_log_in"]
    assert table.loc["ann2", "has_password"]  # still manageable: the Manage tab offers it for reactivation
    assert "ann2" in at.selectbox(key="users_target").options


def test_enter_right_after_the_choice_without_a_strength_is_refused_once(store):
    """Choice and Enter merged into one rerun, as a fast typist's keys arrive: refused with a message,
    and a second Enter saves it without a strength."""
    at = open_page("annotate", store, "ann1")
    at.button(key="ann_choice_left").click()
    at.button(key="ann_submit").click().run()  # both in one rerun, as a fast typist's keys arrive
    assert any("Not saved yet" in w.value for w in at.warning)
    with session_factory(store)() as session:
        assert session.scalars(select(Annotation)).all() == []
    at.button(key="ann_submit").click().run()
    with session_factory(store)() as session:
        saved = session.scalars(select(Annotation)).one()
    assert saved.strength is None and saved.choice in ("a", "b")


# ----------------------------------------------------------------------------- suggestions and selection


def score_good_side(engine) -> tuple[Project, list[Item]]:
    """Scores for project demo as a scoring job writes them: the model prefers the GOOD response of
    every item, 80% sure. The project and its items."""
    import pandas as pd

    from annotation.selection import write_queue

    with session_factory(engine)() as session:
        project = session.scalar(select(Project).where(Project.name == PROJECT))
        items = session.scalars(select(Item).where(Item.project_id == project.id)).all()
    scores = pd.DataFrame({"p_a": [0.8 if "GOOD" in i.response_a else 0.2 for i in items], "top": [None] * len(items),
                           "uncertainty": [0.2] * len(items)}, index=[i.id for i in items])
    write_queue(engine, project.id, scores, measure="margin", model_id=None, random_share=0.0)
    return project, items


def test_annotate_shows_the_model_suggestion_only_when_the_project_turns_it_on(store):
    from annotation.projects import save_project_settings

    project, _ = score_good_side(store)

    at = open_page("annotate", store, "ann1")
    assert "reward model prefers" not in all_text(at)  # off by default
    at.button(key=f"ann_choice_{good_side(current_task(at))}").click().run()
    at.button(key="ann_strength_2").click().run()
    at.button(key="ann_submit").click().run()

    save_project_settings(store, project.id, suggestions=True)
    # ann1's next item was leased while suggestions were off, so it still shows none; ann2's shows one
    at = open_page("annotate", store, "ann1")
    assert "reward model prefers" not in all_text(at)
    at = open_page("annotate", store, "ann2")
    task = current_task(at)
    shown = "1" if good_side(task) == "left" else "2"
    assert f"The reward model prefers Response {shown} (80% sure)" in all_text(at)
    at.button(key=f"ann_choice_{good_side(task)}").click().run()
    at.button(key="ann_strength_2").click().run()
    at.button(key="ann_submit").click().run()
    assert not at.exception
    with session_factory(store)() as session:
        rows = session.execute(select(Annotation.suggestion, Item.response_a).join(Item).order_by(Annotation.id)).all()
    assert rows[0].suggestion is None
    assert rows[1].suggestion == ("a" if "GOOD" in rows[1].response_a else "b")


def test_projects_page_sets_uncertainty_selection(store):
    at = open_page("projects", store, "res")
    box = next(s for s in at.selectbox if s.label == "Next item")
    box.set_value("uncertainty")
    next(n for n in at.number_input if n.label.startswith("Random share")).set_value(0.3)
    next(b for b in at.button if b.label == "Save settings").click().run()
    assert not at.exception and "Settings saved." in all_text(at)
    with session_factory(store)() as session:
        project = session.scalar(select(Project).where(Project.name == PROJECT))
    assert (project.selection, project.random_share, project.suggestions) == ("uncertainty", 0.3, False)
    assert "Not scored yet" in all_text(at.run())


def test_data_page_shows_a_ranking_item_with_its_responses_and_rankings(store):
    with session_factory(store)() as session:
        project = session.scalar(select(Project).where(Project.name == PROJECT))
        ann = session.scalar(select(User).where(User.username == "ann1"))
        responses = [{"text": f"ranked reply {i}", "source": f"model-{i}"} for i in range(4)]
        item = Item(project_id=project.id, prompt="rank these", response_a="", response_b="", responses=responses,
                    content_hash="ranking-1")
        session.add(item)
        session.flush()
        session.add(Annotation(item_id=item.id, annotator_id=ann.id, ranking=[2, 1, 4, 3], shown_order=[1, 0, 3, 2]))
        session.commit()
        item_id = item.id
    at = open_page("data", store, "res")
    items = at.tabs[0].dataframe[0].value
    assert int(items.loc[items["item_id"] == item_id, "responses"].iloc[0]) == 4
    at.text_input(key="data_search").input("ranked reply 3").run()  # a ranking's responses are searched too
    assert list(at.tabs[0].dataframe[0].value["item_id"]) == [item_id]
    at.selectbox(key="data_item_id").set_value(item_id).run()
    text = all_text(at)
    assert "**Response 4** · source: model\\-3" in text and "ranked reply 3" in text  # the source escaped for Markdown
    assert not at.exception
    annotations = at.tabs[1].dataframe[0].value
    assert list(annotations.loc[annotations["item_id"] == item_id, "ranking"]) == ["2 1 4 3"]


def test_quality_page_says_how_often_people_followed_the_suggestions(store):
    from annotation.projects import save_project_settings

    project, items = score_good_side(store)
    annotate_all(store, "ann1")  # without suggestions: the GOOD side, which the model prefers too
    save_project_settings(store, project.id, suggestions=True)
    annotate_all(store, "ann2")  # with them
    at = open_page(APP / "pages" / "4_Quality.py", store, "res")
    assert not at.exception
    text = all_text(at)
    assert f"Reward-model suggestions were shown with {len(items)} answers: 100% of them chose the model's side" in text
    assert f"against 100% of {len(items)} answers given without one" in text


@pytest.mark.parametrize("pause_s", [0.0, 0.5])
def test_enter_merged_with_a_strength_key_is_refused_once_and_the_strength_kept(store, pause_s):
    """A strength key and Enter queued while the page was busy reach the server in one rerun, and
    Streamlit runs their callbacks in widget order, not key order (a browser's merged request puts
    the older key last). However long ago the choice was made, the submit is refused once and the
    strength applies; the next Enter saves it with the strength."""
    at = open_page("annotate", store, "ann1")
    at.button(key="ann_choice_left").click().run()
    time.sleep(pause_s)
    at.button(key="ann_strength_2").click()
    at.button(key="ann_submit").click().run()
    assert any("Not saved yet" in w.value for w in at.warning)
    assert at.session_state["ann_answer"].strength == 2, "the strength key still applies to the item on screen"
    with session_factory(store)() as session:
        assert session.scalars(select(Annotation)).all() == []
    at.button(key="ann_submit").click().run()
    with session_factory(store)() as session:
        assert [a.strength for a in session.scalars(select(Annotation))] == [2]


@pytest.mark.parametrize("pause_s, refused", [(0.0, True), (0.5, False)])
def test_enter_right_after_the_choice_is_drawn_is_refused_once_at_typing_speed(store, pause_s, refused):
    """An Enter with no strength that comes within FAST_SUBMIT_S of the run that drew the choice may
    have lost a strength key in the browser's redraw: refused once. At a person's pace it saves."""
    at = open_page("annotate", store, "ann1")
    at.button(key="ann_choice_left").click().run()
    time.sleep(pause_s)
    at.button(key="ann_submit").click().run()
    assert any("Not saved yet" in w.value for w in at.warning) == refused
    if refused:
        at.button(key="ann_submit").click().run()
    with session_factory(store)() as session:
        assert [a.strength for a in session.scalars(select(Annotation))] == [None]

"""RLHF Studio's entry point: log in, see that the store and models are ready, go to a page.

    python -m streamlit run app/Home.py        (or: rlhf serve)

The menu lists only the pages the logged-in user's role may open; each page checks the role again
itself on every rerun, so the menu is a convenience and never the guard.
"""

from __future__ import annotations

import streamlit as st
from sqlalchemy import text

from app.settings import get_settings
from app.ui import PAGES_DIR, allowed_pages, current_user, get_engine, log_out, page_title, sync_cookie, try_log_in

DEFAULT_MODELS = ("SmolLM2-135M-Instruct", "all-MiniLM-L6-v2")


def _login_form() -> None:
    _, middle, _ = st.columns([1, 1.3, 1])
    with middle:
        st.title("RLHF Studio")
        st.write("Log in to annotate or to manage projects.")
        with st.form("login", enter_to_submit=True):
            username = st.text_input("Username", key="login_username")
            password = st.text_input("Password", type="password", key="login_password")
            submitted = st.form_submit_button("Log in", type="primary")
        if submitted:
            user, why = try_log_in(username, password)
            if user is None:
                st.error(why)
            else:
                st.rerun()


def _status() -> None:
    settings = get_settings()
    st.subheader("System")
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        url = get_engine().url.render_as_string(hide_password=True)
        st.success(f"Database ready: `{url}`")
    except Exception as exc:  # any failure here is worth showing as-is to whoever runs the app
        st.error(f"Database not reachable: {exc}")
    missing = [name for name in DEFAULT_MODELS if not (settings.model_dir / name).is_dir()]
    if missing:
        st.warning(
            f"Models missing under `{settings.model_dir}`: {', '.join(missing)}. "
            "Run `rlhf models fetch` (or `make models`). Annotation works without them."
        )
    else:
        st.success(f"Models ready: {', '.join(DEFAULT_MODELS)} under `{settings.model_dir}`")


def home() -> None:
    user = current_user()
    if user is None:
        _login_form()
        return
    st.title("RLHF Studio")
    st.write(f"Welcome, **{user.username}**. You are logged in as **{user.role}**.")
    st.subheader("Where to go")
    for path in allowed_pages(user.role):
        st.page_link(f"pages/{path.name}", label=page_title(path))
    if user.role != "annotator":  # the database URL and server paths are nothing an annotator needs
        _status()


def main() -> None:
    st.set_page_config(page_title="RLHF Studio", layout="wide")
    sync_cookie()
    user = current_user()
    pages = [st.Page(home, title="Home", url_path="home", default=True)]
    # Every page is registered, so a bookmark or a reload reaches the page asked for and that page's
    # own check answers (log in first / not for your role), never "Page not found"; the menu shows
    # only the allowed ones.
    allowed = set(allowed_pages(user.role if user else None))
    for path in sorted(PAGES_DIR.glob("[0-9]*_*.py")):
        pages.append(st.Page(f"pages/{path.name}", title=page_title(path),
                             visibility="visible" if path in allowed else "hidden"))
    nav = st.navigation(pages)
    if user is not None:
        with st.sidebar:
            st.caption(f"Logged in as **{user.username}** ({user.role})")
            if st.button("Log out", key="logout"):
                log_out()
                st.rerun()
    nav.run()


main()

"""What every Streamlit page shares: the store's engine, login state and the server-side role check.

Every page starts with `user = page_user("researcher")` (or the roles it allows): the check runs
on the server on every rerun, so opening a page by URL gives a refusal and nothing else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from pathlib import Path

import streamlit as st
from sqlalchemy.engine import Engine

from annotation.auth import authenticate
from annotation.store import User, init_db, reading, session_factory, utcnow
from app.settings import get_settings

# A failed login waits this long on top of argon2's own cost, so guessing is slow whatever failed.
FAILED_LOGIN_DELAY_S = 1.0
WRONG_LOGIN_MESSAGE = "Wrong username or password."

PAGES_DIR = Path(__file__).with_name("pages")
# Which roles see each page in the menu (admins see everything). The pages check again themselves:
# the menu is a convenience, page_user is the guard.
PAGE_ROLES: dict[str, tuple[str, ...]] = {
    "1_Annotate.py": ("annotator", "researcher"),
    "2_Projects.py": ("researcher",),
    "3_Data.py": ("researcher",),
    "4_Quality.py": ("researcher",),
    "5_Reward_Models.py": ("researcher",),
    "6_PPO.py": ("researcher",),
    "7_Users.py": ("admin",),
}
DEFAULT_PAGE_ROLES = ("researcher",)


@st.cache_resource
def _engine_for(db_url: str) -> Engine:
    return init_db(db_url)


def get_engine() -> Engine:
    """The engine of the configured store; keyed by URL so that a changed RLHF_DB_URL takes effect."""
    return _engine_for(get_settings().db_url)


def current_user() -> User | None:
    """The logged-in user, re-read from the store (a deactivated user is out at once), or None."""
    user_id = st.session_state.get("user_id")
    expires = st.session_state.get("login_expires")
    if user_id is None or expires is None or utcnow() > expires:
        st.session_state.pop("user_id", None)
        return None
    # A read-only session: on SQLite it takes no write lock, so page reruns never queue behind
    # an import or an annotator's submit.
    with reading(get_engine()) as session:
        user = session.get(User, user_id)
    if user is None or not user.active or st.session_state.get("login_stamp") != login_stamp(user):
        st.session_state.pop("user_id", None)
        return None
    return user


def login_stamp(user: User) -> str:
    """A digest of what a login was granted on: the password hash and the role. A password reset or
    a role change alters it, which ends every session opened before (deactivation already does)."""
    return hashlib.sha256(f"{user.id}\0{user.password_hash}\0{user.role}".encode()).hexdigest()


def log_in(user: User) -> None:
    st.session_state["user_id"] = user.id
    st.session_state["login_stamp"] = login_stamp(user)
    st.session_state["login_expires"] = utcnow() + dt.timedelta(minutes=get_settings().session_minutes)


def log_out() -> None:
    # Everything in the session belongs to the user who leaves: the current item, choices, exports.
    for key in list(st.session_state.keys()):
        del st.session_state[key]


def try_log_in(username: str, password: str) -> User | None:
    """Log in with a username and password; on failure wait, and say nothing about which part was wrong."""
    with session_factory(get_engine())() as session:
        user = authenticate(session, username or "", password or "")
    if user is None:
        time.sleep(FAILED_LOGIN_DELAY_S)
        return None
    log_in(user)
    return user


def action_user(*roles: str) -> User | None:
    """The page_user check for code that runs outside the page's own top-to-bottom run: button
    callbacks (which run before the page script, so before its page_user call) and fragments
    (which rerun alone). None when the session expired, the user was deactivated or no longer
    has one of `roles`; the caller then does nothing and says so."""
    user = current_user()
    if user is None or (roles and user.role != "admin" and user.role not in roles):
        return None
    return user


REFUSED_MESSAGE = "Not done: you are no longer logged in with a role that may do this. Log in again on the Home page."


def page_user(*roles: str) -> User:
    """The current user if their role is among `roles` (admins always pass); otherwise a refusal and stop."""
    user = current_user()
    if user is None:
        st.error("Please log in on the Home page first.")
        st.stop()
    if roles and user.role != "admin" and user.role not in roles:
        st.error(f"This page is for {' or '.join(roles)}s. You are logged in as {user.role}.")
        st.stop()
    return user


_MD_IMAGE = re.compile(r"!(?=\[)")


def no_remote_images(markdown: str) -> str:
    """Markdown with every image turned into a plain link: `![alt](url)` makes the browser fetch url
    as soon as it renders, a link only when clicked. (Raw HTML is escaped by st.markdown anyway.)"""
    return _MD_IMAGE.sub("\\!", markdown)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>:$~=^])")


def escape_markdown(text: str) -> str:
    """`text` as literal characters inside Markdown (for a name or id set inside a bold label):
    no code spans to break out of, no :colour[...] directives, no $LaTeX$, no emoji shortcodes."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def allowed_pages(role: str | None) -> list[Path]:
    """Page files under app/pages that `role` may open, in file-name order (None: not logged in)."""
    if role is None:
        return []
    pages = []
    for path in sorted(PAGES_DIR.glob("[0-9]*_*.py")):
        wanted = PAGE_ROLES.get(path.name, DEFAULT_PAGE_ROLES)
        if role == "admin" or role in wanted:
            pages.append(path)
    return pages


def page_title(path: Path) -> str:
    """'5_Reward_Models.py' -> 'Reward Models'."""
    return path.stem.split("_", 1)[1].replace("_", " ")


def user_caption(user: User) -> None:
    st.caption(f"Logged in as **{user.username}** ({user.role})")

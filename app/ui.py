"""What every Streamlit page shares: the store's engine, login state and the server-side role check.

Every page starts with `user = page_user("researcher")` (or the roles it allows): the check runs
on the server on every rerun, so opening a page by URL gives a refusal and nothing else.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from pathlib import Path

import streamlit as st
from sqlalchemy.engine import Engine

from annotation.auth import authenticate
from annotation.sessions import close_session, login_stamp, open_session, record_failure, record_success, session_user, throttled
from annotation.store import User, init_db, reading, utcnow
from app.settings import get_settings

# A failed login waits this long on top of argon2's own cost, so guessing is slow whatever failed.
FAILED_LOGIN_DELAY_S = 1.0
WRONG_LOGIN_MESSAGE = "Wrong username or password."
TOO_MANY_LOGINS_MESSAGE = "Too many failed logins for this account or from this address; try again in 15 minutes."
BUSY_MESSAGE = "The server is busy checking other logins; try again in a moment."
SESSION_COOKIE = "rlhf_session"
# argon2 costs 64 MiB and a core per check: many parallel guesses must not exhaust the server.
MAX_PASSWORD_CHECKS = 2
PASSWORD_CHECK_WAIT_S = 10.0
_password_checks = threading.BoundedSemaphore(MAX_PASSWORD_CHECKS)

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
    """The logged-in user, re-read from the store (a deactivated user is out at once), or None.

    A browser that reloads, or opens a bookmark, starts a new Streamlit session: it is logged in
    again from its session cookie (annotation.sessions), checked on the server."""
    state = st.session_state
    if state.get("user_id") is None:
        return _resume_from_cookie()  # checked there on the server: unexpired, unrevoked, still valid
    expires = state.get("login_expires")
    if expires is None or utcnow() > expires:
        state.pop("user_id", None)
        return None
    token = state.get("session_token")
    if token is not None:
        # The server-side session decides: revoked (logged out elsewhere), expired or invalidated.
        found = session_user(get_engine(), token)
        user = found[0] if found is not None and found[0].id == state["user_id"] else None
    else:
        # A read-only session: on SQLite it takes no write lock, so page reruns never queue behind
        # an import or an annotator's submit.
        with reading(get_engine()) as session:
            user = session.get(User, state["user_id"])
        if user is not None and (not user.active or state.get("login_stamp") != login_stamp(user)):
            user = None
    if user is None:
        state.pop("user_id", None)
        state.pop("session_token", None)
        return None
    return user


def _resume_from_cookie() -> User | None:
    token = st.context.cookies.get(SESSION_COOKIE)
    found = session_user(get_engine(), token) if isinstance(token, str) and token else None
    if found is None:
        return None
    user, expires = found
    st.session_state.update(user_id=user.id, login_stamp=login_stamp(user), login_expires=expires, session_token=token)
    return user


def log_in(user: User) -> None:
    minutes = get_settings().session_minutes
    token = open_session(get_engine(), user, minutes, client=_client())
    st.session_state.update(user_id=user.id, login_stamp=login_stamp(user), session_token=token,
                            login_expires=utcnow() + dt.timedelta(minutes=minutes))
    st.session_state["cookie_to_set"] = (token, int(minutes * 60))


def log_out() -> None:
    close_session(get_engine(), st.session_state.get("session_token"))
    # Everything in the session belongs to the user who leaves: the current item, choices, exports.
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    st.session_state["cookie_to_set"] = ("", 0)


def sync_cookie() -> None:
    """Write (after a login) or clear (after a logout) the session cookie in the browser. Streamlit
    reads cookies (st.context.cookies) but has no call that sets one, so a one-line script does;
    the token is URL-safe base64, never user text. SameSite=Strict: no other site sends it."""
    pending = st.session_state.pop("cookie_to_set", None)
    if pending is None:
        return
    token, max_age = pending
    secure = "; Secure" if str(st.context.url or "").startswith("https://") else ""
    st.html(f"<script>document.cookie = '{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; SameSite=Strict{secure}';"
            "</script>", unsafe_allow_javascript=True, width=1)


def _client() -> str:
    return str(getattr(st.context, "ip_address", None) or "unknown")


def try_log_in(username: str, password: str) -> tuple[User | None, str]:
    """Log in with a username and password: (user, "") or (None, why). On failure it waits and says
    nothing about which part was wrong; too many failures for a username or a client are refused
    without a password check, and at most MAX_PASSWORD_CHECKS argon2 checks run at once."""
    engine, client, username = get_engine(), _client(), (username or "").strip()
    if throttled(engine, username, client):
        return None, TOO_MANY_LOGINS_MESSAGE
    if not _password_checks.acquire(timeout=PASSWORD_CHECK_WAIT_S):
        return None, BUSY_MESSAGE
    try:
        with reading(engine) as session:
            user = authenticate(session, username, password or "")
    finally:
        _password_checks.release()
    if user is None:
        record_failure(engine, username, client)
        time.sleep(FAILED_LOGIN_DELAY_S)
        return None, WRONG_LOGIN_MESSAGE
    record_success(engine, username)
    log_in(user)
    return user, ""


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


# --------------------------------------------------------------------------- shared widgets


def project_picker(projects: list, key: str, none_message: str):
    """The project selectbox of a page (the choice kept per page under `key`); with no project yet,
    `none_message` and the page stops."""
    if not projects:
        st.info(none_message)
        st.stop()
    by_id = {p.id: p for p in projects}
    if st.session_state.get(key) not in by_id:
        st.session_state[key] = projects[0].id
    return by_id[st.selectbox("Project", list(by_id), format_func=lambda i: by_id[i].name, key=key)]


def job_panel(job_id: int, cancel_key: str, cancel_label: str = "Cancel") -> dict | None:
    """A job's progress bar and Cancel button, for the live fragments of the Reward Models and PPO
    pages. A fragment reruns alone, without the page's page_user check, so the user is checked again
    here on every rerun (and cancel_job checks once more inside the action). Returns the job, or
    None when the user may no longer see it."""
    from annotation.errors import AnnotationError
    from app.jobs import cancel_job, get_job

    acting = action_user("researcher")
    if acting is None:
        st.error(REFUSED_MESSAGE)
        return None
    engine = get_engine()
    job = get_job(engine, job_id)
    st.progress(float(job["progress"]), text=f"job {job_id} ({job['kind']}): {job['status']} — "
                                             f"{job['message'] or 'waiting for a worker'}")
    if job["status"] in ("queued", "running") and st.button(cancel_label, key=cancel_key):
        try:
            cancel_job(engine, job_id, by_user_id=acting.id)
        except AnnotationError as exc:
            st.error(str(exc))
        st.rerun()
    return job


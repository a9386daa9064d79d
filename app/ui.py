"""What every Streamlit page shares: the store's engine and the server-side role check.

Every page starts with `user = page_user("researcher")` (or the roles it allows): the check runs
on the server on every rerun, so opening a page by URL gives a refusal and nothing else.
"""

from __future__ import annotations

import datetime as dt

import streamlit as st
from sqlalchemy.engine import Engine

from annotation.store import User, init_db, session_factory, utcnow
from app.settings import get_settings


@st.cache_resource
def get_engine() -> Engine:
    return init_db(get_settings().db_url)


def current_user() -> User | None:
    """The logged-in user, re-read from the store (a deactivated user is out at once), or None."""
    user_id = st.session_state.get("user_id")
    expires = st.session_state.get("login_expires")
    if user_id is None or expires is None or utcnow() > expires:
        st.session_state.pop("user_id", None)
        return None
    with session_factory(get_engine())() as session:
        user = session.get(User, user_id)
    if user is None or not user.active:
        st.session_state.pop("user_id", None)
        return None
    return user


def log_in(user: User) -> None:
    st.session_state["user_id"] = user.id
    st.session_state["login_expires"] = utcnow() + dt.timedelta(minutes=get_settings().session_minutes)


def log_out() -> None:
    for key in ("user_id", "login_expires"):
        st.session_state.pop(key, None)


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

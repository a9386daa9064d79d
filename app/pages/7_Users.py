"""Users (admins only): create accounts, deactivate or reactivate them, reset passwords, set roles.

The functions in annotation.users check again that the acting user is an active admin.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import get_engine, page_user, user_caption

user = page_user("admin")

from annotation.errors import AnnotationError  # noqa: E402  (after the role check)
from annotation.store import ROLES  # noqa: E402
from annotation import users as users_mod  # noqa: E402

engine = get_engine()
state = st.session_state

st.title("Users")
user_caption(user)

if "users_flash" in state:
    st.success(state.pop("users_flash"))


def _apply(action, message: str, *args) -> None:
    """Run one admin action in a transaction; on success remember the message and rerun to refresh the table."""
    try:
        users_mod.perform(engine, action, user, *args)
    except AnnotationError as exc:
        st.error(str(exc))
        return
    state["users_flash"] = message
    st.rerun()


rows = users_mod.user_rows(engine, user)
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="users_table")

# Keyed and rerun on change, so the tab an admin worked in stays open after the action's rerun.
create_tab, manage_tab = st.tabs(["Create user", "Manage a user"], key="users_tabs", on_change="rerun")

with create_tab:
    with st.form("users_create"):
        username = st.text_input("Username", key="users_new_name")
        password = st.text_input("Password (at least 8 characters)", type="password", key="users_new_password")
        role = st.selectbox("Role", list(ROLES), key="users_new_role")
        if st.form_submit_button("Create user", type="primary"):
            _apply(users_mod.add_user, f"User '{username.strip()}' created.", username, password, role)

with manage_tab:
    names = [r["username"] for r in rows if r["has_password"]]
    if names:
        target = st.selectbox("User", names, key="users_target")
        current = next(r for r in rows if r["username"] == target)
        st.caption(f"Role **{current['role']}**, {'active' if current['active'] else 'deactivated'}.")
        c1, c2 = st.columns(2)
        with c1:
            # One widget per user: a fixed key would keep the first user's value and ignore `index`,
            # showing (and then setting) the wrong role for every other user.
            new_role = st.selectbox("Role", list(ROLES), index=list(ROLES).index(current["role"]),
                                    key=f"users_set_role_{current['id']}")
            if st.button("Set role", key="users_set_role_btn"):
                _apply(users_mod.set_role, f"'{target}' is now {new_role}.", target, new_role)
            if current["active"]:
                if st.button("Deactivate", key="users_deactivate"):
                    _apply(users_mod.set_active, f"'{target}' deactivated.", target, False)
            elif st.button("Reactivate", key="users_reactivate"):
                _apply(users_mod.set_active, f"'{target}' reactivated.", target, True)
        with c2:
            with st.form("users_reset"):
                new_password = st.text_input("New password", type="password", key="users_reset_password")
                if st.form_submit_button("Reset password"):
                    _apply(users_mod.reset_password, f"Password of '{target}' reset.", target, new_password)

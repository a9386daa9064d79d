"""User management for admins: create, deactivate, reset password, set role.

Every function takes the acting user and checks, here on the server side, that they are an active
admin, whatever page or command called it. No change may leave the platform without an active admin.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from annotation.auth import check_role, create_user, find_user, hash_password, require_role
from annotation.errors import AnnotationError
from annotation.store import User, reading, transaction


def list_users(session: Session, actor: User) -> list[dict]:
    _admin(session, actor)
    rows = session.scalars(select(User).order_by(User.username)).all()
    return [
        {"id": u.id, "username": u.username, "role": u.role, "active": u.active,
         "has_password": u.password_hash is not None, "can_log_in": u.active and u.password_hash is not None,
         "created_at": u.created_at}
        for u in rows
    ]


def _admin(session: Session, actor: User) -> User:
    # Re-read the actor: a role or active flag changed since their page loaded counts now.
    return require_role(session.get(User, actor.id) if actor is not None else None, "admin")


def _target(session: Session, username: str) -> User:
    user = find_user(session, username)
    if user is None:
        raise AnnotationError(f"no user named '{username}'")
    return user


def _other_active_admins(session: Session, user: User) -> int:
    return session.scalar(
        select(func.count()).select_from(User).where(User.role == "admin", User.active.is_(True), User.id != user.id)
    ) or 0


def add_user(session: Session, actor: User, username: str, password: str, role: str = "annotator") -> User:
    _admin(session, actor)
    return create_user(session, username, password, role)


def set_role(session: Session, actor: User, username: str, role: str) -> User:
    _admin(session, actor)
    check_role(role)
    user = _target(session, username)
    if user.role == "admin" and role != "admin" and user.active and _other_active_admins(session, user) == 0:
        raise AnnotationError(f"'{username}' is the last active admin; make another admin first")
    user.role = role
    session.flush()
    return user


def set_active(session: Session, actor: User, username: str, active: bool) -> User:
    """Deactivate (or reactivate) a user; a deactivated user's open sessions end on their next click."""
    _admin(session, actor)
    user = _target(session, username)
    if not active and user.role == "admin" and user.active and _other_active_admins(session, user) == 0:
        raise AnnotationError(f"'{username}' is the last active admin and cannot be deactivated")
    user.active = active
    session.flush()
    return user


def reset_password(session: Session, actor: User, username: str, new_password: str) -> User:
    _admin(session, actor)
    user = _target(session, username)
    user.password_hash = hash_password(new_password)
    session.flush()
    return user


# --------------------------------------------------------------------------- for pages and commands


def perform(engine, action, actor: User, *args):
    """Run one of the admin actions above (add_user, set_role, set_active, reset_password) in its own
    transaction: the check that `actor` is an active admin and the change commit together."""
    with transaction(engine) as session:
        action(session, actor, *args)


def user_rows(engine, actor: User) -> list[dict]:
    """list_users, read without taking SQLite's write lock."""
    with reading(engine) as session:
        return list_users(session, actor)


"""Users, roles and argon2 password hashing."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation.errors import AnnotationError
from annotation.names import can_be_looked_up, check_username
from annotation.store import ROLES, User

_hasher = PasswordHasher()
MIN_PASSWORD_CHARS = 8
# Verifying against this when a username is unknown keeps the time of a failed login the same
# whether the name or the password was wrong.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AnnotationError(f"password too short: at least {MIN_PASSWORD_CHARS} characters are required")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AnnotationError(f"unknown role '{role}'; expected one of {', '.join(ROLES)}")
    return role


def find_user(session: Session, username: str) -> User | None:
    """The user with exactly this login name, or None."""
    return session.scalar(select(User).where(User.username == username))


def check_new_user(session: Session, username: str, role: str) -> str:
    """`username` stripped, or AnnotationError: the name is invalid or taken, or the role unknown."""
    username = check_username(username)
    check_role(role)
    if find_user(session, username) is not None:
        raise AnnotationError(f"user '{username}' already exists")
    return username


def create_user(session: Session, username: str, password: str | None, role: str = "annotator") -> User:
    """Add a user. password None makes an account that cannot log in (the source of imported labels)."""
    username = check_new_user(session, username, role)
    user = User(username=username, role=role, password_hash=hash_password(password) if password is not None else None)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, or None (without saying which part was wrong)."""
    username = username.strip()
    user = find_user(session, username) if can_be_looked_up(username) else None
    ok = verify_password(user.password_hash if user else None, password)
    if user is None or not ok or not user.active:
        return None
    return user


def require_role(user: User | None, *allowed: str) -> User:
    """Raise unless `user` is active and has one of the allowed roles (admins pass every check)."""
    if user is None or not user.active:
        raise AnnotationError("not logged in")
    if user.role != "admin" and user.role not in allowed:
        raise AnnotationError(f"permission denied: this needs the role {' or '.join(allowed)}, you are {user.role}")
    return user

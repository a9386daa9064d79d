"""Login sessions that survive a reload, and throttling of password guesses.

    token = open_session(engine, user, minutes=480, client="127.0.0.1")   # the browser keeps the token
    user = session_user(engine, token)            # None once expired, revoked or invalidated
    close_session(engine, token)                  # logging out revokes it on the server

A session is valid while it is unexpired, unrevoked, its user is active, and the user's password
hash and role are what they were at login (`login_stamp`): a password reset or a role change
ends every session opened before it. Only the token's SHA-256 is stored.

Throttling: failed password checks are recorded per username and per client address; once
either has too many in the window, further attempts are refused without checking the password
(which also spares the server the argon2 hash). The records live in the database, so every app
process behind a load balancer counts the same failures.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine

from annotation.store import Base, User, read_connection, reading, utcnow

# Failed logins allowed per window before further attempts are refused, per username and per client.
FAILURES_PER_USERNAME = 5
FAILURES_PER_CLIENT = 20
FAILURE_WINDOW = dt.timedelta(minutes=15)

# Tables of migration 0003. Declared here, not in store.py, because nothing else uses them.
_sessions = sa.Table(
    "login_sessions", Base.metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("stamp", sa.String(64), nullable=False),
    sa.Column("client", sa.String(64)),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("revoked_at", sa.DateTime),
)
_failures = sa.Table(
    "login_failures", Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(128), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
)


def login_stamp(user: User) -> str:
    """A digest of what a login was granted on: the password hash and the role."""
    return hashlib.sha256(f"{user.id}\0{user.password_hash}\0{user.role}".encode()).hexdigest()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(engine: Engine, user: User, minutes: float, client: str | None = None,
                 now: dt.datetime | None = None) -> str:
    """A new random session token for `user`, valid for `minutes`."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(insert(_sessions).values(
            token_hash=_digest(token), user_id=user.id, stamp=login_stamp(user), client=(client or "")[:64] or None,
            created_at=now, expires_at=now + dt.timedelta(minutes=minutes),
        ))
    return token


def session_user(engine: Engine, token: str | None, now: dt.datetime | None = None) -> tuple[User, dt.datetime] | None:
    """(user, expiry) of a valid session token, or None. Reads only (no write lock on SQLite)."""
    if not isinstance(token, str) or not token or len(token) > 200:
        return None
    now = now or utcnow()
    with reading(engine) as session:
        row = session.execute(
            select(_sessions.c.user_id, _sessions.c.stamp, _sessions.c.expires_at)
            .where(_sessions.c.token_hash == _digest(token), _sessions.c.revoked_at.is_(None),
                   _sessions.c.expires_at > now)
        ).first()
        user = session.get(User, row.user_id) if row is not None else None
    if user is None or not user.active or login_stamp(user) != row.stamp:
        return None
    return user, row.expires_at


def close_session(engine: Engine, token: str | None, now: dt.datetime | None = None) -> None:
    """Revoke a session token (logging out); unknown tokens are ignored."""
    if not token:
        return
    with engine.begin() as conn:
        conn.execute(update(_sessions).where(_sessions.c.token_hash == _digest(token), _sessions.c.revoked_at.is_(None))
                     .values(revoked_at=now or utcnow()))


# --------------------------------------------------------------------------- throttling


def throttled(engine: Engine, username: str, client: str, now: dt.datetime | None = None) -> bool:
    """Whether a login attempt must be refused without checking the password."""
    since = (now or utcnow()) - FAILURE_WINDOW
    with read_connection(engine) as conn:
        by_name = conn.execute(select(func.count()).select_from(_failures)
                               .where(_failures.c.username == username[:128], _failures.c.at > since)).scalar_one()
        by_client = conn.execute(select(func.count()).select_from(_failures)
                                 .where(_failures.c.client == client[:64], _failures.c.at > since)).scalar_one()
    return by_name >= FAILURES_PER_USERNAME or by_client >= FAILURES_PER_CLIENT


def record_failure(engine: Engine, username: str, client: str, now: dt.datetime | None = None) -> None:
    now = now or utcnow()
    with engine.begin() as conn:
        conn.execute(insert(_failures).values(username=username[:128], client=client[:64], at=now))
        # Old records say nothing any more; dropping them keeps the table at one window's worth.
        conn.execute(delete(_failures).where(_failures.c.at < now - 4 * FAILURE_WINDOW))


def record_success(engine: Engine, username: str) -> None:
    """A correct password clears that username's failures (the client's stay counted)."""
    with engine.begin() as conn:
        conn.execute(delete(_failures).where(_failures.c.username == username[:128]))

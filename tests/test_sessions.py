"""Login sessions and guess throttling (annotation.sessions), on SQLite and PostgreSQL: a session
survives a reload until it expires, is revoked by logout, and ends when the password, the role or
the active flag changes; failed logins are counted per username and per client."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from annotation import sessions
from annotation.auth import create_user, hash_password
from annotation.store import User, transaction, utcnow


@pytest.fixture
def ann(engine):
    with transaction(engine) as s:
        return create_user(s, "ann", "password-123", "annotator").id


def user(engine, user_id):
    with transaction(engine) as s:
        u = s.get(User, user_id)
        s.expunge(u)
        return u


def change(engine, user_id, **values):
    with transaction(engine) as s:
        u = s.get(User, user_id)
        for k, v in values.items():
            setattr(u, k, v)


def test_a_session_is_valid_until_it_expires_or_is_revoked(engine, ann):
    token = sessions.open_session(engine, user(engine, ann), minutes=30, client="10.0.0.1")
    found, expires = sessions.session_user(engine, token)
    assert found.username == "ann" and dt.timedelta(minutes=29) < expires - utcnow() <= dt.timedelta(minutes=30)
    assert sessions.session_user(engine, token, now=utcnow() + dt.timedelta(minutes=31)) is None
    assert sessions.session_user(engine, token + "x") is None and sessions.session_user(engine, None) is None
    other = sessions.open_session(engine, user(engine, ann), minutes=30)
    sessions.close_session(engine, token)
    assert sessions.session_user(engine, token) is None
    assert sessions.session_user(engine, other) is not None  # logging out one browser leaves the others
    # Only a digest of the token is stored.
    with engine.connect() as conn:
        stored = [row[0] for row in conn.execute(select(sessions._sessions.c.token_hash))]
    assert token not in stored and len(stored) == 2


@pytest.mark.parametrize("what", ["password", "role", "deactivated"])
def test_a_password_reset_a_role_change_or_deactivation_ends_open_sessions(engine, ann, what):
    token = sessions.open_session(engine, user(engine, ann), minutes=30)
    values = {"password": {"password_hash": hash_password("another-pass-1")}, "role": {"role": "researcher"},
              "deactivated": {"active": False}}[what]
    change(engine, ann, **values)
    assert sessions.session_user(engine, token) is None
    # A login after the change is valid again.
    if what != "deactivated":
        assert sessions.session_user(engine, sessions.open_session(engine, user(engine, ann), minutes=30)) is not None


def test_failures_are_throttled_per_username_and_per_client(engine):
    now = utcnow()
    for i in range(sessions.FAILURES_PER_USERNAME - 1):
        sessions.record_failure(engine, "ann", f"10.0.0.{i}", now=now)
    assert not sessions.throttled(engine, "ann", "10.9.9.9", now=now)
    sessions.record_failure(engine, "ann", "10.0.0.99", now=now)
    assert sessions.throttled(engine, "ann", "10.9.9.9", now=now)  # from any address
    assert not sessions.throttled(engine, "bob", "10.9.9.9", now=now)
    assert not sessions.throttled(engine, "ann", "10.9.9.9", now=now + sessions.FAILURE_WINDOW + dt.timedelta(seconds=1))
    sessions.record_success(engine, "ann")
    assert not sessions.throttled(engine, "ann", "10.9.9.9", now=now)
    # One client guessing many usernames.
    for i in range(sessions.FAILURES_PER_CLIENT):
        sessions.record_failure(engine, f"user{i}", "10.6.6.6", now=now)
    assert sessions.throttled(engine, "somebody-else", "10.6.6.6", now=now)
    assert not sessions.throttled(engine, "somebody-else", "10.7.7.7", now=now)
